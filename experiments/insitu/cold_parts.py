"""Which buffers make the fused kernel slower inside `generate` than stand-alone (stop 28).

    .venv/bin/python experiments/insitu/cold_parts.py   # idle machine; prints ms per layer call

Inside `generate` the fused kernel took 0.62 ms per layer at 8K (`bench decode --profile`, stop 28)
against ~0.31 stand-alone: between two layers' calls the model streams ~18 MB of weights (and 28 other
layers' caches), so the kernel starts cold. Here each timed call follows a read of a flush buffer (not
timed), then optionally a re-read of one of the kernel's inputs (not timed) to warm just that one: the
difference to "cold" is what that buffer's misses cost. Also: a 2-thread torch matmul before the call
(torch's OpenMP workers awake, GOMP_SPINCOUNT as set). SmolLM2 shape (3 KV x 3 query heads, d 64, 64
bits), probability score, budget 1/16 at N = 8000, one thread; median of 300 calls per condition,
conditions interleaved.
"""

import os
import sys
import time

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the dashkv command sets it

import numpy as np
import torch

from dashkv.kernels import cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    g = torch.Generator().manual_seed(0)
    hkv, grp, d = 3, 3, 64
    q = torch.randn(1, hkv * grp, d, generator=g)
    qp = torch.randn(1, hkv * grp, 64, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    c = torch.randint(-2**62, 2**62, (1, hkv, n, 1), generator=g)
    temps = np.full(hkv * grp, 0.3, np.float32)
    big = np.ones(64 << 20 >> 3, np.float64)  # 64 MB: more than the 32 MB L3
    mid = np.ones(18 << 20 >> 3, np.float64)  # one layer's MLP weights in SmolLM2 (fp32)
    a = torch.randn(576, 1536)
    x = torch.randn(1, 576)

    def call():
        cpu.dashkv_decode_cpu(q, qp, k, v, c, sink=4, window=64, critical=n // 16 - 68, scaling=d ** -0.5,
                              prob_temps=temps)

    for _ in range(30):
        call()
    ws = cpu._workspace()
    touch = {
        "codes": lambda: c.sum(),
        "keys+values": lambda: (k.sum(), v.sum()),
        "workspace": lambda: [w.sum() for w in ws],
    }
    conds = ["warm", "after 2-thread matmul", "cold 18 MB", "cold 64 MB"] + [f"cold 64 MB, {t} warm" for t in touch]
    times = {cname: [] for cname in conds}
    for _ in range(reps):
        for cname in conds:
            if cname == "after 2-thread matmul":
                for _ in range(4):
                    x @ a
            elif cname.startswith("cold 18"):
                mid.sum()
            elif cname.startswith("cold 64"):
                big.sum()
                for t, f in touch.items():
                    if t in cname:
                        f()
            t0 = time.perf_counter()
            call()
            times[cname].append(time.perf_counter() - t0)
    print(f"N {n}, torch threads {torch.get_num_threads()}, GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT')}, "
          f"workspace {sum(w.nbytes for w in ws) / 1e3:.0f} kB ({', '.join(f'{w.dtype}:{w.nbytes // 1000}k' for w in ws)})")
    for cname in conds:
        ts = np.array(times[cname]) * 1e3
        print(f"  {cname:34s} {np.median(ts):.3f} ms  (p10 {np.percentile(ts, 10):.3f}, p90 {np.percentile(ts, 90):.3f})")


if __name__ == "__main__":
    main()
