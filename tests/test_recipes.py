"""The recipes of `dpal distill --recipe` (trainer/recipes.py) and dpal's ablations (trainer/distiller.py):
the baselines' losses against values computed by hand, the masked branch, the target check, the
config's refusals, and each recipe's run: trained, resumed bit for bit, refused when the recipe
changes, exported.

The tiny store and run of tests/stage2_util.py (10 images, batch 4, 2 steps per epoch; v0 32 x 16
is 2 patches, teacher width 192).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from dpal.cli import app
from dpal.config import DistillConfig
from dpal.errors import ConfigError, InputError
from dpal.store import FEATURES
from dpal.trainer.checkpoint import build_student_from_checkpoint
from dpal.trainer.distiller import build_distiller
from dpal.trainer.export import load_exported
from dpal.trainer.losses import masked_token_mse, proteus_feature_mse, token_mse, weighted_sum
from dpal.trainer.recipes import FeatureKD, ProteusDistiller, check_targets, needed_targets, proteus_mask
from dpal.trainer.student import create_student, student_tokens
from dpal.trainer.train import train


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    return u.make_store(u.make_corpus(root / "corpus"), root / "store")


def _cfg(**kw: Any) -> DistillConfig:
    return DistillConfig(store="s", out="o", **kw)


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------- losses, by hand


def test_token_mse_by_hand() -> None:
    # 2 tokens x 3 channels: squared differences (0, 4, 0) and (1, 1, 1) -> 7 / 6
    s = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    assert token_mse(s, t).item() == pytest.approx(7 / 6)
    assert token_mse(s.bfloat16(), t).dtype == torch.float32


def test_proteus_feature_mse_by_hand() -> None:
    # CLS (1, 1) vs g (0, 0): squared 1 + 1 = 2; patches (2, 0), (0, 0) vs (0, 0), (0, 1): 4 and 1.
    # All 3 tokens x 2 channels at once: (2 + 4 + 1) / 6 = 7 / 6 = (P x MSE(patches) + MSE(CLS)) / (1 + P)
    # = (2 x 5/4 + 1) / 3.
    cls, g = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    patches, f = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert proteus_feature_mse(cls, patches, g, f).item() == pytest.approx(7 / 6)


def test_masked_token_mse_by_hand() -> None:
    # image 0 masks both patches, image 1 its second: 3 tokens. Student zeros, teacher (1, 1), (2, 0) |
    # (9, 9) unmasked, (0, 3): squared 2 + 4 + 9 = 15 over 3 tokens x 2 channels = 2.5; the unmasked
    # (9, 9) does not count.
    s = torch.zeros(2, 2, 2)
    t = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[9.0, 9.0], [0.0, 3.0]]])
    masked = torch.tensor([[True, True], [False, True]])
    assert masked_token_mse(s, t, masked).item() == pytest.approx(2.5)


def test_weighted_sum_by_hand() -> None:
    # 0.5 x 2 + 2 x 3 = 7; a weight of 1 returns the term itself, bit for bit
    assert weighted_sum({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": 0.5, "b": 2.0}).item() == 7.0
    x = torch.tensor(0.1234567)
    assert torch.equal(weighted_sum({"a": x}, {"a": 1.0}), x)


def _constant_head(head: nn.Sequential, value: list[float]) -> None:
    """LayerNorm + Linear whose output is `value` for every token: zero weight, bias = value."""
    with torch.no_grad():
        head[1].weight.zero_()
        head[1].bias.copy_(torch.tensor(value))


def _tiny_student() -> nn.Module:
    torch.manual_seed(0)
    return create_student(u.STUDENT, img_size=(32, 16), **{**u.STUDENT_KWARGS, "drop_path_rate": 0.0})


def test_feature_kd_forward_by_hand() -> None:
    # projector output (1, 2) for every token (teacher width D = 2). g = (0, 0): (1 + 4) / 2 = 2.5.
    # F = (1, 2), (3, 2): squared (0, 0), (4, 0) -> 4 / 4 = 1. Weights 1 and 0.5: total 2.5 + 0.5 = 3.
    model = FeatureKD(_tiny_student(), 2, {"global": 1.0, "local": 0.5})
    _constant_head(model.heads, [1.0, 2.0])
    batch = {
        "v0": torch.randn(1, 3, 32, 16),
        "g_t": torch.zeros(1, 2),
        "local_t": torch.tensor([[[1.0, 2.0], [3.0, 2.0]]]),
    }
    total, terms = model(batch, 0)
    assert (terms["global"].item(), terms["local"].item(), total.item()) == (2.5, 1.0, 3.0)


def test_proteus_forward_by_hand() -> None:
    # D = 2, two images, P = 2; heads constant: token (1, 0), feature (0, 1), patch (0, 0).
    # token: CLS (1, 0) vs g (0, 0) -> 1 / 2 = 0.5.
    # feature: per image the tokens (1, 0), (0, 1), (0, 1) vs g (0, 0), F (0, 1), (1, 1): squared
    #   1 + 0 + 1 = 2 of 6 values -> 1/3 (both images alike).
    # patch: mask_probability 0.5 masks image 0 only, mask_ratio 0.5 one of its 2 patches. The patch
    #   head gives (0, 0) there, against F's (0, 1) (squared 1) or (1, 1) (squared 2), over 2 channels:
    #   1/2 or 1 as the drawn mask says (checked first).
    model = ProteusDistiller(_tiny_student(), 2, seed=0, mask_ratio=0.5, mask_probability=0.5)
    _constant_head(model.heads.token, [1.0, 0.0])
    _constant_head(model.heads.feature, [0.0, 1.0])
    _constant_head(model.heads.patch, [0.0, 0.0])
    f = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    batch = {
        "index": torch.tensor([3, 7]),
        "v0": torch.randn(2, 3, 32, 16),
        "g_t": torch.zeros(2, 2),
        "local_t": f.expand(2, 2, 2).clone(),
    }
    total, terms = model(batch, 0)
    masked = proteus_mask(torch.tensor([3]), 0, 0, 2, 0.5)[0]
    assert masked.sum() == 1
    want_patch = 0.5 if masked[0] else 1.0
    assert terms["token"].item() == 0.5
    assert terms["feature"].item() == pytest.approx(1 / 3)
    assert terms["patch"].item() == want_patch
    assert total.item() == pytest.approx(0.5 + 1 / 3 + want_patch)


def test_proteus_mask_is_a_function_of_seed_image_and_epoch() -> None:
    # P = 10 at ratio 0.3: int(3.0) = 3 patches per image; ratio 0.01 still masks one
    a = proteus_mask(torch.tensor([5, 6]), 2, 0, 10, 0.3)
    assert a.shape == (2, 10) and a.sum(dim=1).tolist() == [3, 3]
    assert torch.equal(a, proteus_mask(torch.tensor([5, 6]), 2, 0, 10, 0.3))
    assert torch.equal(a[1:], proteus_mask(torch.tensor([6]), 2, 0, 10, 0.3))  # not of the batch around it
    many = torch.arange(40)
    assert not torch.equal(proteus_mask(many, 2, 0, 10, 0.3), proteus_mask(many, 3, 0, 10, 0.3))
    assert not torch.equal(proteus_mask(many, 2, 0, 10, 0.3), proteus_mask(many, 2, 1, 10, 0.3))
    assert proteus_mask(torch.tensor([1]), 0, 0, 10, 0.01).sum() == 1


def test_the_mask_token_hides_the_masked_patch() -> None:
    # Two inputs that differ only in the pixels of patch 0 (of 2): unmasked, their tokens differ; with
    # patch 0 masked, both see the mask token there and every token is equal bit for bit.
    student = _tiny_student().eval()
    x = torch.randn(1, 3, 32, 16)
    y = x.clone()
    y[..., :16, :] += 1.0  # patch 0 is the top 16 x 16
    token = torch.randn(1, 1, student.embed_dim)
    mask = torch.tensor([[True, False]])
    with torch.no_grad():
        assert not torch.equal(student_tokens(student, x), student_tokens(student, y))
        assert torch.equal(student_tokens(student, x, mask, token), student_tokens(student, y, mask, token))
        assert torch.equal(
            student_tokens(student, x, torch.zeros_like(mask), token), student_tokens(student, x)
        )


# ---------------------------------------------------------------- dpal's ablations


def _batch(b: int = 2, d: int = 192, p: int = 2, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "v0": torch.randn(b, 3, 32, 16, generator=g),
        "v1": torch.randn(b, 3, 16, 16, generator=g),
        "v2": torch.randn(b, 3, 16, 16, generator=g),
        "ic": torch.randn(b, 3, 32, 48, generator=g),
        "g_t": torch.randn(b, d, generator=g),
        "local_t": torch.randn(b, p, d, generator=g),
        "rel_t": torch.randn(b, t, t, generator=g),
    }


def _distiller(**kw: Any) -> nn.Module:
    cfg = u.distill_config(Path("s"), Path("o"), **kw)
    return build_distiller(cfg, u.RECIPE, 192, (2, 1)).train()


def test_dpal_weights_scale_the_terms_and_zero_skips_the_passes() -> None:
    batch = _batch()
    torch.manual_seed(1)
    total, terms = _distiller(global_weight=0.5, local_weight=2.0, relation_weight=0.25)(batch, 0)
    # the total as the terms give it: 0.5 Lg + 2 Ll + 0.25 Lr + 0.1 x route + weight_l2 (epoch 0)
    want = (
        0.5 * terms["global"]
        + 2.0 * terms["local"]
        + 0.25 * terms["relation"]
        + 0.1 * terms["route"]
        + terms["weight_l2"]
    )
    assert torch.equal(total.detach(), want) and torch.equal(terms["total"], want)
    # relation off: Ic and its targets are never read; global off: v1 and v2 neither
    no_ic = {k: v for k, v in batch.items() if k not in ("ic", "rel_t")}
    _, terms = _distiller(relation_weight=0.0)(no_ic, 0)
    assert "relation" not in terms and {"global", "local", "route", "total"} <= terms.keys()
    only_local = {k: v for k, v in no_ic.items() if k not in ("v1", "v2", "g_t")}
    total, terms = _distiller(global_weight=0.0, relation_weight=0.0)(only_local, 0)
    assert set(terms) == {"local", "route", "weight_l2", "total", "route_weight", "route_acc"}
    assert torch.equal(total.detach(), terms["local"] + 0.1 * terms["route"] + terms["weight_l2"])


def test_linear_projector_replaces_dpade() -> None:
    model = _distiller(projector="linear")
    assert not hasattr(model, "dpade") and model.checkpoint_key == "heads"
    assert [tuple(p.shape) for p in model.heads.parameters()] == [(192, 48), (192,)]  # one Linear(d, D)
    total, terms = model(_batch(), 0)
    assert set(terms) == {"global", "local", "relation", "total"}  # no router, no expert term
    assert torch.equal(total.detach(), terms["global"] + terms["local"] + terms["relation"])
    total.backward()
    assert model.heads.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- targets and config


def test_needed_targets_and_the_refusal_naming_them() -> None:
    assert needed_targets(_cfg()) == FEATURES == ("global", "local", "relation")
    assert needed_targets(_cfg(relation_weight=0.0)) == ("global", "local")
    assert (
        needed_targets(_cfg(recipe="proteus"))
        == needed_targets(_cfg(recipe="feature-kd"))
        == ("global", "local")
    )
    for cfg in (_cfg(relation_weight=0.0), _cfg(recipe="proteus"), _cfg(recipe="feature-kd")):
        check_targets(cfg, ("global", "local"), "store S")
    with pytest.raises(InputError) as e:
        check_targets(_cfg(), ("global", "local"), "store S")
    assert str(e.value).startswith(
        "--recipe dpal needs the relation targets, which store S lacks (it holds global, local)"
    )
    with pytest.raises(InputError, match="--recipe feature-kd needs the local targets, which store S lacks"):
        check_targets(_cfg(recipe="feature-kd"), ("global",), "store S")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"recipe": "proteus", "relation_weight": 0.0}, "relation_weight does not apply to --recipe proteus"),
        ({"recipe": "feature-kd", "projector": "linear"}, "projector does not apply to --recipe feature-kd"),
        ({"mask_ratio": 0.25}, "mask_ratio does not apply to --recipe dpal"),
        (
            {"global_weight": 0.0, "local_weight": 0.0, "relation_weight": 0.0},
            "every objective's weight at 0",
        ),
        (
            {"recipe": "feature-kd", "global_weight": 0.0, "local_weight": 0.0},
            "every objective's weight at 0",
        ),
        ({"local_weight": -1.0}, "must be >= 0"),
        ({"recipe": "proteus", "mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\)"),
        ({"recipe": "proteus", "mask_probability": 0.0}, r"mask_probability in \(0, 1\]"),
        ({"recipe": "distill"}, "recipe 'distill' is not one of dpal, proteus, feature-kd"),
    ],
)
def test_config_refuses_what_the_recipe_does_not_read(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**kw)


def test_cli_recipe_and_a_foreign_key_refused_in_one_line(tmp_path: Path) -> None:
    # --recipe is the config field's option (test_cli checks every field's --help row)
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--store",
            "s",
            "--out",
            str(tmp_path / "o"),
            "--recipe",
            "proteus",
            "--set",
            "projector=linear",
        ],
    )
    assert result.exit_code == 2
    assert _error_lines(result.stderr) == [
        "error: projector does not apply to --recipe proteus (its keys: mask_ratio, "
        "mask_probability); drop it or choose the recipe it belongs to"
    ]


# ---------------------------------------------------------------- runs: train, resume, refuse, export

RUNS = {
    "proteus": {"recipe": "proteus"},
    "feature-kd": {"recipe": "feature-kd", "local_weight": 0.5},
    "dpal-linear": {"projector": "linear", "relation_weight": 0.5},
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_recipe_resumes_bit_for_bit(tmp_path: Path, store: Path, name: str) -> None:
    """A 2-step run interrupted after step 1 and resumed equals the uninterrupted 2-step run."""
    kw = RUNS[name]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(u.distill_config(store, whole, max_steps=2, **kw), show_progress=False)
    train(u.distill_config(store, split, max_steps=1, **kw), show_progress=False)
    result = train(u.distill_config(store, split, max_steps=2, **kw), show_progress=False)
    assert result.step == 2
    a, b = u.load_last(whole), u.load_last(split)
    u.assert_same_training_state(a, b)
    assert "dpade" not in a and a["config"]["recipe"] == kw.get("recipe", "dpal")
    assert u.metrics(whole) == u.metrics(split)
    assert yaml.safe_load((whole / "config.yaml").read_text())["recipe"] == kw.get("recipe", "dpal")
    first = u.metrics(whole)[0]
    assert first["total"] > 0 and all(
        k in first for k in {"proteus": ("token", "feature", "patch")}.get(name, ())
    )


def test_a_changed_recipe_is_refused_on_resume(tmp_path: Path, store: Path) -> None:
    run = tmp_path / "run"
    train(u.distill_config(store, run, max_steps=1, recipe="proteus"), show_progress=False)
    result = CliRunner().invoke(app, u.distill_args(store, run, "--recipe", "feature-kd"))
    assert result.exit_code == 2
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "recipe 'proteus' (now 'feature-kd')" in errors[0], result.stderr
    dpal_run = tmp_path / "dpal"
    train(u.distill_config(store, dpal_run, max_steps=1), show_progress=False)
    with pytest.raises(InputError, match=r"projector 'dpade' \(now 'linear'\)"):
        train(u.distill_config(store, dpal_run, max_steps=2, projector="linear"), show_progress=False)


def test_a_checkpoint_from_before_recipes_resumes_as_dpal(tmp_path: Path, store: Path) -> None:
    """A checkpoint whose config has no recipe or projector key was trained as dpal with D-PaDe."""
    run = tmp_path / "run"
    train(u.distill_config(store, run, max_steps=1), show_progress=False)
    path = run / "checkpoints" / "step-00000001.pt"
    ckpt = torch.load(path, weights_only=True)
    for k in (
        "recipe",
        "projector",
        "global_weight",
        "local_weight",
        "relation_weight",
        "mask_ratio",
        "mask_probability",
    ):
        del ckpt["config"][k]
    torch.save(ckpt, path)
    assert train(u.distill_config(store, run, max_steps=2), show_progress=False).step == 2
    with pytest.raises(InputError, match=r"recipe 'dpal' \(now 'proteus'\)"):
        train(u.distill_config(store, run, max_steps=3, recipe="proteus"), show_progress=False)


def test_export_of_a_proteus_run_loads(tmp_path: Path, store: Path) -> None:
    run = tmp_path / "run"
    train(u.distill_config(store, run, max_steps=2, recipe="proteus"), show_progress=False)
    path = tmp_path / "export" / "student.safetensors"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(path)])
    assert result.exit_code == 0, result.output
    model = load_exported(path)
    trained, ckpt = build_student_from_checkpoint(run)
    assert ckpt["config"]["recipe"] == "proteus" and ckpt["step"] == 2
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), trained.forward_features(x))
    # only the backbone is exported: no head, no mask token
    assert not any("mask_token" in k or k.startswith("heads") for k in model.state_dict())
    shutil.rmtree(run)
