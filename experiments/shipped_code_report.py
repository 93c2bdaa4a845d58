"""Held-out code report of the encoders shipped before issue 10 (same protocol as report_code.json of
`scripts/calibrate_default.sh`: 4 windows of 4096 tokens of the top-level stdlib modules), 1 thread.

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/shipped_code_report.py ENCODER_DIR OUT.json
"""
import json, sys, time
import torch

torch.set_num_threads(1)
from dashkv import load_model
from dashkv.calibrate import evaluate, heldout_code_files, load_texts, summary_table
from dashkv.encoders import HashEncoders

t = time.perf_counter()
mdl, tok = load_model("smollm2-135m")
enc = HashEncoders.from_pretrained(sys.argv[1])
rep = evaluate(mdl, tok, enc, load_texts(list(heldout_code_files())), seq_len=4096, num_sequences=4,
               progress=False)
rep["wall_seconds"] = round(time.perf_counter() - t, 1)
open(sys.argv[2], "w").write(json.dumps(rep, indent=1) + "\n")
print(summary_table(rep))
print("wall", rep["wall_seconds"])
