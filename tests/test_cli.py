"""CLI: every command's --help, a user's mistake as one `error:` line with exit code 2 and no
traceback, the skipped count at the end of a run, --strict, store info and store verify.

Most commands run in this process through typer's CliRunner (stderr apart from stdout; an
exception that escapes the command shows up as `result.exception`, which is how a traceback would
reach the user). The real executable runs for --help and for --strict, whose dask worker writes
to the process's own stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpal.cli import app
from dpal.config import CacheConfig, DistillConfig
from dpal.store import GLOBAL


def _dpal() -> list[str]:
    exe = Path(sys.executable).parent / "dpal"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dpal.cli"]


@pytest.fixture
def cli() -> Iterator[Callable[..., object]]:
    """Run `dpal ARGS` in this process; the CLI's logging setup is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def invoke(*args: str):
        return CliRunner().invoke(app, [str(a) for a in args])

    yield invoke
    root.handlers[:] = handlers
    root.setLevel(level)


def _error_line(stderr: str, stdout: str) -> str:
    """The one `error:` line, which ends stderr; no traceback anywhere (log lines may precede it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stdout + stderr and " ERROR " not in stdout + stderr
    return errors[0]


def _assert_one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an exception escaping with its traceback
    line = _error_line(result.stderr, result.stdout)
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([], ["dpal: distill", "cache-teacher", "store", "distill"]),
        (
            ["cache-teacher"],
            [
                "--corpus",
                "--out",
                "--teacher",
                "--teacher-checkpoint",
                "--views",
                "--dtype",
                "--shard-size",
                "--seed",
                "--workers",
                "--shards",
                "--strict",
                "--slurm",
                "--set",
                "--config",
                "--dry-run",
                "resumes",
            ],
        ),
        (["distill"], ["--store", "--out", "--epochs", "--num-workers", "--online-teacher", "--resume"]),
        (["store"], ["info", "verify"]),
        (["store", "info"], ["STORE", "--json", "skipped"]),
        (["store", "verify"], ["STORE", "checksums", "exit 1"]),
    ],
)
@pytest.mark.subprocess
def test_help(args: list[str], needles: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run([*_dpal(), *args, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for n in needles:
        assert n.lower() in r.stdout.lower(), (n, r.stdout)


def _help_rows(command: str) -> dict[str, str]:
    """{option as a field name: its row's help text} from the real `dpal COMMAND --help` table."""
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    r = subprocess.run([*_dpal(), command, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    rows: dict[str, str] = {}
    name = None
    for line in r.stdout.splitlines():
        row = line.strip("│ ")
        if row.startswith("--"):  # a new option's row; a wrapped help text continues on rows without one
            name = row.split()[0][2:].replace("-", "_")
            rows[name] = row
        elif name is not None and row and not row.startswith("╰"):
            rows[name] += " " + row
    assert {"seed", "device"} <= rows.keys(), r.stdout
    return rows


# Defaults decided at run time: the config holds None, --help states the rule.
_RULE_DEFAULTS = {
    ("distill", "num_workers"): "2 on CPU; on a GPU, the CPUs per local rank minus one",
    ("distill", "recompute"): "yes on CUDA",
    ("distill", "local_size"): "the store's views.local_size",
    ("distill", "val_images"): "all of them",
}


@pytest.mark.subprocess
@pytest.mark.parametrize(("command", "config"), [("cache-teacher", CacheConfig), ("distill", DistillConfig)])
def test_help_defaults_are_the_config_defaults(command: str, config: type) -> None:
    # Every option named after a config field shows that field's default, read from config.py here,
    # so a default changed in the dataclass and not in the help text fails. Flags (bools), empty
    # strings and lists and None (no default) show none; sections (views, slurm) have no option of their own.
    rows = _help_rows(command)
    fields = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config)
        if not f.metadata.get("section")
    }
    flags = {f.metadata["flag"]: f.name for f in dataclasses.fields(config) if f.metadata.get("flag")}
    rows = {flags.get(k, k): v for k, v in rows.items()}
    assert fields.keys() <= rows.keys(), sorted(fields.keys() - rows.keys())  # every field has its option
    checked = []
    for name in sorted(fields):
        default, rule = fields[name], _RULE_DEFAULTS.get((command, name))
        match = re.search(r"\[default: (\[[^\]]*\]|[^\]]*)\]", rows[name])  # a list's own brackets too
        if rule is not None:
            assert default is None and match and match.group(1).startswith(rule), (name, default, rows[name])
        elif default is None or isinstance(default, bool) or default in ("", ()):
            assert match is None, (name, default, rows[name])
        else:  # parsed as the field's type: 2.5e-4 == 0.00025, 10 == 10.0, [0.9, 0.95] == (0.9, 0.95)
            assert match, f"--help of {command} shows no default for {name} (config: {default!r})"
            shown = match.group(1)
            if isinstance(default, (tuple, dict)):
                assert yaml.safe_load(shown) == (list(default) if isinstance(default, tuple) else default), (
                    name
                )
            else:
                assert type(default)(shown) == default, (name, shown, default)
            checked.append(name)
    # the options that must show a literal default, so that none is silently skipped above
    assert (
        checked
        == {
            "cache-teacher": [
                "batch_size",
                "device",
                "dtype",
                "max_pixels",
                "num_views",
                "progress_seconds",
                "random_init_seed",
                "relation",
                "replay_threads",
                "seed",
                "shard_size",
                "teacher",
                "teacher_global_token",
                "teacher_input_scale",
                "threads_per_worker",
                "workers",
            ],
            "distill": [
                "base_lr",
                "batch_size",
                "betas",
                "checkpoint_every",
                "device",
                "dpade_scale",
                "epochs",
                "global_weight",
                "grad_accum",
                "keep_last",
                "keep_weights_only_older",
                "l2_weight",
                "local_weight",
                "log_every",
                "mask_probability",
                "mask_ratio",
                "min_lr",
                "progress_seconds",
                "projector",
                "recipe",
                "relation_weight",
                "resume",
                "seed",
                "skip_nonfinite",
                "student",
                "student_init",
                "student_kwargs",
                "val_every",
                "warmup_epochs",
                "weight_decay",
            ],
        }[command]
    )


@pytest.mark.parametrize(
    "mistake", ["missing corpus", "unknown teacher", "unwritable out", "bad set key", "bad set value"]
)
def test_user_mistakes_are_one_error_line(
    cli, tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]], mistake: str
) -> None:
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "store"
    args, needles = {
        "missing corpus": (cli_args(tmp_path / "no_such_corpus", out), ["no_such_corpus", "not found"]),
        "unknown teacher": (
            cli_args(corpus_dir, out, "--teacher", "vit_tiny_patch16_2244"),
            ["unknown teacher 'vit_tiny_patch16_2244'", "did you mean vit_tiny_patch16_224"],
        ),
        "unwritable out": (cli_args(corpus_dir, tmp_path / "a_file" / "store"), ["--out", "a_file/store"]),
        "bad set key": (
            cli_args(corpus_dir, out, "--set", "viewz=3"),
            ["unknown config key 'viewz'", "known keys:", "views"],
        ),
        "bad set value": (
            cli_args(corpus_dir, out, "--set", "num_views=many"),
            ["num_views (--views) must be an integer, got 'many'"],
        ),
    }[mistake]
    result = cli(*args, "--shards", "0:")
    _assert_one_error_line(result, *needles)
    assert not out.exists()


def test_mismatched_resume_names_the_difference(
    cli, store_copy: Path, corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    result = cli(*cli_args(corpus_dir, store_copy, "--seed", "1", "--views", "3", "--shards", "0:"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "seed: store has 0, this run has 1" in errors[0]
    assert "num_views: store has 2, this run has 3" in errors[0]


def test_bad_corpus_run_prints_skipped_and_info_lists_them(
    cli, tmp_path: Path, bad_corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    out = tmp_path / "store"
    result = cli(*cli_args(bad_corpus_dir, out, "--shards", "0:"))
    assert result.exit_code == 0, (result.output, result.exception)
    last = result.stdout.strip().splitlines()[-1]
    assert (
        "cached 6 images in 4 shards" in last and "skipped 5 bad images" in last and "store complete" in last
    )
    assert "Traceback" not in result.output and "Warning" not in result.output

    info = cli("store", "info", out)
    assert info.exit_code == 0
    assert "11 indexed, 6 cached, 5 skipped; K = 2 views" in info.stdout
    assert "skipped      bad_empty.jpg: empty file" in info.stdout
    assert "skipped      bad_bomb.png: decompression bomb" in info.stdout
    as_json = json.loads(cli("store", "info", out, "--json").stdout)
    assert as_json["num_skipped_images"] == 5 and as_json["complete"] is True
    assert sorted(s["key"] for s in as_json["skipped"]) == [
        "bad_bomb.png",
        "bad_empty.jpg",
        "bad_text.jpg",
        "bad_truncated_header.jpg",
        "bad_truncated_scan.jpg",
    ]


def test_json_summary_is_all_of_stdout(
    cli, tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    result = cli(*cli_args(corpus_dir, tmp_path / "store", "--shards", "0:", "--json"))
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["cached"] == 13 and summary["complete"] is True


@pytest.mark.subprocess
def test_strict_fails_on_the_first_bad_file(
    tmp_path: Path, bad_corpus_dir: Path, cli_args: Callable[..., list[str]], child_env: dict[str, str]
) -> None:
    # The default engine: a dask LocalCluster with one worker process (--workers 1).
    r = subprocess.run(
        [*_dpal(), *cli_args(bad_corpus_dir, tmp_path / "store", "--strict", "--quiet")],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    # before the fix the dask worker also logged "distributed.worker - ERROR - Compute Failed" and a traceback
    line = _error_line(r.stderr, r.stdout)
    assert line.startswith("error: bad image 'bad_bomb.png' (decompression bomb"), line
    assert not list((tmp_path / "store" / "shards").glob("*.json"))  # the bad file's shard is not marked done


def test_store_verify(cli, store_copy: Path) -> None:
    ok = cli("store", "verify", store_copy)
    assert ok.exit_code == 0 and ok.stdout.strip() == "ok: 5 shards verified"

    (store_copy / GLOBAL / "c" / "2" / "0" / "0").unlink()
    missing = cli("store", "verify", store_copy)
    assert missing.exit_code == 1 and "BAD shard 000002: global/c/2/0/0 missing" in missing.stdout
    assert "000000" not in missing.stdout.split("rerun")[0]  # only the damaged shard is named

    target = store_copy / "params" / "c" / "4" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[8:16] = bytes(b ^ 0xFF for b in data[8:16])
    target.write_bytes(bytes(data))
    corrupt = cli("store", "verify", store_copy)
    assert corrupt.exit_code == 1
    assert "BAD shard 000004: params/c/4/0/0 checksum mismatch" in corrupt.stdout
    assert "BAD shard 000002" in corrupt.stdout

    result = cli("store", "verify", store_copy.parent / "nothing")
    _assert_one_error_line(result, "not a dpal store")


def test_slurm_dry_run_prints_sizes_and_the_job_script(
    cli, tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    result = cli(
        *cli_args(
            corpus_dir,
            tmp_path / "store",
            "--slurm",
            "--dry-run",
            "--set",
            "slurm.partition=gpu",
            "--set",
            "slurm.gpus_per_job=1",
            "--set",
            "slurm.cores=6",
            "--set",
            "slurm.walltime=02:00:00",
        )
    )
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.stdout
    assert "13 images x K=2 views" in out and "bytes per view" in out
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH -t 02:00:00",
        "#SBATCH --gres=gpu:1",
    ):
        assert line in out
    assert "--nthreads 1" in out  # one shard task at a time per GPU worker
    assert not (tmp_path / "store").exists()  # a dry run writes nothing


def test_empty_teacher_checkpoint_is_one_error_line(
    cli, tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    """An empty checkpoint used to print only `Aborted.` (torch.load's EOFError is click's abort)."""
    empty = tmp_path / "teacher.pth"
    empty.write_bytes(b"")
    args = [a for a in cli_args(corpus_dir, tmp_path / "store") if a != "--random-init"]
    result = cli(*args, "--teacher-checkpoint", empty, "--shards", "0:")
    _assert_one_error_line(result, f"{empty} is empty (0 bytes), not a torch checkpoint")


@pytest.mark.parametrize(
    ("command", "bad", "needles"),
    [
        ("distill", "yaml file", ["config file", "bad.yaml is not valid YAML at line 2, column 1"]),
        ("distill", "toml file", ["config file", "bad.toml is not valid TOML", "line 1"]),
        ("distill", "set yaml", ["--set student_kwargs={depth: 2 is not valid YAML at line 1, column 10"]),
        ("distill", "set overflow", ["max_steps must be an integer, got inf"]),
        ("cache-teacher", "yaml file", ["bad.yaml is not valid YAML at line 2, column 1"]),
        ("cache-teacher", "set yaml", ["--set views.global_size=[32, is not valid YAML"]),
    ],
)
def test_malformed_config_or_set_value_is_one_error_line(
    cli, tmp_path: Path, command: str, bad: str, needles: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text("epochs: 3\n  student: x\n")  # an indented key inside a scalar
    (tmp_path / "bad.toml").write_text("epochs = \n")
    extra = {
        "yaml file": ["--config", str(tmp_path / "bad.yaml")],
        "toml file": ["--config", str(tmp_path / "bad.toml")],
        "set yaml": [
            "--set",
            "student_kwargs={depth: 2" if command == "distill" else "views.global_size=[32,",
        ],
        "set overflow": ["--set", "max_steps=1.0e+400"],
    }[bad]
    where = ["--store", str(tmp_path / "s")] if command == "distill" else ["--corpus", str(tmp_path)]
    result = cli(command, *where, "--out", str(tmp_path / "out"), *extra)
    _assert_one_error_line(result, *needles)
    assert not (tmp_path / "out").exists()


def test_corpus_and_out_mistakes_are_reported_before_the_teacher_loads(
    cli, tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]]
) -> None:
    """The teacher checkpoint here is empty, so a run that loaded the teacher first would report it
    instead (and, with a real teacher, only after 17-31 s)."""
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"")
    (tmp_path / "a_file").write_text("x")

    def run(corpus: Path, out: Path):
        args = [a for a in cli_args(corpus, out) if a != "--random-init"]
        return cli(*args, "--teacher-checkpoint", ckpt, "--shards", "0:")

    _assert_one_error_line(
        run(tmp_path / "no_such_corpus", tmp_path / "store"), "no_such_corpus", "not found"
    )
    _assert_one_error_line(run(corpus_dir, tmp_path / "a_file" / "store"), "--out", "a_file is not a folder")
    _assert_one_error_line(run(corpus_dir, tmp_path / "store"), "teacher.pth is empty")


def test_damaged_tar_corpus_is_named_and_counted(
    cli, tmp_path: Path, corpus_files: dict[str, bytes], cli_args: Callable[..., list[str]]
) -> None:
    """A truncated tar ended stage one with a ReadError traceback; now the cut member is named on
    one warning line, the members before it are cached, and the summary counts the loss."""
    import tarfile

    names = sorted(n for n in corpus_files if "/" not in n)[:4]
    with tarfile.open(tmp_path / "full.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for n in names:
            (tmp_path / n).write_bytes(corpus_files[n])
            tf.add(tmp_path / n, arcname=n)
    with tarfile.open(tmp_path / "full.tar") as tf:
        offsets = [m.offset_data for m in tf]
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "full.tar").read_bytes()[: offsets[3] + 100])
    result = cli(*cli_args(cut, tmp_path / "store", "--shards", "0:"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    squeezed = "".join(result.stderr.split())  # rich wraps log lines at the runner's 80 columns
    assert squeezed.count(f"{cut}:{names[3]}:thetariscutshortatbyte{offsets[3] + 100}") == 1, result.stderr
    assert "cached 3 images" in result.stdout and "1 corpus entries unreadable and lost" in result.stdout
    (tmp_path / "text.tar").write_text("not a tar\n")
    _assert_one_error_line(
        cli(*cli_args(tmp_path / "text.tar", tmp_path / "store2", "--shards", "0:")),
        f"corpus tar {tmp_path / 'text.tar'} is not a tar archive",
    )


@pytest.mark.subprocess
def test_disk_full_is_one_line_and_a_rerun_resumes(
    tmp_path: Path,
    corpus_dir: Path,
    ref_store: Path,
    cli_args: Callable[..., list[str]],
    child_env: dict[str, str],
    same_store: Callable[[Path, Path], None],
) -> None:
    """A real full disk: a 200 KB tmpfs (mounted in a private mount namespace) holds the new store
    and its first shard, not the second. The run stops with one line naming the full path; after the
    disk grows, the same command finishes the store, equal to one written without interruption."""
    import re
    import shlex
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (a private mount namespace) to mount a small tmpfs")
    mnt, store, copy = tmp_path / "mnt", tmp_path / "mnt" / "store", tmp_path / "copy"
    mnt.mkdir()
    cmd = shlex.join([*_dpal(), *cli_args(corpus_dir, store, "--shards", "0:")])
    script = f"""
        mount -t tmpfs -o size=200k tmpfs {mnt}
        {cmd} > {tmp_path}/out1 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1
        mount -o remount,size=4m {mnt}
        {cmd} > {tmp_path}/out2 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2
        cp -a {store} {copy}
    """
    subprocess.run(["unshare", "-rm", "bash", "-c", script], env=child_env, check=True, timeout=300)
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    assert read("rc1").strip() == "2", read("err1")
    line = _error_line(read("err1"), read("out1"))
    assert re.match(
        rf"error: disk full: No space left on device while writing shard \d+ under {store};", line
    ), line
    assert line.endswith("rerun the same command: finished shards are kept and the run resumes"), line
    assert read("rc2").strip() == "0", read("err2")
    assert "1 shards were already done; store complete" in read("out2")
    same_store(ref_store, copy)


@pytest.mark.subprocess
def test_dask_run_in_a_log_prints_progress_lines_and_closes_cleanly(
    tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]], child_env: dict[str, str]
) -> None:
    """stderr is a file (a batch job): progress used to draw nothing for the whole run, and every
    dask run ended with "Worker process still alive after 4.0 seconds, killing"."""
    import re

    with open(tmp_path / "err", "w") as err:
        r = subprocess.run(
            [
                *_dpal(),
                *cli_args(corpus_dir, tmp_path / "store", "--workers", "1", "--set", "progress_seconds=0"),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env,
            timeout=300,
        )
    log = (tmp_path / "err").read_text()
    assert r.returncode == 0, log
    assert "still alive" not in log and "killing" not in log and "Traceback" not in log, log
    lines = [ln for ln in log.splitlines() if ln.startswith("cache-teacher ")]
    pattern = (
        r"cache-teacher (\d+)/13 images \((\d+\.\d)%\) \| \d+\.\d images/s \| elapsed \d:\d\d:\d\d \| ETA \S+"
    )
    done = [int(re.fullmatch(pattern, ln).group(1)) for ln in lines]  # one line per shard: interval 0
    assert len(done) == 5 and done == sorted(done) and done[-1] == 13, lines
    assert lines[-1].startswith("cache-teacher 13/13 images (100.0%)") and lines[-1].endswith("ETA 0:00:00")
    assert "loss" not in log
    assert "store complete" in r.stdout


# ---------------------------------------------------------------- options generated from the config

# Non-default values the generic rule in _other_value cannot find (validated fields, choices, mappings).
_OTHER = {
    "shards": "1:2",
    "device": "cpu",
    "resume": "none",
    "dtype": "int8",
    "teacher_global_token": "mean",
    "relation": "factor",
    "views.crowd_size": (240, 256),
    "slurm.job_extra": ("--constraint=a100",),
    "loggers": ("mlflow", "wandb"),  # a repeatable option: --logger mlflow --logger wandb
    "local_size": (64, 48),
    "student_kwargs": {"depth": 2},
    "recipe": "feature-kd",
    "projector": "linear",
    "student_init": "timm",
}
# distill keys that only one --recipe reads (any other refuses them): set together with that recipe
_RECIPE_OF = {"mask_ratio": "proteus", "mask_probability": "proteus"}


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, object]]:
    """(dotted name, field, default) of every field of `cls`, sections' fields included."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.metadata.get("section") or (prefix and dataclasses.is_dataclass(default)):
            yield from _leaves(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name, f, default


def _other_value(dotted: str, default: object) -> object:
    if dotted in _OTHER:
        return _OTHER[dotted]
    if isinstance(default, bool) or default is None and dotted in ("recompute",):
        return not default
    if (
        isinstance(default, int)
        or default is None
        and dotted in ("teacher_layer", "max_steps", "num_workers", "val_images", "relation_rank")
    ):
        return (default or 2) + 1
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if isinstance(default, tuple):
        return tuple(v // 2 if isinstance(v, int) else v / 2 for v in default)
    return f"{default}-x" if default else "x"  # a text, or a text that defaults to None


def _as_text(value: object) -> str:
    return (
        json.dumps(list(value) if isinstance(value, tuple) else value)
        if isinstance(value, (tuple, dict))
        else str(value)
    )


def _parse(command: str, args: list[str]) -> dict[str, object]:
    """The options that `dpal COMMAND ARGS` parses to, through the real click command typer builds."""
    import typer.main

    group = typer.main.get_command(app)
    return dict(group.commands[command].make_context(command, args).params)


@pytest.mark.parametrize(("command", "config"), [("cache-teacher", CacheConfig), ("distill", DistillConfig)])
def test_every_config_field_is_reachable_from_the_cli(command: str, config: type) -> None:
    """Each field, a section's too, set alone to a value other than its default: a field's own option
    (`--x VALUE`, `--x`/`--no-x`) for a top-level one, `--set section.key=VALUE` inside a section.
    The config the CLI resolves differs from the default config in that one field, by that value."""
    from dpal.cli import config_from_options

    base = config()
    leaves = list(_leaves(config))
    assert len(leaves) == {"cache-teacher": 28 + 8 + 18, "distill": 47}[command]  # with slurm, recipe
    for dotted, f, default in leaves:
        value = _other_value(dotted, default)
        assert value != default, dotted
        if "." in dotted:
            args = ["--set", f"{dotted}={_as_text(value)}"]
            section, key = dotted.split(".")
            expected = dataclasses.replace(
                base, **{section: dataclasses.replace(getattr(base, section), **{key: value})}
            )
        else:
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            args = (
                [f"--{flag}" if value else f"--no-{flag}"]
                if isinstance(value, bool)
                else [a for v in value for a in (f"--{flag}", v)]
                if f.name == "loggers"
                else [f"--{flag}", _as_text(value)]
            )
            with_recipe = (
                {"recipe": _RECIPE_OF[f.name]} if command == "distill" and f.name in _RECIPE_OF else {}
            )
            if command == "distill" and f.name in ("val_every", "val_images"):
                with_recipe["val_store"] = "held-out"  # they are refused with nothing to validate
            args += [f"--{k.replace('_', '-')}={v}" for k, v in with_recipe.items()]
            expected = dataclasses.replace(base, **with_recipe, **{f.name: value})
        options = _parse(command, args)
        assert config_from_options(config, options) == expected, (dotted, args)
        assert (
            set(options) == {"cache-teacher": {"dry_run", "quiet", "as_json"}, "distill": {"quiet"}}[command]
        )


def test_flags_beat_the_config_file_and_set_beats_flags(tmp_path: Path) -> None:
    from dpal.cli import config_from_options

    path = tmp_path / "cfg.yaml"
    path.write_text("strict: true\nembed_images: false\nviews: 2\nseed: 5\nrecipe:\n  flip_p: 0.25\n")
    cfg = config_from_options(CacheConfig, _parse("cache-teacher", ["--config", str(path)]))
    assert (cfg.strict, cfg.embed_images, cfg.num_views, cfg.seed, cfg.views.flip_p) == (
        True,
        False,
        2,
        5,
        0.25,
    )
    args = [
        "--config",
        str(path),
        "--no-strict",
        "--embed-images",
        "--views",
        "3",
        "--set",
        "num_views=4",
        "--set",
        "views.flip_p=0.75",
    ]
    cfg = config_from_options(CacheConfig, _parse("cache-teacher", args))
    assert (cfg.strict, cfg.embed_images, cfg.num_views, cfg.seed, cfg.views.flip_p) == (
        False,
        True,
        4,
        5,
        0.75,
    )
    assert cfg.batch_size == 32 and cfg.views.jitter_p == 0.8  # neither given: the dataclass defaults


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--dtype", "fp8"],
            "error: dtype 'fp8' is not one of float16, bfloat16, int8, int8-rotated, float32",
        ),
        (["--teacher-global-token", "cls"], "error: teacher_global_token 'cls' is not one of auto, mean"),
        (
            ["--set", "dtype=int4"],
            "error: dtype 'int4' is not one of float16, bfloat16, int8, int8-rotated, float32",
        ),
        (["--views", "many"], "error: num_views (--views) must be an integer, got 'many'"),
        (["--views", "2.5"], "error: num_views (--views) must be an integer, got 2.5"),
        (["--views", "true"], "error: num_views (--views) must be an integer, got 'true'"),
        (["--recipe", "x"], "No such option: --recipe"),  # a section has no option of its own
    ],
)
def test_bad_option_values_are_one_error_line(
    cli, tmp_path: Path, corpus_dir: Path, args: list[str], needle: str
) -> None:
    result = cli("cache-teacher", "--corpus", corpus_dir, "--out", tmp_path / "store", *args)
    if needle.startswith("No such option"):  # click's usage error: exit 2, no traceback
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
        return
    assert _assert_one_error_line(result) == needle
    assert not (tmp_path / "store").exists()


def test_version(cli) -> None:
    from importlib.metadata import version

    import dpal

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"dpal {version('dpal')}\n"
    assert version("dpal") == dpal.__version__


@pytest.mark.subprocess
def test_python_dash_m_dpal(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "dpal", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "Usage: dpal [OPTIONS] COMMAND" in r.stdout
    for command in ("cache-teacher", "distill", "export", "store", "eval"):
        assert command in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "dpal", "distill", "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: --store and --out are required\n")


_ERRORS_SCRIPT = """
import sys
import typer
from dpal.cli import user_errors
from dpal.errors import ConfigError

app = typer.Typer(pretty_exceptions_enable=False)

@app.command()
@user_errors
def run(kind: str) -> None:
    if kind == "user":
        raise ConfigError("views must be >= 1, got 0")
    if kind == "file":
        open(sys.argv[0] + ".missing")
    if kind == "value":
        raise ValueError("grid_hw (16, 8) does not match 96 patch tokens")  # a bug, not the user's
    {}["teacher"]  # a bug

app()
"""


@pytest.mark.subprocess
def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    script = tmp_path / "errors_cli.py"
    script.write_text(_ERRORS_SCRIPT)

    def run(kind: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, timeout=60)

    user, missing, bug, value = run("user"), run("file"), run("bug"), run("value")
    assert (user.returncode, user.stdout, user.stderr) == (2, "", "error: views must be >= 1, got 0\n")
    assert (missing.returncode, missing.stderr) == (
        2,
        f"error: No such file or directory: {script}.missing\n",
    )
    assert bug.returncode == 1 and bug.stderr.startswith("Traceback (most recent call last):"), bug.stderr
    assert bug.stderr.rstrip().endswith("KeyError: 'teacher'") and "errors_cli.py" in bug.stderr
    assert value.returncode == 1 and value.stderr.startswith("Traceback (most recent call last):"), (
        value.stderr
    )
    assert value.stderr.rstrip().endswith("ValueError: grid_hw (16, 8) does not match 96 patch tokens")


@pytest.mark.subprocess
def test_the_cli_module_imports_no_torch() -> None:
    """`dpal --help` and `dpal --version` build every option from the config without torch (2-5 s to
    import); a command imports what it runs."""
    code = "import sys, dpal.cli; print(sorted(m for m in ('torch', 'torchvision', 'zarr', 'dask') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "[]\n", "")


def test_the_errors_the_cli_prints_are_user_errors() -> None:
    """The CLI prints a UserError as one line by its kind alone (cli.user_errors names no module's
    class); each kind below is raised by a test in this suite through the CLI."""
    from dpal.errors import ConfigError, InputError, UserError
    from dpal.pipeline.cache import DiskFullError, StrictModeError
    from dpal.store import StoreError
    from dpal.trainer.data import LoaderError
    from dpal.trainer.rundir import RunDirError

    for kind in (
        ConfigError,
        InputError,
        StoreError,
        DiskFullError,
        StrictModeError,
        LoaderError,
        RunDirError,
    ):
        assert issubclass(kind, UserError), kind
    assert issubclass(ConfigError, ValueError) and issubclass(RunDirError, RuntimeError)


def test_user_mistakes_below_the_cli_are_user_errors(tmp_path: Path) -> None:
    """The mistakes of test_user_mistakes_are_one_error_line and a few more, raised where they are
    found: each is a UserError of its kind (and still a ValueError for callers that catch one)."""
    from dpal.common import resolve_device
    from dpal.corpus import scan_corpus
    from dpal.errors import ConfigError, InputError
    from dpal.evaluate import resolve_model
    from dpal.teachers import TeacherSpec, load_teacher

    (tmp_path / "empty.pth").write_bytes(b"")
    cases = [
        (lambda: scan_corpus(str(tmp_path / "no_such_corpus")), InputError, "no_such_corpus' not found"),
        (
            lambda: load_teacher(TeacherSpec("vit_tiny_patch16_2244", random_init=True)),
            InputError,
            "unknown teacher 'vit_tiny_patch16_2244'",
        ),
        (
            lambda: load_teacher(TeacherSpec("vit_tiny_patch16_224", checkpoint=str(tmp_path / "empty.pth"))),
            InputError,
            "empty.pth is empty (0 bytes)",
        ),
        (
            lambda: resolve_model("vit_tiny_patch16_224", random_init=True, feature="avg"),
            InputError,
            "--feature 'avg': choose one of cls, mean",
        ),
        (lambda: resolve_device("tpu"), ConfigError, "device 'tpu' is not one of auto, cpu or cuda[:i]"),
    ]
    for make, kind, needle in cases:
        with pytest.raises(kind) as e:
            make()
        assert needle in str(e.value) and isinstance(e.value, ValueError), (kind, str(e.value))


# ---------------------------------------------------------------- help that reads at 80 columns

_PAGES = [
    [],
    ["cache-teacher"],
    ["distill"],
    ["export"],
    ["plot"],
    ["store"],
    ["store", "info"],
    ["store", "verify"],
    ["eval"],
    ["eval", "reid"],
]


def _page(args: list[str], columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    r = subprocess.run([*_dpal(), *args, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def _panels(page: str) -> dict[str, list[str]]:
    """{panel title: the lines inside it, borders stripped}, in the page's order."""
    panels: dict[str, list[str]] = {}
    title = None
    for line in page.splitlines():
        if line.startswith("╭─ "):
            title = line[3:].split(" ─")[0]
            panels[title] = []
        elif line.startswith("╰"):
            title = None
        elif title is not None:
            panels[title].append(line[1:-1])
    return panels


# The help column starts at most this far into a panel's row: it keeps 80 - 2 - HELP_START >= 42
# columns of text. typer's single table started it at column 60 (a 17-character column).
HELP_START = 36


@pytest.mark.subprocess
@pytest.mark.parametrize("args", _PAGES, ids=lambda a: " ".join(a) or "dpal")
def test_help_reads_at_80_columns(args: list[str]) -> None:
    """At COLUMNS=80 no line is wider than 80, no flag shows a `<bool>` type, and every help text is
    laid out in a column that starts by column HELP_START of its panel (an option wider than that
    takes a row of its own, its help the rows below): measured on every row that holds help text."""
    page = _page(args)
    assert "<bool>" not in page and "bool" not in page.lower().replace("boolean", "")
    assert max(len(ln) for ln in page.splitlines()) <= 80
    rows = 0
    for title, lines in _panels(page).items():
        for line in lines:
            if not line.strip():
                continue
            # the help text starts after the name and a gap of two or more spaces, or at the first
            # character of a continuation row; a row with a wide option's name alone has none
            m = re.match(r" (\S.*?)( {2,})(\S)", line)
            start = len(line) - len(line.lstrip()) if line.startswith("   ") else m.start(3) if m else None
            assert start is None or start <= HELP_START, (title, line)
            rows += start is not None
    assert rows >= 2


@pytest.mark.subprocess
def test_options_are_grouped_in_the_panels_the_config_names() -> None:
    """Each config field's option is listed in the panel of its `panel` metadata (one source), and the
    pages list the panels in this order."""
    for command, config in (("cache-teacher", CacheConfig), ("distill", DistillConfig)):
        panels = _panels(_page([command], columns=200))
        assert (
            list(panels)
            == {
                "cache-teacher": [
                    "Data and output",
                    "Teacher",
                    "Views and targets",
                    "Runtime and distributed",
                    "Config file and overrides",
                    "Options",
                ],
                "distill": [
                    "Data and output",
                    "Schedule",
                    "Optimiser",
                    "Method",
                    "Recipes and ablations",
                    "Validation",
                    "Runtime and distributed",
                    "Config file and overrides",
                    "Options",
                ],
            }[command]
        )
        where = {
            line.split()[0]: title
            for title, lines in panels.items()
            for line in lines
            if line.lstrip().startswith("--") and line.startswith(" --")
        }
        for f in dataclasses.fields(config):
            if f.metadata.get("section"):
                continue
            flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
            assert f.metadata["panel"] and where[flag] == f.metadata["panel"], (command, flag)
        assert (
            where["--config"] == where["--set"] == "Config file and overrides"
            and where["--help"] == "Options"
        )
