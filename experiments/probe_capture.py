"""Issue 10 probe captures: post-RoPE Q/K(/V) of probe layers of the default model, saved once, so every
encoder variant is trained and measured on the same tensors (1 torch thread).

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/probe_capture.py OUT_DIR
"""
import os, sys, time, sysconfig
from pathlib import Path
import torch

torch.set_num_threads(1)
from dashkv import load_model
from dashkv.calibrate import load_texts, make_sequences, essays_dir
from dashkv.capture import capture_qkv
from dashkv.eval.fidelity import stdlib_sources

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
LAYERS = [4, 10, 16, 22]
STD = Path(sysconfig.get_paths()["stdlib"])
mdl, tok = load_model("smollm2-135m")
from pydoc_data.topics import topics
pydoc = "\n\n".join(topics[k] for k in sorted(topics))
lic = load_texts(["/usr/share/common-licenses"])
code_cal = load_texts([STD / d for d in ("json", "logging", "collections", "concurrent", "urllib", "http")])

def cap(name, texts, L, n, **kw):
    t = time.perf_counter()
    seqs = make_sequences(tok, texts, L, n)
    c = capture_qkv(mdl, seqs, LAYERS, progress=False, **kw)
    torch.save(c, out / f"{name}.pt")
    print(f"{name}: {n} x {L} in {time.perf_counter() - t:.0f} s", flush=True)

L = 4096
# held-out (values kept; 32 positions evenly over the later half, as `evaluate` uses)
pos = torch.linspace(L // 2, L - 1, 32).round().long().unique()
cap("held_essays", load_texts([essays_dir()]), L, 3, positions=pos, keep_values=True)
cap("held_code", [p.read_text(errors="replace") for p in stdlib_sources()], L, 3, positions=pos, keep_values=True)
# calibration: licences + pydoc topics (today's text) at 4K, 64 queries from [1024, 4096) so the first half
# of each window doubles as today's 2K calibration; and stdlib subpackage code (never in the held-out pool)
cap("cal_docs", lic + [pydoc], L, 12, queries_per_seq=64, query_from=0.25, seed=0)
cap("cal_code", code_cal, L, 6, queries_per_seq=64, query_from=0.25, seed=1)
