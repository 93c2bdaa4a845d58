"""Three tiers in the fused kernel, one layer of the default model's shape at N = 8000, serial: the plain
exact tier at 1/16 against the same bytes with F of the candidate bytes on the 8-bit tier (charged at
its bytes), round-robin medians.  PYTHONPATH=src python experiments/lowprec/kernel_tiers.py OUT.json"""
import json, statistics, sys, time
import torch
from dashkv.attention import QuantizedRows
from dashkv.bench import _inputs
from dashkv.config import DashKVConfig, rerank_read_cost
from dashkv.kernels.cpu import dashkv_decode_cpu, warmup

torch.set_num_threads(1)
warmup((torch.float32,))
n = 8000
q, qp, k, v, c = _inputs(9, 3, 64, n, 64)
k8, v8 = QuantizedRows.quantize(k), QuantizedRows.quantize(v)
fns, plans = {}, {}
for f in (0.0, 0.25, 0.5):
    plan = DashKVConfig(budget=1 / 16, min_context=0, lowprec_fraction=f).plan(n, rerank_read_cost(64, 4))
    plans[f] = plan
    kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=0.125)
    if plan.lowprec:
        kw.update(lowprec=plan.lowprec, keys8=(k8.q, k8.scale), values8=(v8.q, v8.scale))
    fns[f] = lambda kw=kw: dashkv_decode_cpu(q, qp, k, v, c, **kw)
for g in fns.values():
    g(); g()
t = {f: [] for f in fns}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 60):
    for f, g in fns.items():
        t0 = time.perf_counter(); g(); t[f].append(time.perf_counter() - t0)
rows = [{"lowprec_fraction": f, "critical": plans[f].critical, "lowprec": plans[f].lowprec,
         "reads": round(plans[f].reads, 1), "kernel_ms": round(statistics.median(x) * 1e3, 4)} for f, x in t.items()]
for r in rows:
    print(r)
json.dump({"argv": sys.argv, "n": n, "rows": rows}, open(sys.argv[1], "w"), indent=1)
