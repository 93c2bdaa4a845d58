"""Held-out reports of an encoder directory at 4096 tokens, the protocol of `scripts/calibrate_default.sh`
(4 windows each of the essays and of the top-level stdlib modules), written beside the encoders as
report.json / report_code.json (+ plots). Used when a calibration's own evaluation did not run.

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/heldout_reports.py ENCODER_DIR
"""
import sys, time
import torch

torch.set_num_threads(1)
from dashkv import load_model
from dashkv.calibrate import essays_dir, evaluate, heldout_code_files, load_texts, summary_table, write_report
from dashkv.encoders import HashEncoders

d = sys.argv[1]
mdl, tok = load_model("smollm2-135m")
enc = HashEncoders.from_pretrained(d)
for suffix, texts in (("", load_texts([essays_dir()])), ("_code", load_texts(list(heldout_code_files())))):
    t = time.perf_counter()
    rep = evaluate(mdl, tok, enc, texts, seq_len=4096, num_sequences=4, progress=False)
    write_report(rep, d, suffix)
    print(f"held-out{suffix or '_essays'} ({time.perf_counter() - t:.0f} s)\n{summary_table(rep)}", flush=True)
