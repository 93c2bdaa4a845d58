"""What the probability group score costs inside the fused CPU kernel, stand-alone, one thread.

    .venv/bin/python experiments/probability/kernel_cost.py   # idle machine; prints ms per layer call

Random inputs at SmolLM2's (3 KV x 3 query heads, d 64, 64 bits) and Gemma-3's (1 x 4, d 256, 256 bits)
shapes; budget 1/16 (4 sinks + 64 window + the rest selected). Columns: the whole step, the scan +
select only (`_mode=1`) and the scan only (`_mode=2`), for the summed score and the probability score.
Median of 200 calls after 20 warm-up calls.
"""

import time

import numpy as np
import torch

from dashkv.kernels.cpu import dashkv_decode_cpu


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("Hkv G d N bits | step sum / prob | scan+select sum / prob | scan sum / prob  (ms)")
    for hkv, grp, d, n, words in [(3, 3, 64, 8000, 1), (1, 4, 256, 8000, 4), (3, 3, 64, 32000, 1)]:
        q = torch.randn(1, hkv * grp, d, generator=g)
        qp = torch.randn(1, hkv * grp, 64 * words, generator=g)
        k = torch.randn(1, hkv, n, d, generator=g)
        v = torch.randn(1, hkv, n, d, generator=g)
        c = torch.randint(-2**62, 2**62, (1, hkv, n, words), generator=g)
        temps = np.full(hkv * grp, 0.3, np.float32)
        res = {}
        for name, kw in [("sum", {}), ("prob", {"prob_temps": temps}), ("sum-sel", {"_mode": 1}),
                         ("prob-sel", {"prob_temps": temps, "_mode": 1}), ("sum-scan", {"_mode": 2}),
                         ("prob-scan", {"prob_temps": temps, "_mode": 2})]:
            def call():
                dashkv_decode_cpu(q, qp, k, v, c, sink=4, window=64, critical=n // 16 - 68, scaling=d ** -0.5, **kw)
            for _ in range(20):
                call()
            ts = []
            for _ in range(200):
                t = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t)
            res[name] = float(np.median(ts)) * 1e3
        print(f"{hkv} {grp} {d} {n} {64 * words} | {res['sum']:.3f} / {res['prob']:.3f} | "
              f"{res['sum-sel']:.3f} / {res['prob-sel']:.3f} | {res['sum-scan']:.3f} / {res['prob-scan']:.3f}")


if __name__ == "__main__":
    main()
