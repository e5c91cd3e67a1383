"""Recipes and ablations on one store and one budget: which way of distilling the teacher pays.

Trains every configuration below with `dpal distill` on the same cached store (same views, same
teacher targets, same schedule), for each seed, optionally with held-out loss curves
(`--val-store`), exports each student, then scores every student on the ReID test split and on a
validation split (mAP and R1 of the CLS and of the mean patch feature, bootstrap 90% intervals
over queries) beside the store's own teacher and each seed's randomly initialised student (the
point that seed's runs start from). Beside ReID, two label-free fidelity measures of each feature
against the teacher's global feature on the test gallery: linear CKA and the share of 10 nearest
neighbours in common. It writes results.json, a Markdown table per split (table.md) and the
held-out loss curves (curves.png), and prints the tables.

    python bench/recipes.py --out /tmp/rb --store STORE --make-val-reid sample_data/corpus \
        --seeds 0 1 2 --jobs 2

Configurations (`--configs`; the default runs the first eight):
- dpal: the paper's recipe (D-PaDe, global + local + relation objectives);
- dpal-linear: one plain Linear(d, D) in place of D-PaDe;
- dpal-no-global / dpal-no-local / dpal-no-relation: one objective's weight set to 0;
- proteus, feature-kd: the baselines (docs/training.md, Recipes);
- dpal-frozen: the student kept at its initialisation, D-PaDe alone trained (`--freeze-student`):
  how much of the alignment the head does by itself;
- dpal-relation-0.1: the relation term at a tenth of the others' weight;
- dpal-timm-init: the student from timm's initialisation instead of the authors' code's;
- dpal-compact: dpal on `--compact-store` (a store of the same corpus, views and seed written with
  another codec).

The validation split (`--make-val-reid CORPUS` writes it from the corpus's tracks) is where
settings are chosen; the test split (sample_data/reid, later frames of the video) only reports.

Runs are resumable: a configuration and seed whose export exists is not trained again, and a
killed run resumes from its checkpoint (`dpal distill --resume auto`); scores are kept beside
each run and reused. `--jobs N` trains N runs at a time with torch limited to cores // N threads
each (on 2 cores, 2 jobs of 1 thread finish the set sooner than 1 job of 2 threads). Training on
CPU is deterministic for a given thread count, so rerunning a configuration reproduces its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dpal import commands

ROOT = Path(__file__).resolve().parent.parent
DPAL = commands.DPAL
CONFIGS: dict[str, list[str]] = {
    "dpal": [],
    "dpal-linear": ["--projector", "linear"],
    "dpal-no-global": ["--global-weight", "0"],
    "dpal-no-local": ["--local-weight", "0"],
    "dpal-no-relation": ["--relation-weight", "0"],
    "proteus": ["--recipe", "proteus"],
    "feature-kd": ["--recipe", "feature-kd"],
    "dpal-frozen": ["--freeze-student"],
    "dpal-relation-0.1": ["--relation-weight", "0.1"],
    "dpal-timm-init": ["--student-init", "timm"],
    "dpal-compact": [],
}
# run by default; the others on request (--configs)
DEFAULT_CONFIGS = (
    "dpal",
    "dpal-linear",
    "dpal-no-global",
    "dpal-no-local",
    "dpal-no-relation",
    "proteus",
    "feature-kd",
    "dpal-frozen",
)
NEEDS_COMPACT = ("dpal-compact",)
FEATURES = ("cls", "mean")
IMAGE_SIZE = (128, 64)  # the demo's v0 size: the store's global view


def distill_command(args: argparse.Namespace, config: str, seed: int, run_dir: Path) -> list[str]:
    """`dpal distill` for one configuration and seed: the demo's schedule and settings."""
    store = args.compact_store if config in NEEDS_COMPACT else args.store
    cmd = commands.distill_command(
        store,
        run_dir,
        args,
        num_workers=0,
        seed=seed,
        settings=["log_every=5", "checkpoint_every=40"],
        extra=["--progress-seconds", "120", *CONFIGS[config], *args.extra],
    )
    if args.val_store:
        cmd += ["--val-store", args.val_store, "--val-every", str(args.val_every)]
    return cmd


def train_one(args: argparse.Namespace, config: str, seed: int, threads: int) -> dict:
    """Train (or resume) and export one run; returns its timing. Skips a run already exported."""
    run_dir = Path(args.out) / "runs" / f"{config}-s{seed}"
    student = run_dir / "student.safetensors"
    if student.exists():
        return {"config": config, "seed": seed, "seconds": None, "skipped": True}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    log = Path(args.out) / "logs" / f"{config}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        for cmd in (
            distill_command(args, config, seed, run_dir),
            [*DPAL, "export", str(run_dir), "--out", str(student)],
        ):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            res = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
            if res.returncode != 0:
                raise SystemExit(f"{config} seed {seed} failed (exit {res.returncode}); see {log}")
    seconds = time.perf_counter() - t0
    print(f"trained {config} seed {seed} in {seconds:.0f} s", flush=True)
    return {"config": config, "seed": seed, "seconds": seconds, "skipped": False}


def train_all(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(lambda job: train_one(args, job[0], job[1], threads), jobs))


def student_init(config: str) -> str:
    """The student initialisation a configuration's runs start from (`--student-init`)."""
    args = CONFIGS[config]
    return args[args.index("--student-init") + 1] if "--student-init" in args else "dpal"


def score(
    model: str, reid: str, feature: str = "cls", random_init: bool = False, seed: int = 0, init: str = "dpal"
) -> dict:
    """ReID of one model: mAP, R1 and their bootstrap intervals, with the per-query arrays; the
    gallery's features (`gallery_features`, a list) for the fidelity measures."""
    from dpal.evaluate import evaluate_reid, resolve_model

    embedder = resolve_model(
        model, IMAGE_SIZE, random_init=random_init, feature=feature, seed=seed, init=init
    )
    res = evaluate_reid(embedder, reid, per_query=True, features=True)
    res.pop("query_features")
    return {k: v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v for k, v in res.items()}


def fidelity(entry: dict, teacher: dict) -> dict:
    """Label-free agreement of a model's gallery features with the teacher's: linear CKA and the
    share of 10 nearest neighbours in common (reid.linear_cka, reid.knn_agreement)."""
    from dpal.reid import knn_agreement, linear_cka

    t = np.asarray(teacher["gallery_features"], dtype=np.float64)
    out = {}
    for feature in FEATURES:
        f = np.asarray(entry[feature]["gallery_features"], dtype=np.float64)
        out[feature] = {"cka": linear_cka(f, t), "knn10": knn_agreement(f, t, k=10)}
    return out


def slim(entry: dict) -> dict:
    """A score without its features (what results.json keeps)."""
    return {k: v for k, v in entry.items() if k != "gallery_features"}


def val_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from dpal.trainer.plot import read_curves

    return read_curves(run_dir)[1]


def cached(path: Path, newer_than: Path | None, compute: Callable[[], dict]) -> dict:
    """`compute()`, kept in `path` as JSON and reused while it is newer than `newer_than`."""
    if path.exists() and (newer_than is None or path.stat().st_mtime > newer_than.stat().st_mtime):
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


def evaluate_all(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> dict:
    """Every student, the teacher and the random student on the ReID split; the held-out curves.
    Each model's scores are kept beside it (reid_scores.json) and reused by a later call."""
    out = Path(args.out)
    splits = {"test": args.reid, "val": args.val_reid}
    results: dict = {"runs": {}, "reference": {}}
    for split, reid in splits.items():
        if not reid:
            continue
        teacher = cached(
            out / f"reid_teacher_{split}.json",
            Path(args.store) / "zarr.json",
            lambda r=reid: score(args.store, r),
        )
        results["reference"][split] = {"teacher": slim(teacher), "random": {}}
        inits = sorted({student_init(c) for c, _ in jobs})
        for init, seed in [(i, s) for i in inits for s in sorted({s for _, s in jobs})]:
            # each seed's runs start from this student (its initialisation, its seed)
            suffix = "" if init == "dpal" else f"_{init}"
            rnd = cached(
                out / f"reid_random_{split}_s{seed}{suffix}.json",
                Path(reid) / "query",  # a regenerated split rewrites the folder
                lambda r=reid, s=seed, i=init: {
                    f: score("dpal_vit_tiny", r, f, random_init=True, seed=s, init=i) for f in FEATURES
                },
            )
            results["reference"][split]["random"][f"{init}-s{seed}"] = {
                **{f: slim(rnd[f]) for f in FEATURES},
                "fidelity": fidelity(rnd, teacher),
            }
        for config, seed in jobs:
            run_dir = out / "runs" / f"{config}-s{seed}"
            student = run_dir / "student.safetensors"
            if not student.exists():  # --skip-train with a run not trained (yet): left out, said
                print(f"not trained, left out: {config} seed {seed}", flush=True)
                continue
            entry = cached(
                run_dir / f"reid_scores_{split}.json",
                student,
                lambda s=student, r=reid: {f: score(str(s), r, f) for f in FEATURES},
            )
            run = results["runs"].setdefault(f"{config}-s{seed}", {"config": config, "seed": seed})
            run[split] = {**{f: slim(entry[f]) for f in FEATURES}, "fidelity": fidelity(entry, teacher)}
            run["curves"] = val_curves(run_dir)
            print(f"scored {config} seed {seed} on {split}", flush=True)
    return results


def pooled(
    results: dict, config: str, split: str, feature: str, key: str, seeds: list[int] | None = None
) -> np.ndarray:
    """The per-query values of `config`'s runs, averaged over its seeds (queries are shared); only
    the runs of `seeds` where given."""
    runs = [
        r for r in results["runs"].values() if r["config"] == config and (seeds is None or r["seed"] in seeds)
    ]
    return np.mean(
        [np.asarray(r[split][feature][f"per_query_{key}"], dtype=np.float64) for r in runs], axis=0
    )


def random_baseline(results: dict, split: str, config: str, seeds: list[int], feature: str) -> dict:
    """The random students `config`'s runs start from (its initialisation, each of `seeds`): mean
    mAP and fidelity."""
    ref = results["reference"][split]["random"]
    rnd = [ref[f"{student_init(config)}-s{s}"] for s in seeds]
    return {
        "mAP": float(np.mean([r[feature]["mAP"] for r in rnd])),
        "cka": float(np.mean([r["fidelity"][feature]["cka"] for r in rnd])),
        "knn10": float(np.mean([r["fidelity"][feature]["knn10"] for r in rnd])),
    }


def summarize(results: dict, configs: list[str], split: str, level: float) -> dict:
    """Per configuration and feature on one split: the seeds' mAP and R1, the seed-mean with its
    bootstrap interval over queries, the share of the random-to-teacher gap closed (against the
    random students of the same seeds), the fidelity to the teacher (CKA, kNN agreement) per seed,
    and the paired difference against dpal's runs of the same seeds (positive: dpal better) with its
    interval, where dpal has every seed of the configuration."""
    from dpal.reid import bootstrap_interval, paired_bootstrap

    teacher = results["reference"][split]["teacher"]["mAP"]
    table: dict = {}
    dpal_seeds = {r["seed"] for r in results["runs"].values() if r["config"] == "dpal"}
    for config in configs:
        runs = [r for r in results["runs"].values() if r["config"] == config]
        if not runs:
            continue
        row: dict = {"seeds": [r["seed"] for r in runs]}
        for feature in FEATURES:
            random = random_baseline(results, split, config, row["seeds"], feature)
            ap = pooled(results, config, split, feature, "ap")
            r1 = pooled(results, config, split, feature, "rank1")
            cell = {
                "mAP_seeds": [r[split][feature]["mAP"] for r in runs],
                "rank1_seeds": [r[split][feature]["rank1"] for r in runs],
                "mAP": float(ap.mean()),
                "mAP_interval": list(bootstrap_interval(ap, level=level)),
                "rank1": float(r1.mean()),
                "rank1_interval": list(bootstrap_interval(r1, level=level)),
                "gap_closed": (float(ap.mean()) - random["mAP"]) / (teacher - random["mAP"]),
                "random": random,
                "cka_seeds": [r[split]["fidelity"][feature]["cka"] for r in runs],
                "knn10_seeds": [r[split]["fidelity"][feature]["knn10"] for r in runs],
            }
            if config != "dpal" and set(row["seeds"]) <= dpal_seeds:
                # paired by seed too: dpal's runs of the same seeds against this configuration's
                ref = pooled(results, "dpal", split, feature, "ap", row["seeds"])
                diff = paired_bootstrap(ref, ap, level=level)
                cell["dpal_minus_this"] = diff._asdict()
            row[feature] = cell
        row["val_final"] = final_val(runs)
        table[config] = row
    return table


def final_val(runs: list[dict]) -> dict[str, list[float]]:
    """Each held-out loss term at the end of each seed's run."""
    terms: dict[str, list[float]] = {}
    for r in runs:
        for term, points in r["curves"].items():
            if points:
                terms.setdefault(term, []).append(points[-1][1])
    return terms


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def spread(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def markdown(results: dict, table: dict, split: str, level: float) -> str:
    """The table for docs/benchmarks.md: one row per configuration and feature."""
    t = results["reference"][split]["teacher"]
    lines = [
        f"Split {split}. Teacher (the store's) mAP {pct(t['mAP'])} [{pct(t['mAP_lo'])}, {pct(t['mAP_hi'])}], "
        f"R1 {pct(t['rank1'])}. Intervals: {level:.0%} bootstrap over queries of the seed-mean per-query "
        "AP (R1). Gap closed: against the random students of the same seeds (their mAP in the column). "
        "CKA and kNN: the gallery features' linear CKA and 10-NN agreement with the teacher's, per seed "
        "(the random students' in brackets).",
        "",
        "| configuration | feature | mAP per seed | mAP (seed mean) [interval] | R1 [interval] | random mAP "
        "| gap closed | dpal minus this, mAP [interval] | CKA per seed [random] | kNN-10 per seed [random] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, row in table.items():
        for feature in FEATURES:
            c = row[feature]
            diff = c.get("dpal_minus_this")
            diff_s = f"{pct(diff['mean'])} [{pct(diff['lo'])}, {pct(diff['hi'])}]" if diff else "-"
            lines.append(
                f"| {config} | {feature} | {' / '.join(pct(m) for m in c['mAP_seeds'])} | "
                f"{pct(c['mAP'])} [{pct(c['mAP_interval'][0])}, {pct(c['mAP_interval'][1])}] | "
                f"{pct(c['rank1'])} [{pct(c['rank1_interval'][0])}, {pct(c['rank1_interval'][1])}] | "
                f"{pct(c['random']['mAP'])} | {c['gap_closed']:.0%} | {diff_s} | "
                f"{spread(c['cka_seeds'])} [{c['random']['cka']:.2f}] | "
                f"{spread(c['knn10_seeds'])} [{c['random']['knn10']:.2f}] |"
            )
    if not any(row["val_final"] for row in table.values()):
        return "\n".join(lines)
    lines += ["", "Held-out loss terms at the end of each run (`--val-store`), per seed:", ""]
    lines += ["| configuration | term | per seed |", "|---|---|---|"]
    for config, row in table.items():
        for term, values in row["val_final"].items():
            if term.startswith("reid"):
                continue
            lines.append(f"| {config} | {term} | {spread(values, 4)} |")
    return "\n".join(lines)


def plot_curves(results: dict, out: Path) -> Path:
    """One panel per configuration: each seed's held-out total loss over the steps (PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    runs: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        runs.setdefault(r["config"], []).append(r)
    cols, (w, h) = 3, (320, 200)
    rows = -(-len(runs) // cols)
    image = Image.new("RGB", (w * cols, h * rows), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    for i, (config, seeds) in enumerate(runs.items()):
        ox, oy = (i % cols) * w, (i // cols) * h
        curves = [r["curves"].get("total", []) for r in seeds]
        points = [p for c in curves for p in c]
        if not points:
            continue
        x1, (y0, y1) = max(s for s, _ in points) or 1, (min(v for _, v in points), max(v for _, v in points))
        y1 = y1 if y1 > y0 else y0 + 1
        draw.text((ox + 44, oy + 4), f"{config}: held-out loss", fill=(60, 60, 60), font=font)
        draw.text((ox + 2, oy + 22), f"{y1:.3g}", fill=(90, 90, 90), font=font)
        draw.text((ox + 2, oy + h - 30), f"{y0:.3g}", fill=(90, 90, 90), font=font)
        draw.rectangle([ox + 44, oy + 20, ox + w - 10, oy + h - 18], outline=(90, 90, 90))
        draw.text((ox + w - 80, oy + h - 14), f"step {x1}", fill=(90, 90, 90), font=font)
        for k, curve in enumerate(curves):
            xy = [
                (ox + 44 + (w - 54) * s / x1, oy + h - 18 - (h - 38) * (v - y0) / (y1 - y0)) for s, v in curve
            ]
            if len(xy) > 1:
                draw.line(xy, fill=colours[k % len(colours)], width=2)
            draw.text(
                (ox + 50 + 60 * k, oy + h - 14), f"seed {seeds[k]['seed']}", fill=colours[k % 3], font=font
            )
    path = out / "curves.png"
    image.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", required=True, help="folder for runs/, logs/, results.json, table.md, curves.png"
    )
    ap.add_argument("--store", required=True, help="the training store (the demo's sizes)")
    ap.add_argument(
        "--val-store", default="", help="a store of held-out images with the same teacher and views"
    )
    ap.add_argument(
        "--compact-store", default="", help="the same corpus cached with another codec (dpal-compact)"
    )
    ap.add_argument("--reid", default=str(ROOT / "sample_data" / "reid"), help="the test split")
    ap.add_argument(
        "--val-reid",
        default="",
        help="a validation ReID split for choosing settings (`--make-val-reid` writes one from the corpus)",
    )
    ap.add_argument(
        "--make-val-reid",
        default="",
        metavar="CORPUS",
        help="write OUT/val_reid from this corpus's tracks (t<track>_f<frame>.jpg) and use it as --val-reid",
    )
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12, help="the demo's budget")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--base-lr", type=float, default=1.2e-2)
    ap.add_argument(
        "--distill-args", default="", help="more `dpal distill` options for every run, one string"
    )
    ap.add_argument("--val-every", type=int, default=60, help="steps between held-out validations")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at a time")
    ap.add_argument("--level", type=float, default=0.9, help="bootstrap interval level")
    ap.add_argument("--skip-train", action="store_true", help="score the runs already exported")
    args = ap.parse_args()
    args.extra = shlex.split(args.distill_args)
    configs = args.configs or [c for c in DEFAULT_CONFIGS if c not in NEEDS_COMPACT or args.compact_store]
    if any(c in NEEDS_COMPACT for c in configs) and not args.compact_store:
        ap.error("dpal-compact needs --compact-store")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.make_val_reid:
        args.val_reid = str(make_val_reid(Path(args.make_val_reid), out / "val_reid"))
    # seeds outermost: with a time limit, every configuration gets its first seed before any its second
    jobs = [(c, s) for s in args.seeds for c in configs]
    t0 = time.perf_counter()
    timings = [] if args.skip_train else train_all(args, jobs)
    results = evaluate_all(args, jobs)
    results["timings"] = timings
    results["settings"] = {k: v for k, v in vars(args).items()}
    texts = []
    for split in results["reference"]:
        results[f"table_{split}"] = table = summarize(results, configs, split, args.level)
        texts.append(markdown(results, table, split, args.level))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = "\n\n".join(texts)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"curves: {plot_curves(results, out)}; results: {out / 'results.json'}")
    print(f"bench/recipes.py finished in {time.perf_counter() - t0:.0f} s")


def make_val_reid(corpus: Path, out: Path, min_crops: int = 6) -> Path:
    """A validation ReID split in Market-1501 layout from a corpus of track crops named
    t<track>_f<frame>.jpg (scripts/make_sample_corpus.py): each track with at least `min_crops`
    crops is one identity, its first half in frame order pseudo-camera 1, its second half
    camera 2; every crop is a query and a gallery image, matched against the other half. The
    student trains on these crops (without labels); the test split (sample_data/reid) comes from
    later frames. Two tracks of one person would count as two identities."""
    import re
    import shutil

    tracks: dict[int, list[tuple[int, Path]]] = {}
    for p in sorted(corpus.glob("*.jpg")):
        m = re.fullmatch(r"t(\d+)_f(\d+)\.jpg", p.name)
        if m:
            tracks.setdefault(int(m.group(1)), []).append((int(m.group(2)), p))
    if out.exists():
        shutil.rmtree(out)
    for sub in ("query", "bounding_box_test"):
        (out / sub).mkdir(parents=True)
    for track, crops in tracks.items():
        if len(crops) < min_crops:
            continue
        crops.sort()
        for i, (frame, path) in enumerate(crops):
            name = f"{track:04d}_c{1 + (2 * i >= len(crops))}s1_{frame:06d}_00.jpg"
            for sub in ("query", "bounding_box_test"):
                shutil.copyfile(path, out / sub / name)
    return out


if __name__ == "__main__":
    main()
