#!/usr/bin/env bash
# Issue 12: does the bit-plane scan (--query-bits 4 / 8) keep DASH-KV's teacher-forced fidelity?
# Same documents, shipped encoders, one process per query precision (rows under experiments/fastscan/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
L=${LENGTH:-4096}; D=${DOCS:-2}
for qb in none 4 8; do
  extra=(); [[ $qb != none ]] && extra=(--query-bits "$qb")
  PYTHONPATH=src "$PY" -m dashkv.cli eval --seed 0 --bits 64 --haystack default --model smollm2-135m \
    --methods dense,dashkv --budgets 1/16,1/32 --tasks fidelity_prose,fidelity_code --lengths "$L" \
    --samples "$D" --positions 128 --prefill-dtype fp32 --threads 1 "${extra[@]}" \
    --out "experiments/fastscan/fidelity-${L}-q$qb"
done
