"""Issue 12, batch 8: does the fused kernel's cost per sequence shrink with the batch? (No: it cannot.)

One layer of the default model's shape (9 query / 3 KV heads, d 64) at N = 8000, budget 1/16, the
serial kernel `generate` uses; per batch size: the whole step (scan + select + attention), the scan and
select alone (`_mode=1`), and the floor's attention (torch matmul + softmax over a contiguous 500-token
cache, what the StaticCache floor row reads). Round-robin medians; ms per call and per sequence.

  PYTHONPATH=src python experiments/batch/kernel_batch.py [--query-bits 4] --out F.json
"""
import argparse, json, statistics, time
import torch

from dashkv.bench import _inputs
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu, dense_decode_torch, warmup

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=8000)
p.add_argument("--batches", default="1,8")
p.add_argument("--repeats", type=int, default=40)
p.add_argument("--query-bits", type=int, default=None, help="also time the bit-plane scan (4 or 8)")
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
warmup((torch.float32,))
hq, hkv, d, b = 9, 3, 64, 64
plan = DashKVConfig(budget=1 / 16, min_context=0).plan(a.n)
rows = []
for B in map(int, a.batches.split(",")):
    parts = [_inputs(hq, hkv, d, a.n, b, dtype=torch.float32, seed=s) for s in range(B)]
    q, qp, k, v, c = (torch.cat([x[i] for x in parts]) for i in range(5))
    kf, vf = k[:, :, :plan.total].contiguous(), v[:, :, :plan.total].contiguous()
    kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=d ** -0.5)
    fns = {"kernel": lambda: dashkv_decode_cpu(q, qp, k, v, c, **kw),
           "scan_select": lambda: dashkv_decode_cpu(q, qp, k, v, c, _mode=1, **kw),
           "floor_attention": lambda: dense_decode_torch(q, kf, vf, d ** -0.5)}
    if a.query_bits:
        fns["kernel_q"] = lambda: dashkv_decode_cpu(q, qp, k, v, c, query_bits=a.query_bits, **kw)
        fns["scan_select_q"] = lambda: dashkv_decode_cpu(q, qp, k, v, c, _mode=1, query_bits=a.query_bits, **kw)
    for f in fns.values():
        f(), f()
    t = {n: [] for n in fns}
    for _ in range(a.repeats):
        for n, f in fns.items():
            t0 = time.perf_counter(); f(); t[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(x) * 1e3 for n, x in t.items()}
    row = {"batch": B, "n": a.n, "tokens_read": plan.total, **{f"{n}_ms": round(m, 4) for n, m in med.items()},
           **{f"{n}_ms_per_seq": round(m / B, 4) for n, m in med.items()}}
    rows.append(row)
    print(row, flush=True)
json.dump({"argv": vars(a), "rows": rows}, open(a.out, "w"), indent=1)
