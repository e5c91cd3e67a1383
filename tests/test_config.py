"""Config: --set parsing (ints, lists, bools, nested keys), unknown keys listed, bad values named,
precedence defaults < file < flags < --set, and a YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpal.config import (
    CacheConfig,
    DistillConfig,
    build,
    dump_yaml,
    parse_sets,
    resolve,
    shard_slice,
    to_dict,
)
from dpal.errors import ConfigError
from dpal.views import ViewRecipe


def test_parse_sets_values_are_yaml() -> None:
    sets = [
        "num_views=3",
        "views.global_size=[128, 64]",
        "strict=true",
        "teacher_checkpoint=null",
        "out=",
        "slurm.partition=gpu",
        "views.flip_p=0.25",
    ]
    assert parse_sets(sets) == {
        "num_views": 3,
        "views": {"global_size": [128, 64], "flip_p": 0.25},
        "strict": True,
        "teacher_checkpoint": None,
        "out": "",
        "slurm": {"partition": "gpu"},
    }
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_sets(["views"])
    with pytest.raises(ValueError, match="views is not a section"):
        parse_sets(["views=3", "views.x=1"])


def test_resolve_coerces_types() -> None:
    cfg = resolve(
        CacheConfig,
        None,
        {},
        [
            "num_views=3",
            "views.global_size=[128,64]",
            "strict=yes",
            "random_init=on",
            "slurm.job_extra=[--constraint=a100]",
            "seed=7",
            "slurm.jobs=2",
            "teacher_layer=-2",
            "max_pixels=1000",
        ],
    )
    assert cfg.num_views == 3 and cfg.seed == 7 and cfg.strict is True and cfg.random_init is True
    assert cfg.views.global_size == (128, 64) and isinstance(cfg.views, ViewRecipe)
    assert cfg.views.local_size == ViewRecipe().local_size  # untouched nested keys keep their defaults
    assert cfg.slurm.job_extra == ("--constraint=a100",) and cfg.slurm.jobs == 2
    assert cfg.teacher_layer == -2 and cfg.max_pixels == 1000
    assert resolve(CacheConfig, None, {}, ["teacher_layer=none"]).teacher_layer is None
    assert resolve(CacheConfig, None, {}, ["strict=0"]).strict is False
    assert resolve(CacheConfig, None, {}, ["strict=1"]).strict is True


def test_unknown_keys_list_the_known_ones() -> None:
    with pytest.raises(ValueError) as e:
        resolve(CacheConfig, None, {}, ["viewz=3"])
    msg = str(e.value)
    assert msg.startswith("unknown config key 'viewz'; known keys: corpus, out, teacher")
    assert ", num_views," in msg and ", views" in msg
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'views.global_sise'; known keys: views.global_size, views.local_size",
    ):
        resolve(CacheConfig, None, {}, ["views.global_sise=[1,2]"])


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("num_views=abc", "num_views (--views) must be an integer, got 'abc'"),
        ("num_views=2.5", "num_views (--views) must be an integer, got 2.5"),
        ("num_views=true", "num_views (--views) must be a number"),
        ("num_views=0", "num_views (--views) must be >= 1, got 0"),
        ("strict=maybe", "strict must be true or false, got 'maybe'"),
        ("views.global_size=[1,2,3]", "views.global_size needs 2 values, got 3"),
        ("views.global_size=5", "views.global_size must be a list"),
        ("views.global_size=[40,16]", "multiples of 16"),
        ("views=[3]", "views must be a mapping"),
        ("dtype=fp8", "dtype 'fp8' is not one of float16, bfloat16, int8, int8-rotated, float32"),
        ("shards=abc", "--shards 'abc' must look like A:B"),
        ("views.person_alpha=2", "views.person_alpha must be in [0, 1]"),
    ],
)
def test_bad_values_name_the_field(setting: str, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        resolve(CacheConfig, None, {}, [setting])
    assert needle in str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_precedence_file_flags_set(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        path.write_text(
            "num_views: 2\nseed: 5\ndtype: int8\nbatch_size: 8\nviews:\n  global_size: [64, 32]\n"
        )
    else:
        path.write_text(
            'num_views = 2\nseed = 5\ndtype = "int8"\nbatch_size = 8\n[views]\nglobal_size = [64, 32]\n'
        )
    flags = {"num_views": 3, "seed": None, "dtype": "bfloat16", "corpus": "c"}
    cfg = resolve(CacheConfig, str(path), flags, ["num_views=4", "views.local_size=[32,16]"])
    assert cfg.num_views == 4  # --set beats the flag and the file
    assert cfg.dtype == "bfloat16"  # the flag beats the file
    assert cfg.seed == 5 and cfg.batch_size == 8  # file beats the default; a None flag is not given
    assert cfg.views.global_size == (64, 32) and cfg.views.local_size == (32, 16)  # sections merge
    assert cfg.corpus == "c" and cfg.shard_size == 256  # default
    with pytest.raises(ValueError, match="not found"):
        resolve(CacheConfig, str(tmp_path / "missing.yaml"), {}, [])


def test_yaml_round_trip() -> None:
    cfg = resolve(
        CacheConfig, None, {"corpus": "x"}, ["views.jitter=[0.1,0.2,0.3,0.05]", "slurm.job_extra=[a,b]"]
    )
    again = build(CacheConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and to_dict(again)["views"]["jitter"] == [0.1, 0.2, 0.3, 0.05]


def test_shard_slice() -> None:
    assert shard_slice("0:", 5) == range(0, 5)
    assert shard_slice(":3", 5) == range(0, 3)
    assert shard_slice("2:4", 5) == range(2, 4)
    assert shard_slice("3:100", 5) == range(3, 5)
    with pytest.raises(ValueError, match="0 <= A <= B"):
        shard_slice("4:2", 5)


def test_choices_are_checked_however_the_config_is_built(tmp_path: Path) -> None:
    """A Literal field refuses any other value, from a file, from --set or in Python, on one line
    that names the choices; the error is a UserError (the CLI prints it) and still a ValueError."""
    from dpal.errors import ConfigError, UserError

    path = tmp_path / "cfg.yaml"
    path.write_text("teacher_global_token: cls\n")
    for make in (
        lambda: resolve(CacheConfig, str(path), {}, []),
        lambda: resolve(CacheConfig, None, {}, ["teacher_global_token=cls"]),
        lambda: CacheConfig(teacher_global_token="cls"),
    ):
        with pytest.raises(ConfigError) as e:
            make()
        assert str(e.value) == "teacher_global_token 'cls' is not one of auto, mean"
        assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert resolve(CacheConfig, None, {"teacher_global_token": "mean"}, []).teacher_global_token == "mean"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            {"num_views": "3", "teacher_layer": "-2", "seed": None},
            {"num_views": 3, "teacher_layer": -2, "seed": 0},
        ),
        (
            {"progress_seconds": "1e-1", "teacher_layer": "none"},
            {"progress_seconds": 0.1, "teacher_layer": None},
        ),
        ({"views": {"global_size": "[64, 32]"}, "strict": True}, {"strict": True}),
    ],
)
def test_flag_texts_are_read_as_the_field_type(flags: dict, expected: dict) -> None:
    """A command-line flag's text (what typer hands over for every config option) becomes the field's
    type; a None flag is one not given."""
    cfg = resolve(CacheConfig, None, flags, [])
    for k, v in expected.items():
        assert getattr(cfg, k) == v and type(getattr(cfg, k)) is type(v), k
    if "views" in flags:
        assert cfg.views.global_size == (64, 32)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"num_views": "2.5"}, "num_views (--views) must be an integer, got 2.5"),  # was truncated to 2
        ({"num_views": "true"}, "num_views (--views) must be an integer, got 'true'"),  # was int(True) == 1
        ({"num_views": "[3]"}, "num_views (--views) must be an integer, got '[3]'"),
        ({"base_lr": "fast"}, None),
    ],
)
def test_bad_flag_texts_name_the_field(flags: dict, needle: str | None) -> None:
    if needle is None:  # base_lr is DistillConfig's
        with pytest.raises(ValueError, match="base_lr must be a number, got 'fast'"):
            resolve(DistillConfig, None, flags, [])
        return
    with pytest.raises(ValueError) as e:
        resolve(CacheConfig, None, flags, [])
    assert str(e.value) == needle


def test_every_field_states_its_help() -> None:
    """`--help` and the --set section lists read each field's help from config.py: none may lack it."""
    import dataclasses

    from dpal.config import SlurmConfig

    for cls in (CacheConfig, DistillConfig, SlurmConfig, ViewRecipe):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10 and f.metadata["help"].endswith("."), (cls, f.name)


@pytest.mark.parametrize(
    "setting", [{"val_every": 10}, {"val_images": 4}, {"val_every": 10, "val_images": 4}]
)
def test_validation_settings_without_anything_to_validate_are_refused(setting: dict) -> None:
    with pytest.raises(ConfigError, match="add --val-store .* or --eval-reid"):
        DistillConfig(store="s", out="o", **setting)
    # with something to validate they are taken
    cfg = DistillConfig(store="s", out="o", val_store="v", **setting)
    assert (cfg.val_every, cfg.val_images) == (setting.get("val_every", 500), setting.get("val_images"))
    # the default interval passes alone: config.yaml files of runs written before the check hold it
    assert DistillConfig(store="s", out="o", val_every=500).val_every == 500


def test_loggers_are_choices_given_once_each(tmp_path: Path) -> None:
    """--logger: a tuple of choices; a single text is a list of one, an old config.yaml without the
    key loads with none, an unknown or repeated one is refused naming it."""
    assert build(DistillConfig, {"loggers": ["mlflow", "wandb"]}).loggers == ("mlflow", "wandb")
    assert build(DistillConfig, {"loggers": "tensorboard"}).loggers == ("tensorboard",)
    assert resolve(DistillConfig, None, {}, ["loggers=mlflow"]).loggers == ("mlflow",)
    old = tmp_path / "config.yaml"
    old.write_text(dump_yaml(DistillConfig(store="s", out="o")).replace("loggers: []\n", ""))
    assert "loggers" not in old.read_text()
    assert resolve(DistillConfig, str(old), {}, []).loggers == ()
    with pytest.raises(ConfigError, match="loggers 'neptune' is not one of tensorboard, wandb, mlflow"):
        build(DistillConfig, {"loggers": ["mlflow", "neptune"]})
    with pytest.raises(ConfigError, match=r"loggers \['wandb', 'wandb'\] names one twice"):
        build(DistillConfig, {"loggers": ["wandb", "wandb"]})


def test_old_key_spellings_read_the_same_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stage one's view section was `recipe` and K was `views`; stage two's local-size override was
    `recipe_local_size`. Old config files and `--set`s give the same config, each renamed key said
    in one line; a saved config (store attribute, checkpoint) is upgraded silently."""
    from dpal.config import DistillConfig, upgrade_keys

    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("views: 2\nrecipe:\n  global_size: [64, 32]\n")
    new.write_text("num_views: 2\nviews:\n  global_size: [64, 32]\n")
    want = resolve(CacheConfig, str(new), {}, ["views.local_size=[32,16]"])
    with caplog.at_level("WARNING", logger="dpal.config_load"):
        got = resolve(CacheConfig, str(old), {}, ["recipe.local_size=[32,16]"])
    assert got == want and got.num_views == 2 and got.views.local_size == (32, 16)
    assert [r.getMessage() for r in caplog.records] == [
        f"config file {old}: the key 'views' is now 'num_views'; read as 'num_views' (rename it)",
        f"config file {old}: the key 'recipe' is now 'views'; read as 'views' (rename it)",
        "--set: the key 'recipe' is now 'views'; read as 'views' (rename it)",
    ]
    assert resolve(DistillConfig, None, {}, ["recipe_local_size=[64,48]"]).local_size == (64, 48)
    caplog.clear()
    saved = {"views": 4, "recipe": {"flip_p": 0.25}, "seed": 1}
    assert upgrade_keys(CacheConfig, saved) == {"seed": 1, "num_views": 4, "views": {"flip_p": 0.25}}
    assert upgrade_keys(DistillConfig, {"recipe": "proteus", "recipe_local_size": None}) == {
        "recipe": "proteus",  # stage two's --recipe keeps its name
        "local_size": None,
    }
    assert caplog.records == []
    # a store's `config` attribute keeps the earlier spelling, in the same key order
    from dpal.config import stored_keys

    now = to_dict(CacheConfig())
    stored = stored_keys(CacheConfig, now)
    assert [k for k in stored if k in ("views", "recipe")] == ["views", "recipe"]
    assert stored["views"] == 4 and list(stored)[-1] == "recipe" and list(now)[-1] == "views"
    assert upgrade_keys(CacheConfig, stored) == now and caplog.records == []
