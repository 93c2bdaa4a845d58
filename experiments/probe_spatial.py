"""Issue 10: distance calibration, the cross-head vote Δ_spatial, on the probe layers.

The default recipe is trained once on the mix4k probe captures (cached in CAPTURE_DIR), then kv_head
selection is measured with per-query-head scores s_h(j) replaced by s_h(j) + λ·σ_h·vote(j), where
vote(j) = mean over all query heads of the layer of the standardised score (s_h'(j) − μ_h')/σ_h'
(a key that many heads rank highly gains; λ < 0 discounts it, as the design note reads it), and the
same with the vote restricted to each head's top-T fraction (a hard vote: share of heads whose top 1/16
holds j).

  cd experiments && PYTHONPATH=../src:. python probe_spatial.py CAPTURE_DIR OUT.json
"""
import json, sys, time
from pathlib import Path
import torch

sys.argv, argv = sys.argv[:1] + [sys.argv[1], "/dev/null/none.json", "__none__"], sys.argv
import probe_variants as pv  # noqa: E402
from dashkv.calibrate import train_layer
from dashkv.encoders import HashEncoders
from dashkv.selection import DashKVPolicy

out = Path(argv[2])
cache = Path(argv[1]) / "enc_mix4k_anneal.pt"
t = time.perf_counter()
enc = HashEncoders(pv.SHAPE, 64, pv.LAYERS)
if cache.exists():
    enc.load_state_dict(torch.load(cache))
else:
    for L in pv.LAYERS:
        layer, _ = train_layer(pv.CAL["mix4k"](L), 64, seed=L, steps=200, key_relax="anneal", quantization=0.1,
                               balance=0.1)
        enc.layers[str(L)].load_state_dict(layer.state_dict())
    torch.save(enc.state_dict(), cache)
t_train = time.perf_counter() - t


def make(lam: float, hard: bool):
    class Vote(DashKVPolicy):
        def per_head_scores(self, state, query):
            s = super().per_head_scores(state, query)  # (B, Hq, N)
            mu, sd = s.mean(-1, keepdim=True), s.std(-1, keepdim=True).clamp_min(1e-6)
            if hard:
                k = max(1, s.shape[-1] // 16)
                thr = s.topk(k, -1).values[..., -1:]
                vote = (s >= thr).float().mean(1, keepdim=True) * 4.0  # ~ a z-score's scale
            else:
                vote = ((s - mu) / sd).mean(1, keepdim=True)
            return s + lam * sd * vote
    return Vote


res = {"train_seconds": round(t_train, 1)}
base = pv.DashKVConfig(bits=64, sink=4, window=64)
VARIANTS = (("none", 0.0, False), ("soft+0.25", 0.25, False), ("soft+0.5", 0.5, False),
            ("soft-0.25", -0.25, False), ("hard+0.25", 0.25, True))
prev = json.loads(out.read_text()) if out.exists() else {}
for name, lam, hard in VARIANTS:
    if name in prev:
        res[name] = prev[name]
        continue
    r = {}
    for kind, caps in pv.held.items():
        rows = []
        pv._evaluate_layers(dict(caps), pv.LAYERS, pv.positions, {"m": make(lam, hard)(base, enc)}, ("kv_head",),
                            pv.plans, rows, False)
        for b in pv.plans:
            rs = [x for x in rows if x["budget"] == b]
            r.setdefault(kind, {})[b] = {"recall": round(sum(x["recall"] for x in rs) / len(rs), 4),
                                         "output_error": round(sum(x["output_error"] for x in rs) / len(rs), 4)}
    res[name] = r
    print(name, {k: (v["1/16"]["recall"], v["1/16"]["output_error"], v["1/32"]["recall"]) for k, v in r.items()},
          flush=True)
for lam in (0.5, 1.0):  # the library option (DashKVConfig.spatial_vote), as decoding runs it
    cfg = pv.DashKVConfig(bits=64, sink=4, window=64, spatial_vote=lam)
    r = {}
    for kind, caps in pv.held.items():
        rows = []
        pv._evaluate_layers(dict(caps), pv.LAYERS, pv.positions, {"m": DashKVPolicy(cfg, enc)}, ("kv_head",),
                            pv.plans, rows, False)
        for b in pv.plans:
            rs = [x for x in rows if x["budget"] == b]
            r.setdefault(kind, {})[b] = {"recall": round(sum(x["recall"] for x in rs) / len(rs), 4),
                                         "output_error": round(sum(x["output_error"] for x in rs) / len(rs), 4)}
    res[f"config spatial_vote={lam}"] = r
    print(f"config spatial_vote={lam}", {k: (v["1/16"]["recall"], v["1/16"]["output_error"], v["1/32"]["recall"])
                                         for k, v in r.items()}, flush=True)
out.write_text(json.dumps(res, indent=1))
