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
        "views=3",
        "recipe.global_size=[128, 64]",
        "strict=true",
        "teacher_checkpoint=null",
        "out=",
        "slurm.partition=gpu",
        "recipe.flip_p=0.25",
    ]
    assert parse_sets(sets) == {
        "views": 3,
        "recipe": {"global_size": [128, 64], "flip_p": 0.25},
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
            "views=3",
            "recipe.global_size=[128,64]",
            "strict=yes",
            "random_init=on",
            "slurm.job_extra=[--constraint=a100]",
            "seed=7",
            "slurm.jobs=2",
            "teacher_layer=-2",
            "max_pixels=1000",
        ],
    )
    assert cfg.views == 3 and cfg.seed == 7 and cfg.strict is True and cfg.random_init is True
    assert cfg.recipe.global_size == (128, 64) and isinstance(cfg.recipe, ViewRecipe)
    assert cfg.recipe.local_size == ViewRecipe().local_size  # untouched nested keys keep their defaults
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
    assert ", views," in msg and ", recipe" in msg
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'recipe.global_sise'; known keys: recipe.global_size, "
        r"recipe.local_size",
    ):
        resolve(CacheConfig, None, {}, ["recipe.global_sise=[1,2]"])


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("views=abc", "views must be an integer, got 'abc'"),
        ("views=2.5", "views must be an integer, got 2.5"),
        ("views=true", "views must be a number"),
        ("views=0", "views must be >= 1, got 0"),
        ("strict=maybe", "strict must be true or false, got 'maybe'"),
        ("recipe.global_size=[1,2,3]", "recipe.global_size needs 2 values, got 3"),
        ("recipe.global_size=5", "recipe.global_size must be a list"),
        ("recipe.global_size=[40,16]", "multiples of 16"),
        ("recipe=3", "recipe must be a mapping"),
        ("dtype=fp8", "dtype 'fp8' is not one of float16, bfloat16, int8, int8-rotated, float32"),
        ("shards=abc", "--shards 'abc' must look like A:B"),
        ("recipe.person_alpha=2", "recipe.person_alpha must be in [0, 1]"),
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
        path.write_text("views: 2\nseed: 5\ndtype: int8\nbatch_size: 8\nrecipe:\n  global_size: [64, 32]\n")
    else:
        path.write_text(
            'views = 2\nseed = 5\ndtype = "int8"\nbatch_size = 8\n[recipe]\nglobal_size = [64, 32]\n'
        )
    flags = {"views": 3, "seed": None, "dtype": "bfloat16", "corpus": "c"}
    cfg = resolve(CacheConfig, str(path), flags, ["views=4", "recipe.local_size=[32,16]"])
    assert cfg.views == 4  # --set beats the flag and the file
    assert cfg.dtype == "bfloat16"  # the flag beats the file
    assert cfg.seed == 5 and cfg.batch_size == 8  # file beats the default; a None flag is not given
    assert cfg.recipe.global_size == (64, 32) and cfg.recipe.local_size == (32, 16)  # sections merge
    assert cfg.corpus == "c" and cfg.shard_size == 256  # default
    with pytest.raises(ValueError, match="not found"):
        resolve(CacheConfig, str(tmp_path / "missing.yaml"), {}, [])


def test_yaml_round_trip() -> None:
    cfg = resolve(
        CacheConfig, None, {"corpus": "x"}, ["recipe.jitter=[0.1,0.2,0.3,0.05]", "slurm.job_extra=[a,b]"]
    )
    again = build(CacheConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and to_dict(again)["recipe"]["jitter"] == [0.1, 0.2, 0.3, 0.05]


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
        ({"views": "3", "teacher_layer": "-2", "seed": None}, {"views": 3, "teacher_layer": -2, "seed": 0}),
        (
            {"progress_seconds": "1e-1", "teacher_layer": "none"},
            {"progress_seconds": 0.1, "teacher_layer": None},
        ),
        ({"recipe": {"global_size": "[64, 32]"}, "strict": True}, {"strict": True}),
    ],
)
def test_flag_texts_are_read_as_the_field_type(flags: dict, expected: dict) -> None:
    """A command-line flag's text (what typer hands over for every config option) becomes the field's
    type; a None flag is one not given."""
    cfg = resolve(CacheConfig, None, flags, [])
    for k, v in expected.items():
        assert getattr(cfg, k) == v and type(getattr(cfg, k)) is type(v), k
    if "recipe" in flags:
        assert cfg.recipe.global_size == (64, 32)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"views": "2.5"}, "views must be an integer, got 2.5"),  # was truncated to 2
        ({"views": "true"}, "views must be an integer, got 'true'"),  # was int(True) == 1
        ({"views": "[3]"}, "views must be an integer, got '[3]'"),
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
