#!/usr/bin/env bash
# Stage two's speed and results at another commit against the working tree, side by side.
#
#   bench/compare_commits.sh OLD_COMMIT STORE [STEPS] [ROUNDS]
#
# Runs `dpal distill` on STORE for STEPS steps (default 60) with the code of OLD_COMMIT (from
# `git archive`, imported first through PYTHONPATH) and with the working tree's, alternating
# ROUNDS times (default 2) so that other load on the machine slows both alike. Prints each run's
# wall time and images/s, and whether the two codes' metrics.jsonl lines are equal once the timing
# field is left out. The settings are the demo's (scripts/demo.py): dpal_vit_tiny, batch 16.
set -euo pipefail
old=${1:?usage: bench/compare_commits.sh OLD_COMMIT STORE [STEPS] [ROUNDS]}
store=$(realpath "${2:?usage: bench/compare_commits.sh OLD_COMMIT STORE [STEPS] [ROUNDS]}")
steps=${3:-60}
rounds=${4:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$repo/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/old/dpal"
git -C "$repo" archive "$old" | tar -x -C "$work/old/dpal"

run() {  # run <old|new> <round>
    local out=$work/$1-$2 pp=""
    [ "$1" = old ] && pp=$work/old
    local t0 t1
    t0=$(date +%s.%N)
    (cd "$work" && PYTHONPATH=$pp "$py" -m dpal.cli distill --store "$store" --out "$out" --student dpal_vit_tiny \
        --epochs 12 --batch-size 16 --base-lr 0.012 --warmup-epochs 1 --num-workers 0 --max-steps "$steps" \
        --quiet >"$out.log" 2>&1) || { echo "$1 failed:"; tail -5 "$out.log"; exit 1; }
    t1=$(date +%s.%N)
    "$py" - "$1" "$2" "$t0" "$t1" "$out/metrics.jsonl" <<'EOF'
import json, sys
which, rnd, t0, t1, path = sys.argv[1:]
last = json.loads(open(path).read().splitlines()[-1])
print(f"{which} (round {rnd}): {float(t1) - float(t0):.1f} s wall, {last['images_per_s']:.2f} images/s at step {last['step']}")
EOF
}

echo "old = $old, new = working tree of $(git -C "$repo" rev-parse --short HEAD); $steps steps on $store; load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
    run old "$r"
    run new "$r"
done
"$py" - "$work/old-1/metrics.jsonl" "$work/new-1/metrics.jsonl" <<'EOF'
import json, sys
a, b = ([{k: v for k, v in json.loads(ln).items() if k != "images_per_s"} for ln in open(p)] for p in sys.argv[1:])
print(f"metrics.jsonl, timing aside: {'equal' if a == b else 'DIFFERENT'} ({len(a)} and {len(b)} lines)")
EOF
