"""The `dpal` command line: parse, resolve the config, set up logging, call one function.

A user's mistake (a missing corpus, an unknown teacher, a bad `--set` key, an unwritable output,
a mismatched resume) is printed as one line starting with `error:` and exits 2, never with a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="dpal: distill a large human-centric teacher into a lightweight ViT (DPAL, arXiv 2508.07144).\n\n"
    "Stage one, [bold]cache-teacher[/bold], runs the teacher once and writes a store; stage two, "
    "[bold]distill[/bold], trains students from it, as often as you like.",
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a teacher store.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate students and teachers.")
app.add_typer(store_app, name="store")
app.add_typer(eval_app, name="eval")

logger = logging.getLogger("dpal")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set key=value (dotted for sections, "
                 "e.g. --set recipe.global_size=[128,64]). Repeatable; applied last."),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML or TOML file of config keys.")]


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    else:  # a log file: one plain line per message, never wrapped at 80 columns
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    # dask's own INFO chatter (nannies starting and closing) is not the user's business.
    handler.addFilter(lambda r: r.name.startswith("dpal") or r.levelno >= logging.WARNING)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


def user_errors(fn: Callable) -> Callable:
    """Turn the user's mistakes into one `error:` line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dpal.store import StoreError
        from dpal.trainer.data import LoaderError
        from dpal.trainer.rundir import RunDirError

        known: tuple[type[BaseException], ...] = (ValueError, StoreError, LoaderError, RunDirError,
                                                  FileNotFoundError, PermissionError, NotADirectoryError,
                                                  IsADirectoryError, FileExistsError)
        try:
            from dpal.pipeline.cache import StrictModeError

            known += (StrictModeError,)
        except ImportError:
            pass
        try:
            return fn(*args, **kwargs)
        except known as e:
            msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("cache-teacher")
@user_errors
def cache_teacher(
    corpus: Annotated[str | None, typer.Option(help="Folder of images, a .txt list of paths, or WebDataset "
                                               ".tar shards (path, glob, {a..b}, fsspec URL).")] = None,
    out: Annotated[str | None, typer.Option(help="Store to create, or to resume if it exists.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Preset (path-b, efficientnet-lite2) or a timm model "
                                                "name. \\[default: efficientnet-lite2]")] = None,
    teacher_checkpoint: Annotated[str | None, typer.Option(help="Teacher weights file (PATH-B .pth, "
                                                           "timm state dict).")] = None,
    teacher_layer: Annotated[int | None, typer.Option(help="Use the output of ViT block i instead of the "
                                                      "final normalised tokens.")] = None,
    random_init: Annotated[bool | None, typer.Option("--random-init", help="Allow a randomly initialised "
                                                     "teacher (tests and benchmarks only).")] = None,
    views: Annotated[int | None, typer.Option(help="K: replayable views cached per image. \\[default: 4]")] = None,
    dtype: Annotated[str | None, typer.Option(help="float16, bfloat16, int8 (per-token scale) or float32. "
                                              "\\[default: float16]")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Images per shard (unit of work and resume). "
                                                   "\\[default: 256]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the view parameters. \\[default: 0]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Views per teacher forward. \\[default: 32]")] = None,
    workers: Annotated[int | None, typer.Option(help="Local dask worker processes, one per GPU. "
                                                "\\[default: 1]")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running dask scheduler "
                                                  "(tcp://host:8786).")] = None,
    slurm: Annotated[bool | None, typer.Option("--slurm", help="Start dask workers on SLURM through "
                                               "dask-jobqueue; see --set slurm.partition=..., slurm.jobs, "
                                               "slurm.gpus_per_job, slurm.walltime.")] = None,
    shards: Annotated[str | None, typer.Option(help="Run only shards A:B in this process, without dask "
                                               "(SLURM array jobs).")] = None,
    strict: Annotated[bool | None, typer.Option("--strict", help="Fail on the first bad image instead of "
                                                "skipping and recording it.")] = None,
    no_embed_images: Annotated[bool, typer.Option("--no-embed-images", help="Reference the corpus instead of "
                                                  "copying images into the store.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. \\[default: auto]")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Time the teacher on a few images and print the "
                                          "store size and run time; with --slurm also the job script.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (nor, in a log, progress "
                                        "lines).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (or dry-run) as JSON.")] = False,
) -> None:
    """Stage one: run the teacher once over a corpus and write K replayable views' targets to a store.

    Rerunning the same command resumes: finished shards are skipped. A rerun with another teacher,
    recipe, seed, K, dtype, batch size, max_pixels or device is refused.
    """
    from dpal.config import CacheConfig, resolve

    _setup_logging(False)
    flags = dict(corpus=corpus, out=out, teacher=teacher, teacher_checkpoint=teacher_checkpoint,
                 teacher_layer=teacher_layer, random_init=random_init, views=views, dtype=dtype,
                 shard_size=shard_size, seed=seed, batch_size=batch_size, workers=workers, scheduler=scheduler,
                 use_slurm=slurm, shards=shards, strict=strict, device=device,
                 embed_images=False if no_embed_images else None)
    cfg = resolve(CacheConfig, str(config) if config else None, flags, set_ or [])
    if not cfg.corpus:
        raise ValueError("--corpus is required (a folder of images, a .txt list, or .tar shards)")
    if not dry_run and not cfg.out:
        raise ValueError("--out is required (the store to create or resume)")
    from dpal.pipeline.engine import dry_run as do_dry_run
    from dpal.pipeline.engine import run_cache, slurm_cluster

    if dry_run:
        rep = do_dry_run(cfg)
        if cfg.use_slurm:
            cluster = slurm_cluster(cfg)
            try:
                rep["slurm_job_script"] = cluster.job_script()
            finally:
                cluster.close()
        if as_json:
            typer.echo(json.dumps(rep, indent=1))
            return
        _print_dry_run(rep)
        return
    summary = run_cache(cfg, show_progress=not quiet)  # a bar on a terminal, else plain lines
    if as_json:
        typer.echo(json.dumps(summary.__dict__))
    else:
        typer.echo(summary.line())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _print_dry_run(rep: dict[str, Any]) -> None:
    t = rep["teacher"]
    typer.echo(f"teacher        {t['name']} ({t.get('arch')}, D={t['embed_dim']}, sha256 "
               f"{(t.get('checkpoint_sha256') or 'random-init')[:12]}) on {rep['device']}")
    if rep["qkv_std_ratio"] is not None:
        typer.echo(f"qkv std ratio  last block / previous block = {rep['qkv_std_ratio']:.3f}"
                   + ("   <- the last block looks untrained; consider --teacher-layer -2"
                      if rep["qkv_std_ratio"] < 0.2 else ""))
    typer.echo(f"corpus         {rep['num_images']} images x K={rep['num_views']} views, {rep['num_shards']} shards")
    typer.echo(f"bytes per view {_human(rep['bytes_per_view'])} ({rep['dtype']})")
    typer.echo(f"store size     {_human(rep['store_bytes'])} (features {_human(rep['feature_bytes'])}, "
               f"images {_human(rep['image_bytes'])})")
    secs = rep["estimated_seconds"]
    when = f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"
    typer.echo(f"teacher rate   {1 / rep['seconds_per_view']:.1f} views/s per worker; estimated {when} on "
               f"{rep['workers']} worker(s) (teacher time only)")
    if "slurm_job_script" in rep:
        typer.echo("\nSLURM job script (one per worker job):\n" + rep["slurm_job_script"])


@store_app.command("info")
@user_errors
def store_info_cmd(
    store: Annotated[Path, typer.Argument(help="Store written by `dpal cache-teacher`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts, shapes, dtype, bytes per view, skipped images, shards done and teacher identity."""
    from dpal.store import TeacherIdentity, store_info

    info = store_info(store)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    t = TeacherIdentity.from_attrs(info["teacher"])  # checked by the store when read: typed here
    lines = [
        f"store          {info['path']} (schema {info['schema_version']}, dpal {info['dpal_version']})",
        f"complete       {info['complete']} ({info['shards_done']}/{info['num_shards']} shards of "
        f"{info['shard_size']} images)",
        f"images         {info['num_images']} indexed, {info['num_cached_images']} cached, "
        f"{info['num_skipped_images']} skipped; K = {info['num_views']} views",
        f"dtype          {info['dtype']}, {_human(info['bytes_per_view'])} per view",
        "shapes         " + ", ".join(f"{k} {tuple(v)}" for k, v in info["shapes"].items()),
        f"teacher        {t.name} ({t.arch}, D={t.embed_dim}, layer {t.layer}, "
        f"sha256 {t.checkpoint_sha256 or f'random-init seed {t.random_init_seed}'})",
        f"images         {'embedded (WebDataset tars)' if info['embed_images'] else 'referenced from the corpus'}",
    ]
    for s in info["skipped"][:20]:
        lines.append(f"  skipped      {s['key']}: {s['reason']}")
    if len(info["skipped"]) > 20:
        lines.append(f"  ... and {len(info['skipped']) - 20} more (--json lists all)")
    typer.echo("\n".join(lines))


@store_app.command("verify")
@user_errors
def store_verify_cmd(
    store: Annotated[Path, typer.Argument(help="Store written by `dpal cache-teacher`.")],
) -> None:
    """Check the store's metadata (attributes, every zarr.json, the index) and every shard's files
    against the checksums recorded when they were written; exit 1 naming what is bad or missing."""
    from dpal.store import verify_store

    rep = verify_store(store)
    for problem in rep["metadata"]:
        typer.echo(f"BAD store metadata: {problem}")
    for shard, problems in rep["bad"].items():
        typer.echo(f"BAD shard {shard}: {'; '.join(problems)}")
    if rep["not_done"]:
        typer.echo(f"NOT DONE {len(rep['not_done'])} shard(s): {', '.join(rep['not_done'][:20])}")
    if rep["ok"]:
        typer.echo(f"ok: {rep['shards_checked']} shards verified")
        return
    if rep["metadata"]:
        typer.echo("the store's own metadata cannot be rewritten shard by shard: restore the store from a copy, "
                   "or rebuild it with `dpal cache-teacher --out NEW`")
    elif rep["bad"]:
        typer.echo("rerun the same `dpal cache-teacher` command after deleting the bad shards' markers "
                   f"({store}/shards/<shard>.json) to rewrite them")
    else:
        typer.echo("rerun the same `dpal cache-teacher` command to finish the shards not done")
    raise typer.Exit(1)


@app.command("distill")
@user_errors
def distill(
    store: Annotated[str | None, typer.Option(help="Store written by `dpal cache-teacher`.")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory: checkpoints/, metrics.jsonl, config.yaml.")] = None,
    student: Annotated[str | None, typer.Option(help="dpal_vit_tiny (the paper's) or any timm ViT name. "
                                                "\\[default: dpal_vit_tiny]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Schedule length in epochs. \\[default: 200]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop at this step without changing the schedule; "
                                                  "a later run resumes.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per rank per step. \\[default: 256]")] = None,
    base_lr: Annotated[float | None, typer.Option(help="LR per 256 images; scaled by the global batch. "
                                                  "\\[default: 2.5e-4]")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warmup, in epochs. \\[default: 10]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step. \\[default: 1]")] = None,
    num_workers: Annotated[int | None, typer.Option(
        help="DataLoader worker processes that decode and replay the views. \\[default: 2 on CPU; on a GPU, "
             "the CPUs per local rank minus one, at most 16]")] = None,
    resume: Annotated[str | None, typer.Option(help="auto (newest checkpoint in --out), PATH, or none "
                                               "(refused where --out holds a run; see --fresh). "
                                               "\\[default: auto]")] = None,
    fresh: Annotated[bool | None, typer.Option("--fresh", help="Start over where --out holds a run: move that "
                                               "run aside whole to OUT.old-<UTC time> first.")] = None,
    online_teacher: Annotated[bool | None, typer.Option("--online-teacher", help="Run the teacher in the loop "
                                                        "on the same replayed views instead of reading "
                                                        "its targets.")] = None,
    allow_incomplete: Annotated[bool | None, typer.Option("--allow-incomplete", help="Train on the finished "
                                                          "shards of an incomplete store.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of init, sampler and local crops. \\[default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda. \\[default: auto]")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines.")] = False,
) -> None:
    """Stage two: train the student and D-PaDe on the store's targets (global, local, relation).

    Resumable: rerunning the same command continues from the newest checkpoint, bit for bit.
    SIGTERM or SIGUSR1 checkpoints at the next step and exits 0; Ctrl-C (SIGINT) does the same and
    exits 130. Under `torchrun --nproc-per-node N` each rank trains on its own slice of every batch.
    """
    from dpal.config import DistillConfig, resolve
    from dpal.trainer.train import train

    _setup_logging(False)
    flags = dict(store=store, out=out, student=student, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                 base_lr=base_lr, warmup_epochs=warmup_epochs, grad_accum=grad_accum, num_workers=num_workers,
                 resume=resume, fresh=fresh, online_teacher=online_teacher, allow_incomplete=allow_incomplete, seed=seed,
                 device=device)
    cfg = resolve(DistillConfig, str(config) if config else None, flags, set_ or [])
    if not cfg.store or not cfg.out:
        raise ValueError("--store and --out are required")
    result = train(cfg, show_progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        if result.stopped_by_signal:
            again = "the same command" if not cfg.fresh else "the same command without --fresh"
            typer.echo(f"stopped at step {result.step} by {result.signal_name} (epoch {result.epoch}, "
                       f"{result.seconds:.1f} s; checkpoint {result.last_checkpoint}); rerun {again} to resume")
        else:
            last = result.last_checkpoint or "none (no step was trained)"
            typer.echo(f"done: step {result.step}, epoch {result.epoch}, {result.seconds:.1f} s; last checkpoint {last}")
    if result.signal_name == "SIGINT":
        raise typer.Exit(130)  # interrupted, as a shell expects of Ctrl-C (SIGTERM/SIGUSR1: 0, for requeue)


@app.command("export")
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of `dpal distill` (or a checkpoint .pt).")],
    out: Annotated[Path, typer.Option("--out", help="Output FILE.safetensors (a .json config is written beside).")],
) -> None:
    """Write the student backbone as safetensors with plain timm ViT keys, plus a JSON config.

    Load it with `timm.create_model(name, num_classes=0, img_size=...)` and `load_state_dict(strict=True)`,
    or with `dpal.trainer.export.load_exported`.
    """
    from dpal.trainer.export import export_student
    from dpal.trainer.train import build_student_from_checkpoint

    model, ckpt = build_student_from_checkpoint(run_dir)
    path = export_student(model, ckpt["student_name"], tuple(ckpt["img_size"]), out,
                          timm_kwargs=ckpt.get("student_kwargs") or {})
    typer.echo(f"exported {ckpt['student_name']} at step {ckpt['step']} to {path} (+ {path.with_suffix('.json').name})")


@eval_app.command("reid")
@user_errors
def eval_reid(
    model: Annotated[str, typer.Option(help="An exported student (.safetensors), a run directory or checkpoint, "
                                       "a teacher preset (efficientnet-lite2, path-b), or a timm/dpal model name.")],
    data: Annotated[Path, typer.Option(help="Market-1501 layout: DIR/query and DIR/bounding_box_test.")],
    image_size: Annotated[list[int] | None, typer.Option(help="Input H and W: --image-size 256 --image-size 128. "
                                                         "\\[default: the model's own, else 256x128]")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Allow a bare model name without weights "
                                              "(a random baseline, on purpose).")] = False,
    teacher_checkpoint: Annotated[str | None, typer.Option(help="Weights for a teacher preset or timm name.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --random-init weights.")] = 0,
    feature: Annotated[str, typer.Option(help="A student's global feature: cls (its CLS token) or mean (mean "
                                         "patch token). Teachers give their stage-one global target.")] = "cls",
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """ReID on a Market-1501-style folder: rank the gallery by cosine similarity of global features.

    Market's protocol: junk images (pid -1) and same-pid same-camera gallery images are excluded
    per query; distractors (pid 0000) stay as negatives. Prints mAP and CMC Rank-1/5/10, in percent
    (--json too).
    """
    import torch

    from dpal.evaluate import evaluate_reid, resolve_model
    from dpal.reid import format_table

    if image_size is not None and len(image_size) != 2:
        raise ValueError("--image-size takes two values: --image-size H --image-size W")
    if not (data / "query").is_dir() or not (data / "bounding_box_test").is_dir():
        raise ValueError(f"--data {data} must hold query/ and bounding_box_test/ (Market-1501 layout)")
    with torch.no_grad():
        emb = resolve_model(model, tuple(image_size) if image_size else None, random_init, teacher_checkpoint,
                            seed, feature)
        res = evaluate_reid(emb, data, batch_size)
    if as_json:  # one unit wherever the command prints: percent, as the table shows and papers report
        pct = {k: 100 * v if k in ("mAP", "rank1", "rank5", "rank10") else v for k, v in res.items()}
        typer.echo(json.dumps({"model": emb.name, "feature": feature if emb.kind != "teacher" else "global", **pct,
                               "unit": "percent"}))
        return
    typer.echo(format_table([{"model": emb.name, **res}]))
    typer.echo(f"mAP and CMC in percent; {res['num_query']} queries, {res['num_gallery']} gallery images at "
               f"{res['image_size']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
