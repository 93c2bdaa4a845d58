#!/usr/bin/env bash
# The default model's encoder set shipped in stop 20 (2K-8K recipe, random start, sign codes; weights
# sha256 c2ee116d...), extracted from git so an eval can run it beside the set shipped now:
#   bash experiments/encoders-stop20/make.sh   # -> experiments/encoders-stop20/encoders.{json,safetensors}
set -euo pipefail
cd "$(dirname "$0")/../.."
for f in encoders.json encoders.safetensors; do
  git show "7e0e54b:src/dashkv/data/encoders/smollm2-135m-b64/$f" > "experiments/encoders-stop20/$f"
done
