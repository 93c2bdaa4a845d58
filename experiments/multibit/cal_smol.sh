#!/bin/bash
# usage: cal_smol.sh NAME extra-args...   (CLI defaults: 4K windows x 12, the previous 4K set's recipe)
cd /work/main
name=$1; shift
OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python -m dashkv.calibrate --model smollm2-135m \
  --text /usr/share/common-licenses /tmp/python-doc-topics.txt \
  $(PYTHONPATH=src .venv/bin/python -c "from dashkv.calibrate import stdlib_package_dirs as d; print(*d())") \
  --heldout "$(PYTHONPATH=src .venv/bin/python -c 'from dashkv.calibrate import essays_dir; print(essays_dir())')" --heldout-code \
  --out experiments/multibit/smollm2-$name --fp16 --quiet --overwrite "$@" > experiments/multibit/smollm2-$name.log 2>&1
