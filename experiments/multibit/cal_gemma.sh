#!/bin/bash
# usage: cal_gemma.sh NAME extra-args...
cd /work/main
name=$1; shift
OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python -m dashkv.calibrate --model /work/models/gemma-3-270m-q4_k_m.gguf \
  --text /usr/share/common-licenses /tmp/python-doc-topics.txt \
  $(PYTHONPATH=src .venv/bin/python -c "from dashkv.calibrate import stdlib_package_dirs as d; print(*d())") \
  --heldout "$(PYTHONPATH=src .venv/bin/python -c 'from dashkv.calibrate import essays_dir; print(essays_dir())')" --heldout-code \
  --out experiments/multibit/gemma-$name --fp16 --quiet --overwrite "$@" > experiments/multibit/gemma-$name.log 2>&1
