"""Where the probability score's scan time goes, one KV head (3 query heads, 64 bits) at 8K, one thread.

    .venv/bin/python experiments/probability/parts_cost.py   # idle machine; microseconds per call

Calls the kernel's own compiled helpers on random inputs: the packed int64 byte tables of the three heads, the packed scan (logits, max/min, exp-sums), and the bucket pass (p and its bucket).
"""

import time

import numpy as np

from dashkv.kernels import cpu


def timed(f, reps=300):
    for _ in range(20):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    m, W, G, P = 8000, 1, 3, 8
    lev = (1 << 14) - 1
    qlev = np.round(rng.uniform(-lev, lev, (1, G, 64 * W))).astype(np.float32)
    lp = np.empty(P * 256, np.int64)
    cu = rng.integers(0, 2**63, m * W, dtype=np.uint64)
    teff = np.full(G, 1e-4, np.float32)
    pe = np.empty(G * m, np.float32)
    stat = np.empty(3 * G, np.float64)
    scratch = np.empty(m, np.float32)
    bu = np.empty(m, np.uint16)
    hs = np.zeros(2048, np.int32)
    logz = np.zeros(G, np.float32)

    def tables():  # the packed tables, built packed (stop 24; before: 3 float tables, then packed)
        cpu._prob_tables(qlev, 0, 0, G, P, lev, lp)

    def scan():
        cpu._prob_unit_packed(cu, m, W, lp, G, 64 * W * lev, teff, pe, 0, m, stat, scratch)

    tables(); scan()
    logz[:] = stat[0::3].astype(np.float32) + np.log(stat[2::3]).astype(np.float32)
    base = int(np.float32(1e-12).view(np.int32))
    top = 2047
    shift = 0
    while (int(np.float32(3.0).view(np.int32)) - base) >> shift > top:
        shift += 1
    saved = pe.copy()

    def buckets():
        pe[:] = saved
        cpu._prob_buckets(pe, m, G, m, logz, base, shift, top, bu, hs)

    def copy_only():
        pe[:] = saved

    res = {name: timed(f) for name, f in [("packed tables", tables), ("packed scan", scan),
                                          ("buckets (incl. copy)", buckets), ("copy", copy_only)]}
    for k, v in res.items():
        print(f"{k:24s} {v:8.1f} us")


if __name__ == "__main__":
    main()
