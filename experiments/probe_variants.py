"""Issue 10 ingredient table: train encoder variants on the probe captures of `probe_capture.py` and measure
held-out recall / output error at 4K on essays and stdlib code (kv_head grouping, b = 64, 1/16 and 1/32).

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/probe_variants.py CAPTURE_DIR OUT.json [VARIANT ...]
"""
import json, sys, time
from pathlib import Path
import torch

torch.set_num_threads(1)
from dashkv.calibrate import train_layer, _evaluate_layers, _budget_label, DashKVConfig
from dashkv.capture import LayerCapture
from dashkv.encoders import HashEncoders
from dashkv.selection import DashKVPolicy, SimHashPolicy

cdir, out = Path(sys.argv[1]), Path(sys.argv[2])
only = sys.argv[3:]
LAYERS = [4, 10, 16, 22]
SHAPE = {"model_type": "llama", "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}
docs = torch.load(cdir / "cal_docs.pt", weights_only=False)
code = torch.load(cdir / "cal_code.pt", weights_only=False)
held = {k: torch.load(cdir / f"held_{k}.pt", weights_only=False) for k in ("essays", "code")}


def subset(c: LayerCapture, lo: int, hi: int, n_keys: int, per_seq: int, seqs=None) -> LayerCapture:
    """Keys [0, n_keys) and the first `per_seq` captured queries with positions in [lo, hi) per sequence."""
    seqs = range(c.num_sequences) if seqs is None else seqs
    ks, qs, ps = [], [], []
    for s in seqs:
        sel = ((c.positions[s] >= lo) & (c.positions[s] < hi)).nonzero()[:, 0][:per_seq]
        assert len(sel) == per_seq, (s, len(sel))
        ks.append(c.keys[s, :, :n_keys]); qs.append(c.queries[s][:, sel]); ps.append(c.positions[s][sel])
    return LayerCapture(torch.stack(ks), None, torch.stack(qs), torch.stack(ps), c.scaling)


def cat(a: LayerCapture, b: LayerCapture) -> LayerCapture:
    return LayerCapture(torch.cat([a.keys, b.keys]), None, torch.cat([a.queries, b.queries]),
                        torch.cat([a.positions, b.positions]), a.scaling)


CAL = {
    "docs2k": lambda L: subset(docs[L], 1024, 2048, 2048, 12),        # today's length: 2K windows, later half
    "docs4k": lambda L: subset(docs[L], 2048, 4096, 4096, 32),
    "mix4k": lambda L: cat(subset(docs[L], 2048, 4096, 4096, 32, range(0, 12, 2)),
                           subset(code[L], 2048, 4096, 4096, 32)),
    "mix4k-q48": lambda L: cat(subset(docs[L], 1024, 4096, 4096, 48, range(0, 12, 2)),
                               subset(code[L], 1024, 4096, 4096, 48)),
}
MLP3 = dict(query_depth=3, query_hidden=256)
PAPER = dict(key_relax="anneal", quantization=0.1, balance=0.1)
VARIANTS = {
    "docs2k": ("docs2k", {}),
    "docs4k": ("docs4k", {}),
    "mix4k": ("mix4k", {}),
    "mix4k+mlp3": ("mix4k", MLP3),
    "mix4k+anneal": ("mix4k", PAPER),
    "mix4k+mlp3+anneal": ("mix4k", {**MLP3, **PAPER}),
    "mix4k-q48": ("mix4k-q48", {}),
    "mix4k+400steps": ("mix4k", {"steps": 400}),
    "mix4k+mlp3+lr2e-3": ("mix4k", {**MLP3, "lr": 2e-3}),
    "mix4k+anneal-noquant": ("mix4k", {"key_relax": "anneal"}),
    "mix4k+anneal+group1": ("mix4k", {**PAPER, "group_weight": 1.0}),
    "mix4k+anneal+group3": ("mix4k", {**PAPER, "group_weight": 3.0}),
    "mix4k-q48+anneal": ("mix4k-q48", PAPER),
    "mix4k+anneal+400steps": ("mix4k", {**PAPER, "steps": 400}),
    "mix4k+anneal+cosine": ("mix4k", {**PAPER, "lr_schedule": "cosine"}),
    "mix4k+anneal+cosine+lr1e-2": ("mix4k", {**PAPER, "lr_schedule": "cosine", "lr": 1e-2}),
}
budgets = (1 / 16, 1 / 32)
plans = {_budget_label(b): DashKVConfig(bits=64, budget=b, sink=4, window=64) for b in budgets}
positions = torch.linspace(2048, 4095, 32).round().long().unique()
results = json.loads(out.read_text()) if out.exists() else {}


def measure(name, enc, with_baselines=False):
    base = DashKVConfig(bits=64, sink=4, window=64)
    methods = {"learned": DashKVPolicy(base, enc)}
    if with_baselines:
        methods["simhash"] = SimHashPolicy(base, HashEncoders.simhash(SHAPE, 64, LAYERS, seed=0))
        methods["oracle"] = None
    res = {}
    for kind, caps in held.items():
        rows = []
        _evaluate_layers(dict(caps), LAYERS, positions, methods, ("kv_head",), plans, rows, False)
        for r in rows:
            d = res.setdefault(r["method"], {}).setdefault(kind, {}).setdefault(r["budget"], {"per_layer": {}})
            d["per_layer"][r["layer"]] = [round(r["recall"], 4), round(r["output_error"], 4)]
        for m in res:
            for b, d in res[m][kind].items():
                vals = list(d["per_layer"].values())
                d["recall"] = round(sum(v[0] for v in vals) / len(vals), 4)
                d["output_error"] = round(sum(v[1] for v in vals) / len(vals), 4)
    return res


if "shipped" not in results and (not only or "shipped" in only):
    t = time.perf_counter()
    shipped = HashEncoders.for_default_model(64)
    res = measure("shipped", shipped, with_baselines=True)
    results["simhash"], results["oracle"] = res.pop("simhash"), res.pop("oracle")
    results["shipped"] = {**res["learned"], "seconds": round(time.perf_counter() - t, 1)}
    out.write_text(json.dumps(results, indent=1))
    print("shipped", {k: (v["1/16"]["recall"], v["1/32"]["recall"]) for k, v in results["shipped"].items() if k != "seconds"}, flush=True)
    print("oracle", {k: (v["1/16"]["recall"], v["1/32"]["recall"]) for k, v in results["oracle"].items()}, flush=True)
    print("simhash", {k: (v["1/16"]["recall"], v["1/32"]["recall"]) for k, v in results["simhash"].items()}, flush=True)

for name, (cal, kw) in VARIANTS.items():
    if (only and name not in only) or name in results:
        continue
    t = time.perf_counter()
    kw = dict(kw)
    qd, qh = kw.get("query_depth", 1), kw.get("query_hidden", 0)
    enc = HashEncoders(SHAPE, 64, LAYERS, query_depth=qd, query_hidden=qh)
    for L in LAYERS:
        layer, _ = train_layer(CAL[cal](L), 64, seed=L, **{"steps": 200, **kw})
        enc.layers[str(L)].load_state_dict(layer.state_dict())
    t_train = time.perf_counter() - t
    res = measure(name, enc)["learned"]
    results[name] = {**res, "train_seconds": round(t_train, 1), "seconds": round(time.perf_counter() - t, 1),
                     "calibration": cal, "options": kw}
    out.write_text(json.dumps(results, indent=1))
    print(name, {k: (v["1/16"]["recall"], v["1/16"]["output_error"], v["1/32"]["recall"])
                 for k, v in res.items()}, f"train {t_train:.0f}s total {time.perf_counter() - t:.0f}s", flush=True)
