"""Issue 12: the fused kernel by phase (scan; scan + select; the whole step), one layer, default model shape,
budget 1/16, serial kernel, 60 round-robin rounds.  PYTHONPATH=src python experiments/batch/kernel_phases.py OUT.json"""
import json, sys
import statistics, time, torch
from dashkv.bench import _inputs
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu, warmup
torch.set_num_threads(1); warmup((torch.float32,))
rows = []
for n in (8000, 65536):
    plan = DashKVConfig(budget=1/16, min_context=0).plan(n)
    q, qp, k, v, c = _inputs(9, 3, 64, n, 64)
    kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=0.125)
    fns = {m: (lambda m=m: dashkv_decode_cpu(q, qp, k, v, c, _mode=m, **kw)) for m in (2, 1, 0)}
    for f in fns.values(): f(); f()
    t = {m: [] for m in fns}
    for _ in range(60):
        for m, f in fns.items():
            t0 = time.perf_counter(); f(); t[m].append(time.perf_counter() - t0)
    rows.append({"n": n, **{("scan", "scan+select", "all")[2 - m]: round(statistics.median(x) * 1e3, 4) for m, x in t.items()}}); print(rows[-1])
json.dump(rows, open(sys.argv[1], "w"), indent=1)
