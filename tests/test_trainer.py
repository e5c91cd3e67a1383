"""The Trainer's seams (trainer/train.py): the step as one method that a benchmark or a test can feed
batches to, equal bit for bit to what `train` does; state_dict / load_state_dict; the checkpoint's
format version; the metrics read from the device only on log steps.

The tiny store and run of tests/stage2_util.py (10 images, batch 4, 2 steps per epoch).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest
import torch
from typer.testing import CliRunner

from dpal import __version__
from dpal.cli import app
from dpal.errors import InputError
from dpal.store import StoreReader
from dpal.trainer import metrics
from dpal.trainer.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointFormatError,
    build_student_from_checkpoint,
    find_resume,
    load_checkpoint,
)
from dpal.trainer.data import BatchDataset, EpochSampler, collate_requests, valid_rows
from dpal.trainer.distiller import Schedule, build_distiller
from dpal.trainer.train import Trainer, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    return u.make_store(u.make_corpus(root / "corpus"), root / "store")


def _seam(store: Path, **overrides: Any) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    """A Trainer built as `train` builds one (no run directory), with the run's schedule, and the loader
    batches of the run's first epoch (two steps), as a DataLoader with num_workers 0 ships them."""
    cfg = u.distill_config(store, store.parent / "unused", **overrides)
    reader = StoreReader(store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), cfg.batch_size, 1, 0, cfg.seed)
    dataset = BatchDataset(
        store, sampler, recipe, cfg.seed, cfg.grad_accum, mask_fix_sign=cfg.fix_mask_sign, finish_on_cpu=True
    )
    trainer = Trainer(
        cfg,
        reader.store_meta,
        recipe,
        CPU,
        schedule=Schedule.for_run(cfg, sampler.steps_per_epoch, 1),
        finish=lambda loaded: dataset.model_inputs(loaded, CPU),
    )
    trainer.steps_per_epoch = sampler.steps_per_epoch
    batches = [dataset[r] for r in collate_requests(sampler, 0, 0, 1, None, cfg.grad_accum)]
    return trainer, batches


def test_forward_backward_step_equals_the_distiller_forward(store: Path) -> None:
    trainer, batches = _seam(store)
    batch = trainer.model_inputs(batches[0])
    meta = trainer.meta
    ref = build_distiller(
        trainer.cfg, trainer.recipe, meta.embed_dim, meta.token_grid.global_grid
    ).train()  # the same init (seed 0)
    torch.manual_seed(7)  # drop path draws from the global RNG
    loss, ref_terms = ref(batch, 0)
    loss.backward()
    trainer.model.train()
    torch.manual_seed(7)
    terms = trainer.forward_backward_step(batch)
    assert terms.keys() == ref_terms.keys()
    assert all(torch.equal(torch.as_tensor(terms[k]), torch.as_tensor(ref_terms[k])) for k in terms)
    assert torch.equal(terms["total"], loss.detach())
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(grads[n], p.grad) for n, p in ref.named_parameters())
    # with grad_accum 2 the micro-batch's gradient is half, exactly (a power of two)
    half, _ = _seam(store, grad_accum=2)
    half.model.train()
    torch.manual_seed(7)
    half.forward_backward_step(batch)
    assert all(torch.equal(p.grad, grads[n] / 2) for n, p in half.model.named_parameters())


def test_train_step_is_the_step_train_takes(tmp_path: Path, store: Path) -> None:
    """Two `train_step`s fed the run's batches give the checkpoint and metrics of a 2-step `train`."""
    run = tmp_path / "run"
    train(u.distill_config(store, run, max_steps=2), show_progress=False)
    trainer, batches = _seam(store)
    it = iter(batches)
    results = [trainer.train_step(it) for _ in range(2)]
    assert (trainer.step, trainer.epoch, trainer.position) == (2, 1, 0)
    got, want = trainer.state_dict(), u.load_last(run)
    got["store_fingerprint"] = StoreReader(store).fingerprint()
    u.assert_same_training_state(got, want)
    logged = u.metrics(run)
    assert [
        {"step": i + 1, "epoch": r.epoch, "lr": r.lr, **r.terms.mean} for i, r in enumerate(results)
    ] == logged
    assert [r.images for r in results] == [4, 4]


def test_step_terms_stay_on_the_device_until_read(store: Path) -> None:
    trainer, batches = _seam(store, grad_accum=2)
    result = trainer.train_step(iter(batches))
    assert "mean" not in vars(result.terms)  # nothing read yet
    micro = result.terms.micro
    assert len(micro) == 2 and all(isinstance(m["total"], torch.Tensor) for m in micro)
    for k in ("global", "local", "relation", "route", "weight_l2", "total", "route_acc"):
        assert result.terms.mean[k] == float(micro[0][k]) / 2 + float(micro[1][k]) / 2, k
    assert result.terms.mean["route_weight"] == 0.1 / 2 + 0.1 / 2
    assert result.terms.progress_fields() == {
        k: result.terms.mean[k] for k in ("total", "global", "local", "relation")
    }


def test_a_run_reads_the_terms_only_on_log_steps(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_at: list[int] = []
    inner = metrics.StepTerms.mean.func

    def counted(self: metrics.StepTerms) -> dict[str, float]:
        read_at.append(len(read_at))
        return inner(self)

    monkeypatch.setattr(metrics.StepTerms, "mean", property(counted))
    ref = tmp_path / "every"
    train(u.distill_config(store, ref), show_progress=False)
    assert len(read_at) == 6
    read_at.clear()
    run = tmp_path / "sparse"
    train(u.distill_config(store, run, log_every=4), show_progress=False)
    assert len(read_at) == 2  # steps 4 and 6 (the last)
    assert u.metrics(run) == [u.metrics(ref)[i] for i in (3, 5)]


def test_state_dict_round_trip_continues_bit_for_bit(store: Path) -> None:
    a, batches = _seam(store)
    a.train_step(iter(batches[:1]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through a file's bytes, as a checkpoint goes
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    a.train_step(iter(batches[1:]))
    b, _ = _seam(store, seed=1)  # another initialisation, all of it replaced by the load
    b.load_state_dict(saved)
    again = b.state_dict()
    u.assert_same_training_state(again, saved)
    assert (b.step, b.epoch, b.position) == (1, 0, 1)
    b.train_step(iter(batches[1:]))
    u.assert_same_training_state(b.state_dict(), a.state_dict())


def test_a_checkpoint_of_another_format_version_is_refused_in_one_line(tmp_path: Path, store: Path) -> None:
    run = tmp_path / "run"
    train(u.distill_config(store, run, max_steps=2), show_progress=False)
    ckpt = u.load_last(run)
    assert ckpt["format_version"] == CHECKPOINT_VERSION == 1
    # every entry written is read back: no scheduler, scaler or sampler seed any more
    assert set(ckpt) == {
        "format_version",
        "dpal_version",
        "step",
        "model",
        "dpade",
        "optimizer",
        "sampler",
        "rng",
        "config",
        "store_fingerprint",
        "student_name",
        "img_size",
        "world_size",
        "student_kwargs",
        "config_changes",
        "nonfinite_steps",
    }
    assert ckpt["sampler"] == {"epoch": 1, "position": 0}
    newer = run / "checkpoints" / "step-00000003.pt"
    torch.save({**ckpt, "format_version": 2, "dpal_version": "9.0"}, newer)
    want = (
        f"{newer} is a dpal checkpoint of format 2 (written by dpal 9.0); this dpal ({__version__}) reads "
        "format 1: use the dpal version that wrote it, or a new --out"
    )
    for call in (
        lambda: load_checkpoint(newer),
        lambda: find_resume(run, "auto"),
        lambda: build_student_from_checkpoint(run),
        lambda: train(u.distill_config(store, run), show_progress=False),
    ):
        with pytest.raises(CheckpointFormatError) as err:
            call()
        assert str(err.value) == want
    result = CliRunner().invoke(app, u.distill_args(store, run))
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == f"error: {want}", result.output
    assert "Traceback" not in result.output
    # the resume never started over beside it: both checkpoints and the metrics are as they were
    assert u.checkpoint_steps(run) == [2, 3] and [m["step"] for m in u.metrics(run)] == [1, 2]
    assert load_checkpoint(run / "checkpoints" / "step-00000002.pt")["step"] == 2


def test_a_weights_only_checkpoint_is_refused_for_resume(tmp_path: Path, store: Path) -> None:
    run = tmp_path / "run"
    train(
        u.distill_config(store, run, max_steps=3, checkpoint_every=1, keep_last=1, keep_weights_only_older=1),
        show_progress=False,
    )
    reduced = run / "checkpoints" / "step-00000002.student.pt"
    with pytest.raises(InputError) as err:
        train(u.distill_config(store, tmp_path / "other", resume=str(reduced)), show_progress=False)
    assert str(err.value) == (
        f"{reduced} holds the student's weights only (for export and eval); resume from a "
        "whole checkpoint (step-N.pt)"
    )


def test_progress_reads_lazy_fields_only_when_it_draws() -> None:
    from dpal.progress import Progress

    calls: list[int] = []

    def fields_at(step: int) -> Any:
        return lambda: calls.append(step) or {"total": step / 4}

    stream = io.StringIO()
    p = Progress("distill", total=10, completed=4, interval_s=3600.0, stream=stream)
    for step in (5, 6, 7):
        p.update(step, 8, fields_at(step))
    assert calls == [] and stream.getvalue() == ""  # within the interval: nothing drawn, nothing read
    p.update(10, 8, fields_at(10))  # the last step always draws
    assert calls == [10] and "loss 2.5000" in stream.getvalue()
    # a run stopped between lines: the last line shows the last step's values, read at the end
    p = Progress("distill", total=10, completed=0, interval_s=3600.0, stream=stream)
    p.update(3, 8, fields_at(3))
    p.stop()
    assert calls == [10, 3] and stream.getvalue().splitlines()[-1].startswith("distill 3/10 steps")
    assert "loss 0.7500" in stream.getvalue().splitlines()[-1]


def test_grad_shares_measure_each_terms_gradient_without_changing_the_step(store: Path) -> None:
    """--grad-shares: on a log step, grad_norm/<term> is the norm of that weighted term's gradient on
    the student's parameters; the step's gradients are those of a run without it, bit for bit; off
    log steps nothing is measured."""
    terms_of = ("global", "local", "relation", "route", "weight_l2")
    measured, batches = _seam(store, grad_shares=True, log_every=1)
    plain, _ = _seam(store)
    alone, _ = _seam(store)
    batch = measured.model_inputs(batches[0])
    for t in (measured, plain, alone):
        t.model.train()
    torch.manual_seed(7)
    terms = measured.forward_backward_step(batch)
    torch.manual_seed(7)
    plain.forward_backward_step(batch)
    pairs = zip(measured.model.parameters(), plain.model.parameters(), strict=True)
    assert all(torch.equal(p.grad, q.grad) for p, q in pairs)
    assert sorted(k for k in terms if k.startswith("grad_norm/")) == sorted(
        f"grad_norm/{k}" for k in terms_of
    )
    for name in terms_of:  # each term backpropagated alone on a third copy of the same model
        alone.model.zero_grad(set_to_none=True)
        alone.model.record_parts = True
        torch.manual_seed(7)
        alone.model(batch, 0)
        alone.model.parts[name].backward()
        grads = [p.grad for p in alone.model.student.parameters() if p.grad is not None]
        want = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        assert torch.allclose(terms[f"grad_norm/{name}"], want, rtol=1e-5), name
    assert terms["grad_norm/global"] > 0 and terms["grad_norm/relation"] > 0
    every_other, _ = _seam(store, grad_shares=True, log_every=2)
    every_other.model.train()
    assert not any(k.startswith("grad_norm/") for k in every_other.forward_backward_step(batch))


def test_freeze_student_trains_the_heads_alone(store: Path) -> None:
    """--freeze-student: after two steps the student is its initialisation, bit for bit, and
    D-PaDe has moved; the optimizer holds no student parameter."""
    frozen, batches = _seam(store, freeze_student=True)
    init = {k: v.clone() for k, v in frozen.model.student.state_dict().items()}
    heads = {k: v.clone() for k, v in frozen.model.heads.state_dict().items()}
    frozen.schedule = Schedule.constant(1e-3)
    it = iter(batches)
    for _ in range(2):
        frozen.train_step(it)
    assert all(torch.equal(v, init[k]) for k, v in frozen.model.student.state_dict().items())
    assert any(not torch.equal(v, heads[k]) for k, v in frozen.model.heads.state_dict().items())
    student = {id(p) for p in frozen.model.student.parameters()}
    assert not any(id(p) in student for g in frozen.optimizer.param_groups for p in g["params"])
