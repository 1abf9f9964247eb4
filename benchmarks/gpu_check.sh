#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md, "Running the GPU check").
# Run from the repository root on a CUDA machine. Results go to $OUT (default ./gpu_check_out).
# Packages the machine lacks travel as wheels in .whl/ (fetched beforehand with pip download;
# sentence-transformers needs `datasets`, which needs dill and multiprocess); they are
# installed into a private folder, never into the machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/vlm2emb-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/vlm2emb-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
exec python3 benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-450}" "$@"
