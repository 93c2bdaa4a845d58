"""Issue 10: how a KV head's query heads are combined, on the probe layers (no retraining per option).

Trains the chosen recipe once on the mix4k probe captures, then measures kv_head selection with
  raw:    sum of the group's raw asymmetric scores (today)
  folded: each query head's temperature exp(log_scale) folded into its query projection (save-time
          change, the fused kernels see only the projection), so the sum is a sum of estimated logits
  prob:   sum of estimated attention probabilities softmax(scale * score / b) (how oracle combines)

  PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/probe_grouping.py CAPTURE_DIR OUT.json
"""
import json, sys, time, copy
from pathlib import Path
import torch

sys.argv, argv = sys.argv[:1] + [sys.argv[1], "/dev/null/none.json", "__none__"], sys.argv
import probe_variants as pv  # noqa: E402  (loads the captures; runs no variant)
from dashkv.calibrate import train_layer, fold_temperature
from dashkv.encoders import HashEncoders
from dashkv.selection import DashKVPolicy

out = Path(argv[2])
kw = {"key_relax": "anneal", "quantization": 0.1, "balance": 0.1}
t = time.perf_counter()
enc = HashEncoders(pv.SHAPE, 64, pv.LAYERS)
for L in pv.LAYERS:
    layer, _ = train_layer(pv.CAL["mix4k"](L), 64, seed=L, steps=200, **kw)
    enc.layers[str(L)].load_state_dict(layer.state_dict())
t_train = time.perf_counter() - t


class ProbSum(DashKVPolicy):
    def per_head_scores(self, state, query):
        s = super().per_head_scores(state, query)
        scale = self.encoders.logit_scale(state.layer_idx)
        return torch.softmax(s / self.config.bits * scale[None, :, None], -1)


folded = fold_temperature(copy.deepcopy(enc))
res = {}
for name, e, cls in (("raw", enc, DashKVPolicy), ("folded", folded, DashKVPolicy), ("prob", enc, ProbSum)):
    base = pv.DashKVConfig(bits=64, sink=4, window=64)
    r = {}
    for kind, caps in pv.held.items():
        rows = []
        pv._evaluate_layers(dict(caps), pv.LAYERS, pv.positions, {"m": cls(base, e)}, ("kv_head",), pv.plans, rows, False)
        for b in pv.plans:
            rs = [x for x in rows if x["budget"] == b]
            r.setdefault(kind, {})[b] = {"recall": round(sum(x["recall"] for x in rs) / len(rs), 4),
                                         "output_error": round(sum(x["output_error"] for x in rs) / len(rs), 4)}
    res[name] = r
    print(name, r, flush=True)
res["train_seconds"] = round(t_train, 1)
out.write_text(json.dumps(res, indent=1))
