"""Issue 10: Gemma-3-270M probe — what its 3 global layers need (steps, query MLP), on one small capture
(6 calibration windows of 4096 tokens of the default script's text, 2 held-out essay windows), 1 thread.

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/probe_gemma.py GGUF OUT.json
"""
import json, sys, time
import torch

torch.set_num_threads(1)
from dashkv import load_model
from dashkv.calibrate import (_evaluate_layers, _budget_label, essays_dir, load_texts, make_sequences,
                              stdlib_package_dirs, train_layer, _shape_of)
from dashkv.capture import capture_qkv
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.selection import DashKVPolicy, SimHashPolicy

mdl, tok = load_model(sys.argv[1])
shape = _shape_of(mdl)
LAYERS = [5, 11, 17]
from pydoc_data.topics import topics
texts = load_texts(["/usr/share/common-licenses", *stdlib_package_dirs()]) + ["\n\n".join(topics[k] for k in sorted(topics))]
t = time.perf_counter()
cal = capture_qkv(mdl, make_sequences(tok, texts, 4096, 6), LAYERS, queries_per_seq=32, progress=False)
pos = torch.linspace(2048, 4095, 32).round().long().unique()
held = capture_qkv(mdl, make_sequences(tok, load_texts([essays_dir()]), 4096, 2), LAYERS, positions=pos,
                   keep_values=True, progress=False)
res = {"capture_seconds": round(time.perf_counter() - t, 1)}
print(res, flush=True)
plans = {_budget_label(b): DashKVConfig(bits=64, budget=b, sink=4, window=64) for b in (1 / 16, 1 / 32)}
base = DashKVConfig(bits=64, sink=4, window=64)


def measure(methods):
    rows = []
    _evaluate_layers(dict(held), LAYERS, pos, methods, ("kv_head",), plans, rows, False)
    out = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["budget"], []).append((r["recall"], r["output_error"]))
    return {m: {b: [round(sum(x[0] for x in v) / len(v), 4), round(sum(x[1] for x in v) / len(v), 4)]
                for b, v in d.items()} for m, d in out.items()}


res.update(measure({"simhash": SimHashPolicy(base, HashEncoders.simhash(shape, 64, LAYERS)), "oracle": None}))
print(res, flush=True)
class ProbSum(DashKVPolicy):
    """kv_head set by the sum of estimated probabilities (as oracle combines), not of raw scores."""

    def per_head_scores(self, state, query):
        sc = super().per_head_scores(state, query)
        return torch.softmax(sc / self.config.bits * self.encoders.logit_scale(state.layer_idx)[None, :, None], -1)


if len(sys.argv) > 3:  # second round: bits and selection options
    VARIANTS = {"128 bits": {"bits": 128}, "256 bits": {"bits": 256}}
    for name, kw in VARIANTS.items():
        b = kw["bits"]
        enc = HashEncoders(shape, b, LAYERS)
        for L in LAYERS:
            layer, _ = train_layer(cal[L], b, seed=L, key_relax="anneal", quantization=0.1, balance=0.1)
            enc.layers[str(L)].load_state_dict(layer.state_dict())
        cfg = DashKVConfig(bits=b, sink=4, window=64)
        res[name] = measure({"learned": DashKVPolicy(cfg, enc)})["learned"]
        res[name + ", SimHash"] = measure({"s": SimHashPolicy(cfg, HashEncoders.simhash(shape, b, LAYERS))})["s"]
        print(name, res[name], res[name + ", SimHash"], flush=True)
    enc = HashEncoders(shape, 64, LAYERS)
    for L in LAYERS:
        layer, _ = train_layer(cal[L], 64, seed=L, key_relax="anneal", quantization=0.1, balance=0.1)
        enc.layers[str(L)].load_state_dict(layer.state_dict())
    res["64 bits, spatial_vote 0.5"] = measure({"m": DashKVPolicy(DashKVConfig(bits=64, sink=4, window=64,
                                                                              spatial_vote=0.5), enc)})["m"]
    res["64 bits, probability-sum grouping"] = measure({"m": ProbSum(base, enc)})["m"]
    print(res, flush=True)
    open(sys.argv[3], "w").write(json.dumps(res, indent=1))
    sys.exit(0)
VARIANTS = {"default (200 steps)": {}, "ste (previous default)": {"key_relax": "ste", "quantization": 0.0,
                                                               "balance": 0.05},
            "1000 steps": {"steps": 1000}, "mlp3 256": {"query_depth": 3, "query_hidden": 256},
            "mlp3 256, 1000 steps": {"query_depth": 3, "query_hidden": 256, "steps": 1000}}
for name, kw in VARIANTS.items():
    t = time.perf_counter()
    kw = {"key_relax": "anneal", "quantization": 0.1, "balance": 0.1, "steps": 200, **kw}
    enc = HashEncoders(shape, 64, LAYERS, query_depth=kw.get("query_depth"), query_hidden=kw.get("query_hidden"))
    for L in LAYERS:
        layer, _ = train_layer(cal[L], 64, seed=L, **kw)
        enc.layers[str(L)].load_state_dict(layer.state_dict())
    res[name] = {**measure({"learned": DashKVPolicy(base, enc)})["learned"], "seconds": round(time.perf_counter() - t, 1)}
    print(name, res[name], flush=True)
    open(sys.argv[2], "w").write(json.dumps(res, indent=1))
