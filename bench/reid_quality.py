"""Distillation quality on real pedestrians: ReID mAP of the student along a longer run than the demo.

Runs stage one (EfficientNet-Lite2, real ImageNet weights) on a corpus (default: the sample corpus),
then `dpal distill` with dpal_vit_tiny, keeping a checkpoint every `--eval-every` epochs, and
scores every kept checkpoint, the teacher and a randomly initialised student on the held-out
ReID split. Prints the learning curve and the fraction of the random-to-teacher mAP gap that the
student closes; writes everything as JSON. Views are the demo's (v0 128x64, crops 64x48, Ic 128x128).

    python bench/reid_quality.py --out /tmp/dpal_q48 --epochs 48 --batch-size 16 --base-lr 1.2e-2 --eval-every 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from dpal.commands import DPAL, cache_teacher_command, distill_command

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE)
    return res.stdout


def reid(model_args: list[str], data: str) -> dict:
    out = run(
        DPAL
        + ["eval", "reid", *model_args, "--data", data, "--image-size", "128", "--image-size", "64", "--json"]
    )
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dpal_quality")
    ap.add_argument("--corpus", default=str(ROOT / "sample_data" / "corpus"))
    ap.add_argument("--reid", default=str(ROOT / "sample_data" / "reid"))
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--base-lr", type=float, default=1.2e-2)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=8, help="epochs between evaluated checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store, run_dir = (
        out / "store",
        out / f"run-e{args.epochs}-b{args.batch_size}-lr{args.base_lr:g}-s{args.seed}",
    )
    run(cache_teacher_command(args.corpus, store, args.views, quiet=True))
    info = json.loads(run(DPAL + ["store", "info", str(store), "--json"]))
    steps_per_epoch = info["num_cached_images"] // args.batch_size
    every = steps_per_epoch * args.eval_every
    t_train = time.perf_counter()
    run(
        distill_command(
            store,
            run_dir,
            args,
            warmup_epochs=args.warmup_epochs,
            seed=args.seed,
            quiet=True,
            settings=[f"checkpoint_every={every}", "keep_last=1000", "log_every=10"],
        )
    )
    train_s = time.perf_counter() - t_train

    rows = [{**reid(["--model", "efficientnet-lite2"], args.reid), "model": "teacher efficientnet-lite2"}]
    random = {}
    for feat in ("cls", "mean"):
        r = reid(
            ["--model", "dpal_vit_tiny", "--random-init", "--seed", str(args.seed), "--feature", feat],
            args.reid,
        )
        random[feat] = r["mAP"]
        rows.append({**r, "model": f"random init ({feat})"})
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        step = int(ckpt.stem.split("-")[1])
        for feat in ("cls", "mean"):
            r = reid(["--model", str(ckpt), "--feature", feat], args.reid)
            r["gap_closed"] = (r["mAP"] - random[feat]) / (rows[0]["mAP"] - random[feat])
            rows.append({**r, "model": f"epoch {step / steps_per_epoch:.0f} ({feat})"})
    from dpal.reid import format_table

    print("\n" + format_table(rows))
    for r in rows[3:]:
        print(f"{r['model']}: closes {r['gap_closed']:.0%} of the mAP gap")
    wall = time.perf_counter() - t0
    print(f"wall time {wall / 60:.1f} min (training {train_s / 60:.1f} min)")
    (out / f"{run_dir.name}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "wall_s": wall, "train_s": train_s}, indent=1)
    )


if __name__ == "__main__":
    main()
