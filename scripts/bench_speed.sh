#!/usr/bin/env bash
# The speed numbers of docs/RESULTS.md §1-§2 (issue 12), each row written under results/bench/.
# Run it on an otherwise idle machine: every ratio is taken against rows measured in the same run, but
# a second job on a 2-core box stalls torch's OpenMP regions and inflates every row.
#
#   scripts/bench_speed.sh            # all of it (~20 min on 2 cores)
#   ONLY=decode8k scripts/bench_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=results/bench
mkdir -p "$OUT"
run() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ] || return 0; shift; echo "+ $*" >&2; "$@"; }

# end to end, 8K context (8000 + warm-up + timed steps <= 8192), batch 1 and 8, fp32 and bf16
run decode8k "$PY" -m dashkv.cli bench decode --context 8000 --batch 1,8 --dtype float32 --steps 24 --warmup 4 \
    --profile --json "$OUT/decode-8k-fp32.json"
run decode8k_bf16 "$PY" -m dashkv.cli bench decode --context 8000 --batch 1,8 --dtype bfloat16 --steps 24 --warmup 4 \
    --json "$OUT/decode-8k-bf16.json"
# short contexts: where selection cannot pay (the min_context default comes from these)
for n in 1024 2048 4096; do
  run "decode$n" "$PY" -m dashkv.cli bench decode --context $n --batch 1 --dtype float32 --steps 24 --warmup 4 \
      --json "$OUT/decode-$n-fp32.json"
  run "decode${n}_bf16" "$PY" -m dashkv.cli bench decode --context $n --batch 1 --dtype bfloat16 --steps 24 --warmup 4 \
      --json "$OUT/decode-$n-bf16.json"
  # the same with selection from the fp32 crossover on: what the bf16 default (5120) was measured against
  run "decode${n}_bf16_select" "$PY" -m dashkv.cli bench decode --context $n --batch 1 --dtype bfloat16 --steps 24 \
      --warmup 4 --min-context 1536 --json "$OUT/decode-$n-bf16-min1536.json"
done
# one layer's attention kernel
run kernel "$PY" -m dashkv.cli bench kernel --n 4096,16384,65536 --bits 64 --shapes smollm2 --repeats 20 \
    --json "$OUT/kernel-fp32.json"
run kernel_bf16 "$PY" -m dashkv.cli bench kernel --n 4096,16384,65536 --bits 64 --shapes smollm2 --repeats 20 \
    --dtype bfloat16 --json "$OUT/kernel-bf16.json"
# issue 10's selection options at 8K, batch 1, fp32: their speed cost beside today's default
for opt in "rerank 4" "rerank 8" "head-budget pooled"; do
  set -- $opt
  run "decode8k_$1$2" "$PY" -m dashkv.cli bench decode --context 8000 --batch 1 --dtype float32 --steps 24 --warmup 4 \
      --$1 $2 --json "$OUT/decode-8k-fp32-$1-$2.json"
done
