"""`make demo`: the whole dpal pipeline on the sample corpus cut from a real pedestrian video.

1. `dpal cache-teacher` runs the real ImageNet EfficientNet-Lite2 teacher (offline weights) once
   over sample_data/corpus and writes the store. The teacher sees each view upsampled 2x, so its
   stride-32 map is the student's token grid (one genuine feature per token), and its last block's
   352 channels are the targets (`--teacher-layer -1`: as good for ReID as the 1280-channel head,
   at a fifth of D-PaDe's cost).
2. `dpal distill` trains the paper's dpal_vit_tiny student with D-PaDe from the store.
3. `dpal export` writes the student backbone as safetensors.
4. `dpal eval reid` scores the teacher, a randomly initialised student and the distilled student
   on the held-out ReID split (sample_data/reid, Market-1501 layout), and a table is printed.

Views are scaled down by 2 (v0 128 x 64, crops 64 x 48, Ic 128 x 128) so that the demo finishes
in minutes on two CPU cores; docs/benchmarks.md has the paper-size and longer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dpal.commands import DPAL, cache_teacher_command, distill_command

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=False, text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"demo step failed (exit {res.returncode}): {' '.join(cmd)}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return res.stdout or ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="Output folder (store, run, exported student).")
    ap.add_argument("--corpus", default=str(ROOT / "sample_data" / "corpus"))
    ap.add_argument("--reid", default=str(ROOT / "sample_data" / "reid"))
    ap.add_argument("--epochs", type=int, default=int(os.environ.get("DPAL_DEMO_EPOCHS", "12")))
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--base-lr", type=float, default=1.2e-2, help="per 256 images (peak 7.5e-4 at batch 16)")
    ap.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="loader processes; 0 on 2 cores, where a worker would steal the trainer's second core",
    )
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store, run_dir, student = out / "store", out / "run", out / "student.safetensors"

    print("\n== 1/4 stage one: cache the EfficientNet-Lite2 teacher ==", flush=True)
    run(cache_teacher_command(args.corpus, store, args.views, teacher_layer="-1"))
    run(DPAL + ["store", "info", str(store)])

    print("\n== 2/4 stage two: distill dpal_vit_tiny ==", flush=True)
    run(
        distill_command(
            store,
            run_dir,
            args,
            num_workers=args.num_workers,
            settings=["log_every=5", "checkpoint_every=100"],
        )
    )

    print("\n== 3/4 export the student ==", flush=True)
    run(DPAL + ["export", str(run_dir), "--out", str(student)])

    print("\n== 4/4 ReID on held-out frames (sample_data/reid) ==", flush=True)
    size = ["--image-size", "128", "--image-size", "64"]
    rows = []
    for label, model_args in (
        ("teacher efficientnet-lite2 (the store's)", ["--model", str(store)]),
        ("student random init, CLS", ["--model", "dpal_vit_tiny", "--random-init"]),
        ("student distilled, CLS", ["--model", str(student)]),
        (
            "student random init, mean patch",
            ["--model", "dpal_vit_tiny", "--random-init", "--feature", "mean"],
        ),
        ("student distilled, mean patch", ["--model", str(student), "--feature", "mean"]),
    ):
        res = json.loads(
            run(DPAL + ["eval", "reid", *model_args, "--data", args.reid, *size, "--json"], capture=True)
        )
        rows.append({**res, "model": label})
    from dpal.reid import format_table

    print("\n" + format_table(rows))
    print("mAP and CMC in percent; [lo, hi]: 90% bootstrap interval over the queries")
    teacher = rows[0]["mAP"]
    closed = {}
    for feat, (r, d) in (("CLS", rows[1:3]), ("mean patch", rows[3:5])):
        closed[feat] = (d["mAP"] - r["mAP"]) / (teacher - r["mAP"]) if teacher != r["mAP"] else float("nan")
        print(
            f"{feat:>10}: distillation closed {closed[feat]:.0%} of the mAP gap between the random student "
            "and the teacher"
        )
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}/")
    (out / "results.json").write_text(json.dumps({"rows": rows, "gap_closed": closed}, indent=1))


if __name__ == "__main__":
    main()
