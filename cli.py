"""The `dpal` command line: parse, resolve the config, set up logging, call one function.

A user's mistake (a missing corpus, an unknown teacher, a bad `--set` key, an unwritable output,
a mismatched resume) is printed as one line starting with `error:` and exits 2, never with a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dpal import __version__
from dpal.clihelp import Command, CommandGroup
from dpal.config import (
    PANEL_CONFIG,
    PANEL_DATA,
    PANEL_RUNTIME,
    CacheConfig,
    DistillConfig,
    choices,
    field_types,
    resolve,
)
from dpal.errors import ConfigError, UserError

app = typer.Typer(
    cls=CommandGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="dpal: distill a large human-centric teacher into a lightweight ViT (DPAL, arXiv 2508.07144).\n\n"
    "Stage one, [bold]cache-teacher[/bold], runs the teacher once and writes a store; stage two, "
    "[bold]distill[/bold], trains students from it, as often as you like.",
)
store_app = typer.Typer(cls=CommandGroup, no_args_is_help=True, help="Inspect and check a teacher store.")
eval_app = typer.Typer(cls=CommandGroup, no_args_is_help=True, help="Evaluate students and teachers.")
app.add_typer(store_app, name="store")
app.add_typer(eval_app, name="eval")

logger = logging.getLogger("dpal")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dpal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print dpal's version and exit."
        ),
    ] = False,
) -> None:
    pass


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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )


# A user's mistake: a UserError (ConfigError, InputError, StoreError, RunDirError, LoaderError,
# StrictModeError), or a missing or forbidden file they named (other OSErrors are not). Anything
# else, a plain ValueError included, is a bug and keeps its traceback.
_USER_ERRORS = (
    UserError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


def user_errors(fn: Callable) -> Callable:
    """Turn the user's mistakes (`_USER_ERRORS`) into one `error:` line and exit code 2. Any other
    exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


# ---------------------------------------------------------------- options from the config dataclasses


def _is_bool(tp: Any) -> bool:
    return tp is bool or (
        typing.get_origin(tp) in (typing.Union, types.UnionType)
        and set(typing.get_args(tp)) == {bool, type(None)}
    )


def _is_repeated(tp: Any) -> bool:
    """A field of choices that takes several (`tuple[Literal[...], ...]`): a repeatable option."""
    return typing.get_origin(tp) is tuple and choices(tp) is not None


def _metavar(tp: Any, registered: Callable[[], tuple[str, ...]] | None = None) -> str:
    """The value's shape in --help: a Literal's (or a `registered` function's) choices, a number's
    kind, a list or mapping (YAML)."""
    if (allowed := choices(tp) or (registered and registered())) is not None:
        return "[" + "|".join(map(str, allowed)) + "]"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    return (
        "LIST"
        if origin is tuple
        else "MAPPING"
        if origin is dict
        else {int: "INTEGER", float: "FLOAT"}.get(tp, "TEXT")
    )


def _default_text(f: dataclasses.Field) -> str | None:
    """What --help shows as the field's default: the dataclass default as YAML would write it, a rule
    (`default_help`) for a default decided at run time, nothing for flags, empty strings and lists, None."""
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if default is None or default in ("", ()) or isinstance(default, bool):
        return None
    if isinstance(default, (tuple, dict)):
        return json.dumps(list(default) if isinstance(default, tuple) else default)
    return str(default)


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One typer option per field of `cls` that is not a section: `--field-name VALUE`, or
    `--x/--no-x` for a bool. Each defaults to None (not given), so that the config file's value, or
    else the dataclass default, stands; the value's text is converted by the config (`resolve`), which
    names the field in its one-line error."""
    types_ = field_types(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            continue
        name = f.metadata.get("flag") or f.name.replace("_", "-")
        help_ = f.metadata["help"]
        listed = _metavar(types_[f.name]) == "LIST"
        if listed:
            help_ += " Repeat the option for each value, or give one YAML list."
        if (default := _default_text(f)) is not None:
            help_ += f" [default: {default}]"
        help_ = help_.replace("[", "\\[")  # rich markup: a literal [
        panel = f.metadata.get("panel")
        if _is_bool(types_[f.name]):
            info = typer.Option(
                f"--{name}/--no-{name}", help=help_, show_default=False, rich_help_panel=panel
            )
            annotation: Any = Annotated[bool | None, info]
        elif listed:  # --betas 0.9 --betas 0.95, or one YAML list: --betas '[0.9, 0.95]'
            info = typer.Option(
                f"--{name}", help=help_, metavar="LIST", show_default=False, rich_help_panel=panel
            )
            annotation = Annotated[list[str] | None, info]
        else:
            repeated = _is_repeated(types_[f.name])  # tuple[Literal[...], ...]: --logger a --logger b
            info = typer.Option(
                f"--{name}",
                help=help_ + (" Repeatable." if repeated and "repeatable" not in help_ else ""),
                metavar=_metavar(types_[f.name], f.metadata.get("choices")),
                show_default=False,
                rich_help_panel=panel,
            )
            annotation = Annotated[list[str] | None if repeated else str | None, info]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return params


def _set_help(cls: type) -> str:
    sections = [f for f in dataclasses.fields(cls) if f.metadata.get("section")]
    text = (
        "Override any config key: --set key=value, the value read as YAML (dotted keys for sections, e.g. "
        "--set views.global_size=[128,64]). Repeatable; applied last."
    )
    for f in sections:
        keys = ", ".join(g.name for g in dataclasses.fields(field_types(cls)[f.name]))
        text += f" Section {f.name} ({f.metadata['help'].rstrip('.').lower()}): {keys}."
    return text


def config_from_options(cls: type, options: dict[str, Any]) -> Any:
    """The config of class `cls` that a command's parsed options give; takes the config's own options
    (one per field, `config`, `set_`) out of `options`, leaving the command's."""
    flags = {f.name: options.pop(f.name) for f in dataclasses.fields(cls) if not f.metadata.get("section")}
    # a list option: not given (empty), given once (its text, read as YAML: "[0.9, 0.95]"), N times
    flags = {
        k: (v[0] if len(v) == 1 else v or None) if isinstance(v, (list, tuple)) else v
        for k, v in flags.items()
    }
    config, sets = options.pop("config"), options.pop("set_")
    return resolve(cls, str(config) if config else None, flags, sets or [])


def config_command(cls: type) -> Callable[[Callable], Callable]:
    """Give a command `fn(cfg, **own_options)` the options of config dataclass `cls`, `--config FILE`
    and `--set key=value`; it is called with the config they resolve to (defaults < file < flags <
    --set)."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in list(sig.parameters.values())[1:]]
        config_opt = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config",
                    help="YAML or TOML file of config keys; flags and --set override it.",
                    rich_help_panel=PANEL_CONFIG,
                ),
            ],
        )
        set_opt = inspect.Parameter(
            "set_",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                list[str] | None,
                typer.Option("--set", help=_set_help(cls), metavar="KEY=VALUE", rich_help_panel=PANEL_CONFIG),
            ],
        )

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            return fn(config_from_options(cls, kwargs), **kwargs)

        wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[*config_parameters(cls), config_opt, set_opt, *own], return_annotation=None
        )
        return wrapper

    return decorate


@app.command("cache-teacher", cls=Command)
@user_errors
@config_command(CacheConfig)
def cache_teacher(
    cfg: CacheConfig,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Time the teacher on a few images and print the "
            "store size and run time; with --slurm also the job script.",
            rich_help_panel=PANEL_DATA,
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress bar (nor, in a log, progress lines).",
            rich_help_panel=PANEL_RUNTIME,
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the summary (or dry-run) as JSON.", rich_help_panel=PANEL_DATA),
    ] = False,
) -> None:
    """Stage one: run the teacher once over a corpus and write K replayable views' targets to a store.

    Rerunning the same command resumes: finished shards are skipped. A rerun with another teacher,
    recipe, seed, K, dtype, batch size, max_pixels or device is refused.
    """
    _setup_logging(False)
    if not cfg.corpus:
        raise ConfigError("--corpus is required (a folder of images, a .txt list, or .tar shards)")
    if not dry_run and not cfg.out:
        raise ConfigError("--out is required (the store to create or resume)")
    from dpal.pipeline.dryrun import dry_run as do_dry_run
    from dpal.pipeline.engine import slurm_cluster

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
    from dpal.api import cache_teacher as run_cache

    summary = run_cache(config=cfg, show_progress=not quiet).summary  # a bar on a terminal, else lines
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
    typer.echo(
        f"teacher        {t['name']} ({t.get('arch')}, D={t['embed_dim']}, sha256 "
        f"{(t.get('checkpoint_sha256') or 'random-init')[:12]}) on {rep['device']}"
    )
    if rep["qkv_std_ratio"] is not None:
        typer.echo(
            f"qkv std ratio  last block / previous block = {rep['qkv_std_ratio']:.3f}"
            + (
                "   <- the last block looks untrained; consider --teacher-layer -2"
                if rep["qkv_std_ratio"] < 0.2
                else ""
            )
        )
    typer.echo(
        f"corpus         {rep['num_images']} images x K={rep['num_views']} views, {rep['num_shards']} shards"
    )
    typer.echo(
        f"bytes per view {_human(rep['bytes_per_view'])} ({rep['dtype']}, relation {_relation_line(rep)})"
        + (f"; plus R {_human(rep['rotation_bytes'])} once per store" if rep["rotation_bytes"] else "")
    )
    typer.echo(
        f"store size     {_human(rep['store_bytes'])} (features {_human(rep['feature_bytes'])}, "
        f"images {_human(rep['image_bytes'])})"
    )
    secs = rep["estimated_seconds"]
    when = (
        f"{secs / 3600:.1f} h" if secs >= 3600 else f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"
    )
    typer.echo(
        f"teacher rate   {1 / rep['seconds_per_view']:.1f} views/s per worker; estimated {when} on "
        f"{rep['workers']} worker(s) (teacher time only)"
    )
    if "slurm_job_script" in rep:
        typer.echo("\nSLURM job script (one per worker job):\n" + rep["slurm_job_script"])


def _relation_line(rep: dict[str, Any]) -> str:
    """How a store holds Ic's relation: `logits T x T`, or the factor and its rank."""
    if rep["relation_codec"] == "factor":
        return f"factor, rank {rep['relation_rank']} (float16 Z, float32 diagonal)"
    return "logits T x T"


def _token_lines(info: dict[str, Any]) -> list[str]:
    """`store info`'s line on how v0's tokens are coded and their error measured while writing
    (int8 stores); none for float stores."""
    err = info.get("token_error")
    if not info.get("token_codec") and not err:
        return []
    how = (
        f"int8 of x @ R, R (D x D float32, {_human(info['rotation_bytes'])}) stored once; decoded (q * s) @ R^T"
        if info.get("token_codec")
        else "int8, one float32 scale per token"
    )
    if err:
        how += "; mean relative error " + ", ".join(
            f"{name} {e['mean']:.3%} (worst shard {e['max']:.3%})" for name, e in err.items()
        )
    return [f"tokens         {how}"]


@store_app.command("info", cls=Command)
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
        f"relation       {_relation_line(info)}"
        + (
            f"; mean row KL {info['relation_kl_mean']:.3g} (worst shard {info['relation_kl_max']:.3g}), "
            "measured while writing"
            if info["relation_kl_mean"] is not None
            else ""
        ),
        *_token_lines(info),
        "shapes         " + ", ".join(f"{k} {tuple(v)}" for k, v in info["shapes"].items()),
        f"teacher        {t.name} ({t.arch}, D={t.embed_dim}, layer {t.layer}, "
        f"sha256 {t.checkpoint_sha256 or f'random-init seed {t.random_init_seed}'})",
        f"targets        views upsampled x{t.input_scale} for the teacher; "
        + (
            "one teacher feature per student token (native grid)"
            if t.target_grid == "native"
            else "the teacher's coarser map interpolated onto the student's grid"
        ),
        f"images         {'embedded (WebDataset tars)' if info['embed_images'] else 'referenced from the corpus'}",
    ]
    for s in info["skipped"][:20]:
        lines.append(f"  skipped      {s['key']}: {s['reason']}")
    if len(info["skipped"]) > 20:
        lines.append(f"  ... and {len(info['skipped']) - 20} more (--json lists all)")
    typer.echo("\n".join(lines))


@store_app.command("verify", cls=Command)
@user_errors
def store_verify_cmd(
    store: Annotated[Path, typer.Argument(help="Store written by `dpal cache-teacher`.")],
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also read every target value: each (row, view) against the crc32c its shard's marker "
            "recorded, and for NaN and inf (what training checks of the rows it reads).",
        ),
    ] = False,
) -> None:
    """Check the store's metadata (attributes, every zarr.json, the index) and every shard's files
    against the checksums recorded when they were written; exit 1 naming what is bad or missing."""
    from dpal.store import verify_store

    rep = verify_store(store, deep=deep)
    for problem in rep["metadata"]:
        typer.echo(f"BAD store metadata: {problem}")
    for shard, problems in rep["bad"].items():
        typer.echo(f"BAD shard {shard}: {'; '.join(problems)}")
    if rep["not_done"]:
        typer.echo(f"NOT DONE {len(rep['not_done'])} shard(s): {', '.join(rep['not_done'][:20])}")
    if rep.get("unrecorded"):
        typer.echo(
            f"note: {len(rep['unrecorded'])} shard(s) have no value checksums (written before dpal recorded "
            "them): their values were checked for NaN and inf only"
        )
    if rep["ok"]:
        typer.echo(f"ok: {rep['shards_checked']} shards verified" + (", every value read" if deep else ""))
        return
    if rep["metadata"]:
        typer.echo(
            "the store's own metadata cannot be rewritten shard by shard: restore the store from a copy, "
            "or rebuild it with `dpal cache-teacher --out NEW`"
        )
    elif rep["bad"]:
        typer.echo(
            "rerun the same `dpal cache-teacher` command after deleting the bad shards' markers "
            f"({store}/shards/<shard>.json) to rewrite them"
        )
    else:
        typer.echo("rerun the same `dpal cache-teacher` command to finish the shards not done")
    raise typer.Exit(1)


@app.command("distill", cls=Command)
@user_errors
@config_command(DistillConfig)
def distill(
    cfg: DistillConfig,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bar or progress lines.", rich_help_panel=PANEL_RUNTIME
        ),
    ] = False,
) -> None:
    """Stage two: train the student and D-PaDe on the store's targets (global, local, relation).

    Resumable: rerunning the same command continues from the newest checkpoint, bit for bit.
    SIGTERM or SIGUSR1 checkpoints at the next step and exits 0; Ctrl-C (SIGINT) does the same and
    exits 130. Under `torchrun --nproc-per-node N` each rank trains on its own slice of every batch.
    """
    from dpal.api import distill as run_distill

    _setup_logging(False)
    result = run_distill(config=cfg, show_progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        if result.stopped_by_signal:
            again = "the same command" if not cfg.fresh else "the same command without --fresh"
            typer.echo(
                f"stopped at step {result.step} by {result.signal_name} (epoch {result.epoch}, "
                f"{result.seconds:.1f} s; checkpoint {result.last_checkpoint}); rerun {again} to resume"
            )
        else:
            last = result.last_checkpoint or "none (no step was trained)"
            typer.echo(
                f"done: step {result.step}, epoch {result.epoch}, {result.seconds:.1f} s; last checkpoint {last}"
            )
    if result.signal_name == "SIGINT":
        raise typer.Exit(130)  # interrupted, as a shell expects of Ctrl-C (SIGTERM/SIGUSR1: 0, for requeue)


@app.command("plot", cls=Command)
@user_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of `dpal distill` (holds metrics.jsonl).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG to write. \\[default: RUN_DIR/curves.png]")
    ] = None,
) -> None:
    """Draw the training and validation curves of every loss term in RUN_DIR/metrics.jsonl as one PNG."""
    from dpal.trainer.plot import plot_run

    _setup_logging(False)  # its warning about damaged lines
    typer.echo(f"wrote {plot_run(run_dir, out)}")


@app.command("export", cls=Command)
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of `dpal distill` (or a checkpoint .pt).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="A model FOLDER (model.safetensors, config.json, README.md), or FILE.safetensors "
            "(its .json config beside).",
        ),
    ],
) -> None:
    """Write the student backbone with plain timm ViT keys: a model folder, or one .safetensors file.

    The folder is timm's (and the Hugging Face hub's) layout, with a model card made from the run:
    `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it, input config included. Either
    form loads with `dpal.load_student(PATH)`.
    """
    from dpal.api import export as run_export

    res = run_export(run_dir, out)
    typer.echo(
        f"exported {res.model_name} at step {res.step} to {res.path} ({', '.join(f.name for f in res.files)})"
    )


@eval_app.command("reid", cls=Command)
@user_errors
def eval_reid(
    model: Annotated[
        str,
        typer.Option(
            help="An exported student (model folder or .safetensors), a run directory or checkpoint, "
            "a store (the teacher that wrote it, as it wrote it), a teacher preset "
            "(efficientnet-lite2, path-b), or a timm/dpal model name."
        ),
    ],
    data: Annotated[Path, typer.Option(help="Market-1501 layout: DIR/query and DIR/bounding_box_test.")],
    image_size: Annotated[
        list[int] | None,
        typer.Option(
            help="Input H and W: --image-size 256 --image-size 128. "
            "\\[default: the model's own, else 256x128]"
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init", help="Allow a bare model name without weights (a random baseline, on purpose)."
        ),
    ] = False,
    teacher_checkpoint: Annotated[
        str | None, typer.Option(help="Weights for a teacher preset or timm name.")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of --random-init weights (a student starts as `dpal distill --seed` starts it)."
        ),
    ] = 0,
    feature: Annotated[
        str,
        typer.Option(
            help="A student's global feature: cls (its CLS token) or mean (mean "
            "patch token). Teachers give their stage-one global target."
        ),
    ] = "cls",
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 64,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Refuse an image that does not decode instead of leaving it out and counting it."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """ReID on a Market-1501-style folder: rank the gallery by cosine similarity of global features.

    Market's protocol: junk images (pid -1) and same-pid same-camera gallery images are excluded
    per query; distractors (pid 0000) stay as negatives. Prints mAP and CMC Rank-1/5/10, in percent
    (--json too), with 90% bootstrap intervals over queries for mAP and Rank-1 (mAP_lo, mAP_hi,
    rank1_lo, rank1_hi in --json).
    """
    from dpal.api import eval_reid as run_eval_reid
    from dpal.reid import format_table

    _setup_logging(False)  # the warning that counts images left out
    res = run_eval_reid(
        model,
        data,
        image_size=tuple(image_size) if image_size else None,
        feature=feature,
        batch_size=batch_size,
        random_init=random_init,
        teacher_checkpoint=teacher_checkpoint,
        seed=seed,
        strict=strict,
    )
    if as_json:  # one unit wherever the command prints: percent, as the table shows and papers report
        metrics = ("mAP", "rank1", "rank5", "rank10", "mAP_lo", "mAP_hi", "rank1_lo", "rank1_hi")
        pct = {k: 100 * v if k in metrics else v for k, v in res.items()}
        typer.echo(json.dumps({**pct, "unit": "percent"}))
        return
    typer.echo(format_table([{k: v for k, v in res.items() if k != "feature"}]))
    typer.echo(
        f"mAP and CMC in percent, [90% bootstrap interval over queries]; {res['num_query']} queries, "
        f"{res['num_gallery']} gallery images at {res['image_size']}"
        + (f"; {res['num_unreadable']} images that do not decode left out" if res["num_unreadable"] else "")
    )


def main() -> None:
    app(prog_name="dpal")


if __name__ == "__main__":
    main()
