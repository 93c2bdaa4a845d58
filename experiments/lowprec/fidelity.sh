#!/usr/bin/env bash
# Three tiers at equal bytes: DASH-KV with an 8-bit tier taking F of the candidate budget's bytes (its rows
# charged at their bytes, ~3.8x as many as the exact rows they replace) against the plain exact tier.
# Teacher-forced fidelity, shipped encoders; the F = 0 rows are experiments/fastscan/fidelity-<L>-qnone/
# (same documents and positions).  LENGTH=4096 DOCS=2 experiments/lowprec/fidelity.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
L=${LENGTH:-4096}; D=${DOCS:-2}
for f in ${FRACTIONS:-0.25 0.5}; do
  "$PY" -m dashkv.cli eval --seed 0 --bits 64 --haystack default --model smollm2-135m \
    --methods dense,dashkv --budgets 1/16,1/32 --tasks fidelity_prose,fidelity_code --lengths "$L" \
    --samples "$D" --positions 128 --prefill-dtype fp32 --threads 1 --lowprec-fraction "$f" \
    --out "experiments/lowprec/fidelity-${L}-low$f"
done
