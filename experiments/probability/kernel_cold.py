"""The fused kernel's cost with cold caches, as inside `generate`: the summed score against the probability score.

    .venv/bin/python experiments/probability/kernel_cold.py   # idle machine; prints ms per layer call

Stand-alone timings (kernel_cost.py) call the kernel back to back, so its codes, tables and scratch stay
in L1/L2. Inside `generate` every layer's MLP streams ~18 MB of weights between two kernel calls. Here
each timed call follows a read of a 24 MB buffer (not timed). SmolLM2 shape (3 KV x 3 query heads, d 64,
64 bits), budget 1/16, one thread; median of 200 calls.
"""

import time

import numpy as np
import torch

from dashkv.kernels.cpu import dashkv_decode_cpu


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    flush = np.ones(24 << 20 >> 3, np.float64)
    print("N | sum warm / cold | prob warm / cold | prob-sum warm / cold  (ms per call)")
    for n in (8000, 32000):
        hkv, grp, d = 3, 3, 64
        q = torch.randn(1, hkv * grp, d, generator=g)
        qp = torch.randn(1, hkv * grp, 64, generator=g)
        k = torch.randn(1, hkv, n, d, generator=g)
        v = torch.randn(1, hkv, n, d, generator=g)
        c = torch.randint(-2**62, 2**62, (1, hkv, n, 1), generator=g)
        temps = np.full(hkv * grp, 0.3, np.float32)
        res = {}
        for name, kw in [("sum", {}), ("prob", {"prob_temps": temps})]:
            def call():
                dashkv_decode_cpu(q, qp, k, v, c, sink=4, window=64, critical=n // 16 - 68, scaling=d ** -0.5, **kw)
            for _ in range(20):
                call()
            for cold in (False, True):
                ts = []
                for _ in range(200):
                    if cold:
                        flush.sum()
                    t = time.perf_counter()
                    call()
                    ts.append(time.perf_counter() - t)
                res[name, cold] = float(np.median(ts)) * 1e3
        print(f"{n} | {res['sum', False]:.3f} / {res['sum', True]:.3f} | {res['prob', False]:.3f} / "
              f"{res['prob', True]:.3f} | {res['prob', False] - res['sum', False]:.3f} / "
              f"{res['prob', True] - res['sum', True]:.3f}")


if __name__ == "__main__":
    main()
