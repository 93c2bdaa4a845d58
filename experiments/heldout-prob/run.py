"""Held-out reports (essays and code at 4K, budgets 1/16 and 1/32) for a saved encoder set, with the
probability group score beside the sum (`kv_head_prob` against `kv_head`), so that encoder sets are
compared under the score decoding uses by default:

    .venv/bin/python experiments/heldout-prob/run.py shipped   # src/dashkv/data/encoders/smollm2-135m-b64
    .venv/bin/python experiments/heldout-prob/run.py stop20    # experiments/encoders-stop20 (make.sh first)
    .venv/bin/python experiments/heldout-prob/run.py recreated # EXTRA="--init simhash --key-levels 1"
        # scripts/calibrate_default.sh 64 experiments/encoders-stop20/recreated  (the stop-20 recipe today)

Writes experiments/heldout-prob/<name>/report{,_code}.json and recall{,_code}.png; prints the summary.
"""
import sys
from pathlib import Path

from dashkv.calibrate import essays_dir, evaluate, heldout_code_files, load_texts, summary_table, write_report
from dashkv.encoders import HashEncoders
from dashkv.models import load_model

SETS = {"shipped": "src/dashkv/data/encoders/smollm2-135m-b64", "stop20": "experiments/encoders-stop20",
        "recreated": "experiments/encoders-stop20/recreated"}  # recreated: the stop-20 recipe re-run today

name = sys.argv[1]
out = Path(__file__).parent / name
mdl, tok = load_model("smollm2-135m")
enc = HashEncoders.from_pretrained(SETS[name])
for suffix, texts in (("", load_texts([essays_dir()])), ("_code", load_texts(list(heldout_code_files())))):
    r = evaluate(mdl, tok, enc, texts, seq_len=4096, num_sequences=4, budgets=(1 / 16, 1 / 32),
                 scorers=("asymmetric",), progress=False)
    write_report(r, out, suffix)
    print(suffix or "essays", flush=True)
    print(summary_table(r), flush=True)
