"""Issue 10: the encoders' starting projection — random hyperplanes (simhash) against the queries' top
principal directions (query_pca) — on one small capture per model (6 calibration windows of the default
script's text, 2 held-out windows of essays and of code, kv_head, sinks 4 + window 64), 1 thread.

  PYTHONPATH=src python experiments/init/probe.py MODEL LAYERS SEQ_LEN OUT.json [CACHE.pt]  # LAYERS e.g. 5,11,17

Variants: VARIANTS env, e.g. "simhash;query_pca;simhash:objective=bce;simhash:group_weight=1" (init, then
train_layer keyword overrides). CACHE.pt keeps the captures between runs.
"""
import os
import json, sys, time
import torch

torch.set_num_threads(1)
from dashkv import load_model
from dashkv.calibrate import (_evaluate_layers, _budget_label, essays_dir, heldout_code_files, load_texts,
                              make_sequences, stdlib_package_dirs, train_layer, _shape_of)
from dashkv.capture import capture_qkv
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.selection import DashKVPolicy

model_name, LAYERS, L, out = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
mdl, tok = load_model(model_name)
shape = _shape_of(mdl)
from pydoc_data.topics import topics
texts = load_texts(["/usr/share/common-licenses", *stdlib_package_dirs()]) + ["\n\n".join(topics[k] for k in sorted(topics))]
t = time.perf_counter()
pos = torch.linspace(L // 2, L - 1, 32).round().long().unique()
cache = sys.argv[5] if len(sys.argv) > 5 else None
if cache and os.path.exists(cache):
    cal, held = torch.load(cache, weights_only=False)
else:
    cal = capture_qkv(mdl, make_sequences(tok, texts, L, 6), LAYERS, queries_per_seq=32, progress=False)
    held = {kind: capture_qkv(mdl, make_sequences(tok, load_texts(src), L, 2), LAYERS, positions=pos,
                              keep_values=True, progress=False)
            for kind, src in (("essays", [essays_dir()]), ("code", list(heldout_code_files())))}
    if cache:
        torch.save((cal, held), cache)
res = {"model": model_name, "layers": LAYERS, "seq_len": L, "capture_seconds": round(time.perf_counter() - t, 1)}
print(res, flush=True)
plans = {_budget_label(b): DashKVConfig(bits=64, budget=b, sink=4, window=64) for b in (1 / 16, 1 / 32)}
base = DashKVConfig(bits=64, sink=4, window=64)


def measure(kind, methods):
    rows = []
    _evaluate_layers(dict(held[kind]), LAYERS, pos, methods, ("kv_head",), plans, rows, False)
    acc = {}
    for r in rows:
        acc.setdefault(r["method"], {}).setdefault(r["budget"], []).append((r["recall"], r["output_error"]))
    return {m: {b: [round(sum(x[0] for x in v) / len(v), 4), round(sum(x[1] for x in v) / len(v), 4)]
                for b, v in d.items()} for m, d in acc.items()}


for kind in held:
    res[f"oracle {kind}"] = measure(kind, {"oracle": None})["oracle"]
for spec in os.environ.get("VARIANTS", "simhash;query_pca").split(";"):
    init, _, rest = spec.partition(":")
    kw = {"key_relax": "anneal", "quantization": 0.1, "balance": 0.1, "steps": 200}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        kw[k] = type(kw[k])(v) if k in kw else (v if k == "objective" else float(v))
    t = time.perf_counter()
    enc = HashEncoders(shape, 64, LAYERS)
    for li in LAYERS:
        layer, _ = train_layer(cal[li], 64, seed=li, init=init, **kw)
        enc.layers[str(li)].load_state_dict(layer.state_dict())
    secs = round(time.perf_counter() - t, 1)
    for kind in held:
        res[f"{spec} {kind}"] = {**measure(kind, {"learned": DashKVPolicy(base, enc)})["learned"],
                                 "train_seconds": secs}
        print(spec, kind, res[f"{spec} {kind}"], flush=True)
    open(out, "w").write(json.dumps(res, indent=1))
