"""Issue 12 micro-benchmark: one KV head's code scan at N = 8000 (64-bit codes), the byte-table scan
the fused kernel runs today against a bit-plane scan of an L-bit quantised query (AND + popcount,
vectorised by LLVM), each with its bucket histogram.  PYTHONPATH=src python experiments/fastscan/micro.py"""
import time, statistics, numpy as np
from numba import njit
from dashkv.kernels.cpu import _scan_unit, _build_lut, _popcount64, NBINS_ASYM

@njit(cache=False)
def planes_scores(cu, m, U, L, z, out):
    for j in range(m):
        c = cu[j]
        s = _popcount64(c & U[0])
        for k in range(1, L):
            s += _popcount64(c & U[k]) << np.uint64(k)
        out[j] = np.int32(np.int64(s) - z * np.int64(_popcount64(c)))

@njit(cache=False)
def planes_scan(cu, m, U, L, z, buf, bu, hs, off):
    for j0 in range(0, m, 256):
        mb = min(m, j0 + 256) - j0
        planes_scores(cu[j0:j0 + mb], mb, U, L, z, buf)
        bb = bu[j0:j0 + mb]
        for jj in range(mb):
            k = buf[jj] + off
            bb[jj] = np.int16(k)
            hs[k] += 1

@njit(cache=False)
def planes_scan4(cu, m, U, L, z, buf, bu, hs, off, nb):
    for j0 in range(0, m, 256):
        mb = min(m, j0 + 256) - j0
        planes_scores(cu[j0:j0 + mb], mb, U, L, z, buf)
        bb = bu[j0:j0 + mb]
        for jj in range(mb):
            k = buf[jj] + off
            bb[jj] = np.int16(k)
            hs[(jj & 3) * nb + k] += 1

rng = np.random.default_rng(0)
m = 8000
cu = rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64)
qp = rng.standard_normal((1, 3, 64)).astype(np.float32)
lt = np.zeros(8 * 256, np.float32)
a = _build_lut(qp, 0, 0, 3, 8, lt)
af = np.float32(a); sf = np.float32(NBINS_ASYM / (2 * a))
buf = np.zeros(256, np.float32); bu = np.zeros(m, np.int16); hs = np.zeros(NBINS_ASYM, np.int32)
qw = np.zeros(3, np.uint64)
U = rng.integers(0, 2**63, 8, dtype=np.int64).astype(np.uint64)
ib = np.zeros(256, np.int32); hs2 = np.zeros(4 * 20000, np.int32)
f = {"byte tables (today)": lambda: _scan_unit(cu, m, 1, False, lt, af, sf, qw, 3, NBINS_ASYM - 1, buf, bu, hs)}
for L in (4, 6, 8):
    z = 1 << (L - 1)
    f[f"planes L={L}"] = lambda L=L, z=z: planes_scan(cu, m, U, L, z, ib, bu, hs2, z * 64)
    f[f"planes L={L}, 4 hists"] = lambda L=L, z=z: planes_scan4(cu, m, U, L, z, ib, bu, hs2, z * 64, 20000)
for g in f.values(): g(); g()
t = {k: [] for k in f}
for _ in range(300):
    for k, g in f.items():
        t0 = time.perf_counter(); g(); t[k].append(time.perf_counter() - t0)
for k, x in t.items():
    x = sorted(x); print(f"{k:24s} {x[len(x)//2]*1e6:7.1f} us  ({x[len(x)//2]*1e9/m:.2f} ns/code; p10-p90 {x[len(x)//10]*1e6:.1f}-{x[9*len(x)//10]*1e6:.1f})")
