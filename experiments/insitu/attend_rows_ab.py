"""A/B of the exact tier's attention loop (`_attend_rows`): the version before stop 28 (copied below as
`attend_old`, from `git show 385c173:src/dashkv/kernels/cpu.py`) against the current one; 500 gathered
rows of 8000, one thread, best of two medians.

    .venv/bin/python experiments/insitu/attend_rows_ab.py   # idle machine
"""
import time, numpy as np
from numba import njit
from dashkv.kernels import cpu
from dashkv.kernels.cpu import _f32, _prefetch, _clear_parts, _part_softmax, _PREFETCH
@njit(cache=False, fastmath=True)
def attend_old(qs, h0, Gq, d, kf, vf, kbase, vbase, rows, n, r0, lg, pm, pl, pacc, a0):
    """Partial attention of query heads qs[h0 : h0+Gq] over n key/value rows.

    Rows are kbase + rows[i] (gathered) when `rows` is non-empty, else the contiguous kbase + r0 + i.
    Writes the part's max logit pm[a0+g], exp-sum pl[a0+g] and unnormalised sum pacc[a0+g, :].
    lg is scratch of >= Gq*n floats. Two passes (K then V): each row is read once for all Gq heads.
    """
    gather = rows.size > 0
    _clear_parts(Gq, d, pm, pl, pacc, a0)
    if n <= 0:
        return
    if gather:  # get the first rows' K and V (and their page walks) in flight
        for r in range(min(n, _PREFETCH)):
            ro = (kbase + np.intp(rows[r])) * d
            vo = (vbase + np.intp(rows[r])) * d
            for i in range(0, d, 16):
                _prefetch(kf, ro + i)
                _prefetch(vf, vo + i)
    for r in range(n):
        if gather and r + _PREFETCH < n:
            ro = (kbase + np.intp(rows[r + _PREFETCH])) * d
            vo = (vbase + np.intp(rows[r + _PREFETCH])) * d
            for i in range(0, d, 16):
                _prefetch(kf, ro + i)
                _prefetch(vf, vo + i)
        kr = kf[kbase + (np.intp(rows[r]) if gather else r0 + r)]
        for g in range(Gq):
            qr = qs[h0 + g]
            s = np.float32(0.0)
            for i in range(d):
                s += qr[i] * _f32(kr[i])
            lg[g * n + r] = s
    _part_softmax(Gq, n, lg, pm, pl, a0)
    for r in range(n):
        vr = vf[vbase + (np.intp(rows[r]) if gather else r0 + r)]
        for g in range(Gq):
            p = lg[g * n + r]
            acc = pacc[a0 + g]
            for i in range(d):
                acc[i] += p * _f32(vr[i])



rng=np.random.default_rng(0)
N=8000; n=500
def t(f,k=400):
    for _ in range(20): f()
    ts=[]
    for _ in range(k):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return np.median(ts)*1e6
for d, Gq, dt in ((64,3,np.float32),(256,4,np.float32),(64,3,np.uint16),(64,1,np.float32),(128,2,np.float32)):
    kf=rng.standard_normal((3*N,d)).astype(np.float32); vf=rng.standard_normal((3*N,d)).astype(np.float32)
    if dt==np.uint16:
        kf=(kf.view(np.uint32)>>16).astype(np.uint16); vf=(vf.view(np.uint32)>>16).astype(np.uint16)
    qs=rng.standard_normal((9,d)).astype(np.float32)
    rows=np.sort(rng.choice(N,n,replace=False)).astype(np.int32)
    res={}
    for rep in range(2):
        for name, fn in (("old", attend_old), ("new", cpu._attend_rows)):
            lg=np.zeros(Gq*n,np.float32); pm=np.zeros(16,np.float32); pl=np.zeros(16,np.float32); pacc=np.zeros((16,d),np.float32)
            us=t(lambda: fn(qs,0,Gq,d,kf,vf,0,0,rows,n,0,lg,pm,pl,pacc,0))
            res.setdefault(name, []).append(us); res[name+"out"]=pacc[:Gq].copy()
    err=np.abs(res["oldout"]-res["newout"]).max()/np.abs(res["oldout"]).max()
    print(f"d {d} Gq {Gq} {np.dtype(dt).name}, {n} gathered rows of {N}: old {min(res['old']):.1f} us, new {min(res['new']):.1f} us ({min(res['old'])/min(res['new']):.2f}x), rel diff {err:.1e}")
