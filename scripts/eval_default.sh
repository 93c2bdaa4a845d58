#!/usr/bin/env bash
# The accuracy sweep behind docs/RESULTS.md: the default model (SmolLM2-135M-Instruct) with its shipped
# encoders, every method side by side at budgets 1/8 and 1/16, contexts 4K and 8K, 20 samples per task
# and length. Resumable: rerun the same command after an interruption and it continues where it stopped.
#
#   scripts/eval_default.sh [OUT]            (default OUT: runs/eval-default, git-ignored)
#
# Environment overrides: TASKS, LENGTHS, SAMPLES, BUDGETS, METHODS (comma lists).
# In the background:  nohup scripts/eval_default.sh > /tmp/eval-default.log 2>&1 &
# Output: OUT/results.jsonl (one line per task, length, sample, method, budget), OUT/summary.md,
# OUT/summary.csv, OUT/accuracy_vs_budget.png, OUT/accuracy_vs_length.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/eval-default}
TASKS=${TASKS:-niah_single_1}
LENGTHS=${LENGTHS:-4096,8192}
SAMPLES=${SAMPLES:-20}
BUDGETS=${BUDGETS:-1/8,1/16}
METHODS=${METHODS:-dense,dashkv,simhash,quest,snapkv,h2o,streaming,oracle}

exec "$PY" -m dashkv.cli eval --model smollm2-135m --methods "$METHODS" --budgets "$BUDGETS" \
    --tasks "$TASKS" --lengths "$LENGTHS" --samples "$SAMPLES" --haystack default --seed 0 --bits 64 \
    --out "$OUT"
