"""Held-out reports for an already saved encoder directory (what `dashkv calibrate` does after saving)."""
import sys
from dashkv.calibrate import evaluate, write_report, load_texts, essays_dir, heldout_code_files
from dashkv.encoders import HashEncoders
from dashkv.models import load_model
model, out = sys.argv[1], sys.argv[2]
mdl, tok = load_model(model)
enc = HashEncoders.from_pretrained(out)
for suffix, texts in (("", load_texts([essays_dir()])), ("_code", load_texts(list(heldout_code_files())))):
    r = evaluate(mdl, tok, enc, texts, seq_len=4096, num_sequences=4, progress=False)
    write_report(r, out, suffix)
    s = r["summary"]
    print(suffix or "essays", {m: {b: v["recall"] for b, v in s[m]["kv_head"].items()} for m in s}, flush=True)
