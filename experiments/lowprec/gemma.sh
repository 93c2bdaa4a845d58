#!/usr/bin/env bash
# Gemma-3-270M, RULER-style needles at 4K, 1/16: DASH-KV with the 8-bit tier at equal bytes (F of the
# candidate bytes) -- more candidates per byte, where the learned codes rank the needle at 418-541 of
# 4K (docs/calibration.md). F = 0 rows: results/eval/gemma3-270m-ruler-4k (same samples).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
F=${F:-0.5}
"$PY" -m dashkv.cli eval --seed 0 --bits 64 --haystack default --model /work/models/gemma-3-270m-q4_k_m.gguf \
  --encoders experiments/results/gemma-3-270m-b64-encoders --methods dense,dashkv,oracle --budgets 1/16 \
  --tasks ${TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1} --lengths 4096 --samples ${SAMPLES:-10} \
  --prefill-dtype bf16 --threads 1 --lowprec-fraction "$F" --out "experiments/lowprec/gemma-ruler-4k-low$F"
