"""Issue 12: the fused kernel by phase (scan; scan + select; the whole step) with the float32 byte-table
scan and the bit-plane scan of 4- and 8-bit query levels (`query_bits`), one layer, default model shape,
budget 1/16, serial kernel, round-robin rounds.
    PYTHONPATH=src python experiments/fastscan/kernel_phases.py OUT.json [ROUNDS]"""
import json, statistics, sys, time
import torch
from dashkv.bench import _inputs
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu, warmup

torch.set_num_threads(1)
warmup((torch.float32,))
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 60
rows = []
for n in (8000, 65536):
    plan = DashKVConfig(budget=1 / 16, min_context=0).plan(n)
    q, qp, k, v, c = _inputs(9, 3, 64, n, 64)
    kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=0.125)
    fns = {(qb, m): (lambda qb=qb, m=m: dashkv_decode_cpu(q, qp, k, v, c, query_bits=qb, _mode=m, **kw))
           for qb in (None, 4, 8) for m in (2, 1, 0)}
    for f in fns.values():
        f(); f()
    t = {key: [] for key in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            t0 = time.perf_counter(); f(); t[key].append(time.perf_counter() - t0)
    for qb in (None, 4, 8):
        row = {"n": n, "query_bits": qb}
        for m, name in ((2, "scan"), (1, "scan+select"), (0, "all")):
            x = sorted(t[(qb, m)])
            row[name] = round(statistics.median(x) * 1e3, 4)
            row[name + "_p10_p90"] = [round(x[len(x) // 10] * 1e3, 4), round(x[(9 * len(x)) // 10] * 1e3, 4)]
        rows.append(row)
        print(row, flush=True)
json.dump({"argv": sys.argv, "torch_threads": 1, "rows": rows}, open(sys.argv[1], "w"), indent=1)
