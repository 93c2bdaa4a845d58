"""Fused CPU decode step of DASH-KV for one layer (numba), and a fast dense decode attention.

`dashkv_decode_cpu` runs, inside one compiled function and without per-token Python:

1. **scan**: every candidate position's b-bit key code is scored against the query -- asymmetric
   (`<q_proj, c_k>` through b/8 byte look-up tables of 256 floats built once per query) or Hamming
   (`b - 2*popcount(sign(q_proj) XOR c_k)`, one hardware `popcnt` per 64-bit word). The score is
   turned into a histogram bucket on the fly (Hamming: the bucket *is* the score; asymmetric: 2048
   equal-width buckets over the score's exact range `[-sum|q|, +sum|q|]`; the bucket is monotone in
   the score). Work units are (batch row, KV head, chunk of positions), so both cores are busy even
   with 3 KV heads.
2. **select** (counting select, no sort): the per-chunk histograms give the bucket holding the k-th
   best score, and per-chunk write offsets; a second pass over the 2-byte buckets writes the positions
   above that bucket straight into their final slots. Only the few positions *in* the threshold bucket
   are ranked exactly (Hamming: they tie, lower position first; asymmetric: their exact scores are
   recomputed and sorted stably, so ties again go to the lower position). The result is exactly the
   top-`critical` candidates under a stable sort by descending score.
3. **attend**: exact attention over sinks ∪ selected ∪ window, split into parts (flash-decoding style:
   each part keeps its max, exp-sum and weighted V sum; parts are merged at the end). Under
   `grouping="kv_head"` the G query heads of a KV head share the rows: each K/V row is read once for
   all G heads.

Conventions: positions `< start[b]` are left padding (never read); sinks are `start[b] ..
start[b]+sink-1`; the window is the last `window` positions; candidates are `[start+sink, N-window)`.
If `sink + window + critical >= N - start[b]` the row attends densely to all its valid tokens.
Selection is deterministic: among equal scores the lower position wins.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import types as pytypes
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numpy as np
import torch
from numba import njit, prange, types
from llvmlite import ir
from numba.core import cgutils
from numba.core.cpu import ParallelOptions
from numba.extending import intrinsic

from ..codes import PROB_FIELD_BITS, probability_level_bits
from . import CPU_KV_DTYPES, NBINS_ASYM  # NBINS_ASYM: histogram buckets of the asymmetric (float) score
_SCAN_MIN_CHUNK = 1024  # fewest candidate positions per scan work unit
_ATTN_MIN_ROWS = 64  # fewest rows per attention work unit
_LN2 = 0.6931471805599453
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# low-level helpers
# ---------------------------------------------------------------------------------------------
@intrinsic
def _popcount64(typingctx, x):
    """Hardware popcount of a uint64 (LLVM ctpop -> `popcnt` on x86-64)."""
    if not (isinstance(x, types.Integer) and x.bitwidth == 64 and not x.signed):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _int32_bits_as_float32(typingctx, x):
    if not (isinstance(x, types.Integer) and x.bitwidth == 32):
        return None
    sig = types.float32(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _float32_bits_as_int32(typingctx, x):
    """The bit pattern of a float32 as int32: for x >= 0 it is monotone in x (the probability buckets)."""
    if x != types.float32:
        return None
    sig = types.int32(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f32(typingctx, x):
    """One stored K/V element as float32: float32 as is, uint16 as bfloat16 bits, int16 as float16 bits.

    The K/V arrays reach numba as float32, or as uint16/int16 views of bfloat16/float16 storage (numba
    has no such types); the element type picks the conversion at compile time, so each dtype gets its
    own specialisation of the attention loops with no branch inside them.
    """
    if x == types.float32:
        return types.float32(x), lambda context, builder, signature, args: args[0]
    if x == types.uint16:
        def bf16(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(x), bf16
    if x == types.int16:
        def f16(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(x), f16
    return None


@intrinsic
def _prefetch(typingctx, arr, i):
    """Software prefetch (to all cache levels) of element i of arr's data (flat index, no checks)."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=True)
def _exp_neg(x):
    """exp(x) for x <= 0 (float32), vectorisable: 2^n * p(f), n = round(x*log2 e), |f| <= 1/2.

    p is the degree-6 Taylor polynomial of 2^f: relative error < 2e-7 (about one float32 ulp);
    x < -87 is clamped (exp(-87) ~ 1.6e-38, far below anything that matters after normalisation).
    """
    x = max(x, np.float32(-87.0))
    t = x * np.float32(_LOG2E)
    n = np.floor(t + np.float32(0.5))
    f = t - n  # [-1/2, 1/2]
    p = np.float32(1.5403530393381606e-4)
    p = p * f + np.float32(1.3333558146428443e-3)
    p = p * f + np.float32(9.618129107628477e-3)
    p = p * f + np.float32(5.550410866482158e-2)
    p = p * f + np.float32(2.402265069591007e-1)
    p = p * f + np.float32(6.931471805599453e-1)
    p = p * f + np.float32(1.0)
    bits = np.int32((np.int32(n) + np.int32(127)) << np.int32(23))  # int32 throughout: n in [-126, 0]
    return p * _int32_bits_as_float32(bits)  # (via int64 the loops vectorised at half width: 2x slower)


#
# Indexing note: numba supports negative indices, so `a[i]` with an i it cannot prove >= 0 costs a
# compare-and-select per access and blocks vectorisation. Hot loops below therefore index slices
# with loop counters that start at 0 (provably non-negative), never `a[base + j]`.
_PROB_FIELD = PROB_FIELD_BITS  # bits per query head in the packed probability tables
_PREFETCH = 24  # rows ahead whose K and V are prefetched in the gathered attention
_BLOCK = 256  # positions per scan block (scores of a block stay in L1)


@njit(cache=True)
def _sc64(x, lt):
    """Score of one 64-bit code word through its 8 byte tables lt[0:2048]. Fixed summation order."""
    s = lt[np.intp(x & np.uint64(255))]
    for t in range(1, 8):
        s += lt[t * 256 + np.intp((x >> np.uint64(8 * t)) & np.uint64(255))]
    return s


@njit(cache=True)
def _asym_exact(cu, W, lt):
    """Asymmetric score of one code (words cu[0:W]) -- bit-identical to what `_scan_unit` bins."""
    s = _sc64(cu[0], lt[0:2048])
    for w in range(1, W):
        s += _sc64(cu[w], lt[w * 2048:(w + 1) * 2048])
    return s


@njit(cache=True)
def _build_lut(qp, b, h0, nh, P, lt):
    """Byte tables of the projection summed over query heads h0 .. h0+nh-1 -> lt[0:P*256].

    lt[256p + v] = sum_t (+q[8p+t] if bit t of v else -q[8p+t]). Returns sum |q| (the score range).
    """
    a = 0.0
    for p in range(P):
        tb = lt[p * 256:(p + 1) * 256]
        z = np.float32(0.0)
        for t in range(8):
            v = np.float32(0.0)
            for g in range(nh):
                v += qp[b, h0 + g, 8 * p + t]
            a += abs(np.float64(v))
            z -= v
        tb[0] = z  # byte 0: every sign -1
        for t in range(8):  # doubling: entries with bit t set = entries without it + 2 q_t
            v = np.float32(0.0)
            for g in range(nh):
                v += qp[b, h0 + g, 8 * p + t]
            v2 = v + v
            step = 1 << t
            for x in range(step):
                tb[step + x] = tb[x] + v2
    return a


@njit(cache=True, inline="always")
def _level(x, delta, lev):
    """The integer level of a float32 query value: floor(x / delta + 0.5) in float64, clamped to +-lev; 0
    where delta is 0 (an all-zero projection). `dashkv.codes.quantise_query` is the reference."""
    if delta > 0.0:
        return min(max(np.int64(np.floor(np.float64(x) / delta + 0.5)), -lev), lev)
    return np.int64(0)


@njit(cache=True)
def _build_planes(qp, b, h0, nh, W, L, pw):
    """Bit planes of the selecting head's integer query levels -> pw[0:W*L]; returns (offset, shift).

    v = sum of the projections of query heads h0 .. h0+nh-1 (float32, in order), levels
    floor(v / delta + 0.5) with delta = max|v| / (2^(L-1) - 1) in float64 (`dashkv.codes.quantise_query`
    is the reference), stored offset by 2^(L-1) so they are non-negative: plane k of word w holds bit k
    of every level of that word's 64 positions. offset = -(sum of the negative levels) makes every
    score + offset >= 0; shift: the fewest right shifts that fit score + offset into NBINS_ASYM buckets.
    """
    lev = (1 << (L - 1)) - 1
    bb = 64 * W
    v = np.empty(bb, np.float32)
    amax = 0.0
    for j in range(bb):
        x = np.float32(0.0)
        for g in range(nh):
            x += qp[b, h0 + g, j]
        v[j] = x
        amax = max(amax, abs(np.float64(x)))
    for i in range(W * L):
        pw[i] = np.uint64(0)
    delta = amax / lev
    neg = 0
    tot = 0
    for j in range(bb):
        qv = _level(v[j], delta, lev)
        tot += abs(qv)
        if qv < 0:
            neg -= qv
        u = np.uint64(qv + lev + 1)
        w = j // 64
        bit = np.uint64(1) << np.uint64(j % 64)
        for k in range(L):
            if (u >> np.uint64(k)) & np.uint64(1):
                pw[w * L + k] |= bit
    shift = 0
    while (tot >> shift) >= NBINS_ASYM:
        shift += 1
    return neg, shift


@njit(cache=True, inline="always")
def _planes4(c, p0, p1, p2, p3):
    """sum_k 2^k popcount(c AND p_k) over 4 planes (inlined, so the callers' loops stay vectorisable)."""
    return (_popcount64(c & p0) + (_popcount64(c & p1) << np.uint64(1))
            + (_popcount64(c & p2) << np.uint64(2)) + (_popcount64(c & p3) << np.uint64(3)))


@njit(cache=True)
def _plane_scores(cb, mb, W, pw, L, off, ib):
    """ib[jj] = off + sum_j level_j * bit_j of code jj, for L = 4 or 8 bit planes per word (pw[L*w:L*w+L]):
    L + 1 AND + popcounts per word. The planes are loop constants and the code loop has no branch, so
    LLVM vectorises it (vpopcntq where the CPU has it); a loop over a runtime plane count did not."""
    for w in range(W):
        b0 = L * w
        p0 = pw[b0]
        p1 = pw[b0 + 1]
        p2 = pw[b0 + 2]
        p3 = pw[b0 + 3]
        p4 = pw[b0 + 4] if L == 8 else np.uint64(0)
        p5 = pw[b0 + 5] if L == 8 else np.uint64(0)
        p6 = pw[b0 + 6] if L == 8 else np.uint64(0)
        p7 = pw[b0 + 7] if L == 8 else np.uint64(0)
        zs = np.int32(L - 1)  # levels are stored offset by 2^(L-1)
        o = off if w == 0 else np.int32(0)
        if L == 4 and W == 1:  # the default shape: contiguous codes, one word
            for jj in range(mb):
                c = cb[jj]
                ib[jj] = np.int32(_planes4(c, p0, p1, p2, p3)) - (np.int32(_popcount64(c)) << zs) + o
        elif L == 8 and W == 1:
            for jj in range(mb):
                c = cb[jj]
                s = _planes4(c, p0, p1, p2, p3) + (_planes4(c, p4, p5, p6, p7) << np.uint64(4))
                ib[jj] = np.int32(s) - (np.int32(_popcount64(c)) << zs) + o
        else:
            for jj in range(mb):
                c = cb[jj * W + w]
                s = _planes4(c, p0, p1, p2, p3)
                if L == 8:
                    s += _planes4(c, p4, p5, p6, p7) << np.uint64(4)
                x = np.int32(s) - (np.int32(_popcount64(c)) << zs) + o
                ib[jj] = x if w == 0 else ib[jj] + x


@njit(cache=True)
def _plane_score_one(cu, W, pw, L):
    """sum_j level_j * bit_j of one code (words cu[0:W]): the exact score `_plane_scores` bins."""
    s = 0
    z = 1 << (L - 1)
    for w in range(W):
        c = cu[w]
        for k in range(L):
            s += np.int64(_popcount64(c & pw[w * L + k])) << k
        s -= np.int64(_popcount64(c)) * z
    return s


@njit(cache=True)
def _exact_rank_key(cu, W, hamming, qbits, lt, qw, Gq, pw):
    """One code's exact score as a sort key, smaller = better (words cu[0:W]): Hamming, the popcount of its
    differences from the Gq query sign words qw; bit planes, minus its integer score; else minus its
    byte-table score (`_asym_exact`). The quantities the scan's buckets bin, for re-ranking inside one."""
    if hamming:
        pc = 0
        for g in range(Gq):
            for w in range(W):
                pc += _popcount64(qw[g * W + w] ^ cu[w])
        return np.float64(pc)
    if qbits > 0:
        return -np.float64(_plane_score_one(cu, W, pw, qbits))
    return -np.float64(_asym_exact(cu, W, lt))


@njit(cache=True, inline="always")
def _asym_scores(cb, m, W, lt, out):
    """out[0:m] = asymmetric scores of the m codes cb[0:m*W] through the byte tables lt (`_asym_exact`'s
    summation order: word by word)."""
    l0 = lt[0:2048]
    if W == 1:
        for jj in range(m):
            out[jj] = _sc64(cb[jj], l0)
    else:
        for jj in range(m):
            out[jj] = _sc64(cb[jj * W], l0)
        for w in range(1, W):
            lw = lt[w * 2048:(w + 1) * 2048]
            for jj in range(m):
                out[jj] += _sc64(cb[jj * W + w], lw)


@njit(cache=True, inline="always")
def _unit_range(clo, ncand, nch, c):
    """Positions [lo, hi) of chunk c of a row's candidates [clo, clo + ncand) cut into nch scan units."""
    cl = -(-ncand // nch)
    lo = min(clo + ncand, clo + c * cl)
    return lo, min(clo + ncand, lo + cl)


@njit(cache=True)
def _scan_unit(cu, m, W, hamming, lt, af, sf, qw, Gq, top, buf, bu, hs, qbits, pw, qoff, qshift, ib):
    """Score the m codes cu[0:m*W], write their buckets bu[0:m] and count them into hs.

    Asymmetric: bucket = clamp(int((s + sum|q|) * nbins / (2 sum|q|))), monotone in s.
    Hamming: bucket = Gq*b - sum_g popcount(q_g XOR c) = (score + Gq*b) / 2, exact.
    Bit planes (qbits 4 or 8): bucket = (sum_j level_j * bit_j + qoff) >> qshift, monotone in the
    integer score (exact, one bucket per score, when qshift is 0).
    """
    topf = np.float32(top)
    for j0 in range(0, m, _BLOCK):
        mb = min(m, j0 + _BLOCK) - j0
        cb = cu[j0 * W:(j0 + mb) * W]
        bb = bu[j0:j0 + mb]
        if qbits > 0:  # bit-plane scan of the integer query levels: vectorised popcounts, then buckets
            _plane_scores(cb, mb, W, pw, qbits, qoff, ib)
            for jj in range(mb):
                bb[jj] = ib[jj] >> qshift
        elif hamming:
            for jj in range(mb):
                pc = np.uint64(0)
                for g in range(Gq):
                    for w in range(W):
                        pc += _popcount64(qw[g * W + w] ^ cb[jj * W + w])
                bb[jj] = top - np.intp(pc)
        else:
            _asym_scores(cb, mb, W, lt, buf)
            for jj in range(mb):
                x = (buf[jj] + af) * sf
                x = min(max(x, np.float32(0.0)), topf)
                bb[jj] = np.int32(x)
        for jj in range(mb):
            hs[np.intp(bb[jj])] += 1


@njit(cache=True, fastmath=True, inline="always")
def _exp_shift(lgg, n):
    """lgg[0:n] -> exp(lgg - max) in place; returns (max, sum of the exponentials): one softmax's parts."""
    mx = lgg[0]
    for r in range(n):
        mx = max(mx, lgg[r])
    tot = np.float32(0.0)
    for r in range(n):
        e = _exp_neg(lgg[r] - mx)
        lgg[r] = e
        tot += e
    return mx, tot


@njit(cache=True, fastmath=True, inline="always")
def _clear_parts(Gq, d, pm, pl, pacc, a0):
    """An empty partial softmax for query heads a0 .. a0+Gq-1 of a part (what an empty part contributes)."""
    for g in range(Gq):
        pm[a0 + g] = -np.inf
        pl[a0 + g] = 0.0
        acc = pacc[a0 + g]
        for i in range(d):
            acc[i] = 0.0


@njit(cache=True, fastmath=True, inline="always")
def _part_softmax(Gq, n, lg, pm, pl, a0):
    """lg[g*n:(g+1)*n] logits -> exp(logit - max) in place, the part's max and exp-sum per query head."""
    for g in range(Gq):
        mx, tot = _exp_shift(lg[g * n:(g + 1) * n], n)
        pm[a0 + g] = mx
        pl[a0 + g] = tot


@njit(cache=True, fastmath=True)
def _attend_rows(qs, h0, Gq, d, kf, vf, kbase, vbase, rows, n, r0, lg, pm, pl, pacc, a0):
    """Partial attention of query heads qs[h0 : h0+Gq] over n key/value rows.

    Rows are kbase + rows[i] (gathered) when `rows` is non-empty, else the contiguous kbase + r0 + i.
    Writes the part's max logit pm[a0+g], exp-sum pl[a0+g] and unnormalised sum pacc[a0+g, :].
    lg is scratch of >= Gq*n floats. Two passes (K then V): each row is read once for all Gq heads; the
    K pass scores up to four heads per load of a key element, the V pass adds four rows per pass over an
    accumulator (1.24x faster for SmolLM2's 3 heads at d 64, 1.46x for Gemma's 4 at d 256; docs/kernels.md).
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
        g = 0
        while g + 4 <= Gq:  # four, then three or two heads per pass over the key row: each element loaded once
            qa, qb, qc, qd = qs[h0 + g], qs[h0 + g + 1], qs[h0 + g + 2], qs[h0 + g + 3]
            sa = sb = sc = sd = np.float32(0.0)
            for i in range(d):
                x = _f32(kr[i])
                sa += qa[i] * x
                sb += qb[i] * x
                sc += qc[i] * x
                sd += qd[i] * x
            lg[g * n + r], lg[(g + 1) * n + r], lg[(g + 2) * n + r], lg[(g + 3) * n + r] = sa, sb, sc, sd
            g += 4
        if g + 3 <= Gq:
            qa, qb, qc = qs[h0 + g], qs[h0 + g + 1], qs[h0 + g + 2]
            sa = sb = sc = np.float32(0.0)
            for i in range(d):
                x = _f32(kr[i])
                sa += qa[i] * x
                sb += qb[i] * x
                sc += qc[i] * x
            lg[g * n + r], lg[(g + 1) * n + r], lg[(g + 2) * n + r] = sa, sb, sc
            g += 3
        if g + 2 <= Gq:
            qa, qb = qs[h0 + g], qs[h0 + g + 1]
            sa = sb = np.float32(0.0)
            for i in range(d):
                x = _f32(kr[i])
                sa += qa[i] * x
                sb += qb[i] * x
            lg[g * n + r], lg[(g + 1) * n + r] = sa, sb
            g += 2
        while g < Gq:
            qr = qs[h0 + g]
            s = np.float32(0.0)
            for i in range(d):
                s += qr[i] * _f32(kr[i])
            lg[g * n + r] = s
            g += 1
    _part_softmax(Gq, n, lg, pm, pl, a0)
    r = 0
    while r + 4 <= n:  # four value rows per pass over each accumulator (a quarter of its loads and stores)
        v0 = vf[vbase + (np.intp(rows[r]) if gather else r0 + r)]
        v1 = vf[vbase + (np.intp(rows[r + 1]) if gather else r0 + r + 1)]
        v2 = vf[vbase + (np.intp(rows[r + 2]) if gather else r0 + r + 2)]
        v3 = vf[vbase + (np.intp(rows[r + 3]) if gather else r0 + r + 3)]
        for g in range(Gq):
            p0, p1, p2, p3 = lg[g * n + r], lg[g * n + r + 1], lg[g * n + r + 2], lg[g * n + r + 3]
            acc = pacc[a0 + g]
            for i in range(d):
                acc[i] += p0 * _f32(v0[i]) + p1 * _f32(v1[i]) + p2 * _f32(v2[i]) + p3 * _f32(v3[i])
        r += 4
    while r < n:
        vr = vf[vbase + (np.intp(rows[r]) if gather else r0 + r)]
        for g in range(Gq):
            p = lg[g * n + r]
            acc = pacc[a0 + g]
            for i in range(d):
                acc[i] += p * _f32(vr[i])
        r += 1


@njit(cache=True, fastmath=True)
def _attend_rows8(qs, h0, Gq, d, k8f, k8s, v8f, v8s, base, rows, n, lg, pm, pl, pacc, a0):
    """As `_attend_rows` over the 8-bit copies (the low-precision tier): rows base + rows[i] of the int8
    K/V with one scale per row (k8 * scale, v8 * scale: `QuantizedRows.dequantize`)."""
    kx = np.empty(d, np.float32)
    _clear_parts(Gq, d, pm, pl, pacc, a0)
    if n <= 0:
        return
    for r in range(min(n, _PREFETCH)):
        _prefetch(k8f, (base + np.intp(rows[r])) * d)
        _prefetch(v8f, (base + np.intp(rows[r])) * d)
    for r in range(n):
        if r + _PREFETCH < n:
            _prefetch(k8f, (base + np.intp(rows[r + _PREFETCH])) * d)
            _prefetch(v8f, (base + np.intp(rows[r + _PREFETCH])) * d)
        row = base + np.intp(rows[r])
        kr = k8f[row]
        sc = k8s[row]
        for i in range(d):
            kx[i] = np.float32(kr[i]) * sc
        for g in range(Gq):
            qr = qs[h0 + g]
            s = np.float32(0.0)
            for i in range(d):
                s += qr[i] * kx[i]
            lg[g * n + r] = s
    _part_softmax(Gq, n, lg, pm, pl, a0)
    for r in range(n):
        row = base + np.intp(rows[r])
        vr = v8f[row]
        sc = v8s[row]
        for i in range(d):
            kx[i] = np.float32(vr[i]) * sc
        for g in range(Gq):
            p = lg[g * n + r]
            acc = pacc[a0 + g]
            for i in range(d):
                acc[i] += p * kx[i]


@njit(cache=True)
def _prob_query(qp, b, h, bbits, lev, qrow):
    """qrow[0:bbits] = query head h's projection rounded to integer levels (held as float32); returns the
    step delta = max|v| / lev (float64): `dashkv.codes.probability_logits`' rounding, bit for bit."""
    amax = 0.0
    for j in range(bbits):
        amax = max(amax, abs(np.float64(qp[b, h, j])))
    delta = amax / lev
    for j in range(bbits):
        qrow[j] = np.float32(_level(qp[b, h, j], delta, lev))
    return delta


@njit(cache=True)
def _prob_tables(qlev, b, h0, nh, P, lev, lp):
    """lp[0:P*256] (int64) = the byte tables of query heads h0 .. h0+nh-1 (row b of the integer levels qlev),
    each entry offset by 8*lev to be non-negative and packed PROB_FIELD_BITS bits per head.

    Built packed, by the doubling of `_build_lut`: int64 addition is exact and linear, so each entry is
    sum_j F_j * 2^(21 j) with F_j head j's offset table entry, in [0, 16*lev] -- inside its field, so the
    value is the field-by-field packing (the increments' fields may be negative; the entries' never are)."""
    for p in range(P):
        tb = lp[p * 256:(p + 1) * 256]
        z = np.int64(0)
        for j in range(nh):
            v = np.int64(8 * lev)
            for t in range(8):
                v -= np.int64(qlev[b, h0 + j, 8 * p + t])
            z += v << np.int64(_PROB_FIELD * j)  # byte 0: every sign -1
        tb[0] = z
        for t in range(8):  # entries with bit t set = entries without it + 2 q_t, every field at once
            dlt = np.int64(0)
            for j in range(nh):
                dlt += (np.int64(2) * np.int64(qlev[b, h0 + j, 8 * p + t])) << np.int64(_PROB_FIELD * j)
            step = 1 << t
            for x in range(step):
                tb[step + x] = tb[x] + dlt


@njit(cache=True)
def _pq_query(q, b, h, kvh, qmap, books, lev, row):
    """PQ codes: row[0:P*256] = query head h's score tables (row b of q) rounded to integer levels (held
    as float32); returns the step delta = max|table| / lev (float64). Table entry (p, c) =
    (qmap[kvh]^T q)[p s:(p+1) s] . centroid c of sub-space p (qmap: the query map transposed), in float64,
    rounded to float32 once:
    `dashkv.pq.query_tables` then `pq_probability_logits`' rounding. books: (Hkv, P, s, 256), so the
    inner loop runs over the 256 centroids (a fixed order, vectorised)."""
    d = q.shape[2]
    P = books.shape[1]
    s = books.shape[2]
    qm = np.zeros(d, np.float64)
    for i in range(d):  # qmap is stored transposed (i, r): the inner loop runs over the outputs, vectorised
        xi = np.float64(q[b, h, i])
        mr = qmap[kvh, i]
        for r in range(d):
            qm[r] += np.float64(mr[r]) * xi
    for p in range(P):
        bk = books[kvh, p]
        for c in range(256):  # sum over the sub-space's s dimensions in order, per centroid (vectorised over c)
            acc = 0.0
            for t in range(s):
                acc += qm[p * s + t] * np.float64(bk[t, c])
            row[p * 256 + c] = np.float32(acc)
    amax = 0.0
    for j in range(P * 256):
        amax = max(amax, abs(np.float64(row[j])))
    delta = amax / lev
    inv = 1.0 / delta if delta > 0.0 else 0.0  # levels x * (1 / delta), `pq_probability_logits`' rounding
    flev = np.float64(lev)
    for j in range(P * 256):  # branch-free, so it vectorises (2048 entries per head at 64 bits)
        row[j] = np.float32(min(max(np.floor(np.float64(row[j]) * inv + 0.5), -flev), flev))
    return delta


@njit(cache=True)
def _pq_tables(qlev, b, h0, nh, P, lev, lp):
    """PQ codes: lp[0:P*256] (int64) = the integer tables of query heads h0 .. h0+nh-1 (row b of qlev),
    each entry offset by lev to be non-negative and packed PROB_FIELD_BITS bits per head, as
    `_prob_tables` packs a sign code's (a code's P entries sum to at most 2 P lev, inside its field)."""
    for i in range(P * 256):
        z = np.int64(0)
        for j in range(nh):
            z += np.int64(qlev[b, h0 + j, i] + lev) << np.int64(_PROB_FIELD * j)
        lp[i] = z


@njit(cache=True)
def _prob_packed_exact(cu, W, lp, j, off):
    """Integer score of one code (words cu[0:W]) for field j of the packed tables lp: what
    `_prob_unit_packed` computes for it, bit for bit."""
    acc = np.int64(0)
    for w in range(W):
        x = cu[w]
        for t in range(8):
            acc += lp[w * 2048 + t * 256 + np.intp((x >> np.uint64(8 * t)) & np.uint64(255))]
    return ((acc >> np.int64(_PROB_FIELD * j)) & np.int64((1 << _PROB_FIELD) - 1)) - off


@njit(cache=True, fastmath=True)
def _exp_sum(e, m, mx, store):
    """sum_j exp(e[j] - mx) over e[0:m], with `store` also written back in place. Its own function: the
    caller's choice among three arrays kept LLVM from vectorising the loop (94 against 56 µs per unit)."""
    z = np.float32(0.0)
    if store:
        for jj in range(m):
            x = _exp_neg(e[jj] - mx)
            e[jj] = x
            z += x
    else:
        for jj in range(m):
            z += _exp_neg(e[jj] - mx)
    return z


@njit(cache=True, fastmath=True)
def _prob_unit_packed(cu, m, W, lp, nh, off, teff, pe, o0, stride, stat, scratch, store):
    """nh <= 3 query heads (the fields of the packed tables lp) over one scan unit's m codes, one look-up per code byte: the
    packed tables lp give every head's exact integer score s_j (field j, minus the offset `off`); the logits
    float32(s_j) * teff[j] go to pe[o0 + j*stride : ... + m], stat[3j:3j+3] = (max, min, sum exp(logit -
    max)) per head (scratch[0:m] takes the rows of absent heads). With `store` (one unit per KV head, the
    serial schedule) pe gets exp(logit - max) instead, which `_prob_buckets` then turns into p with one
    multiply per head rather than an exponential."""
    mask = np.int64((1 << _PROB_FIELD) - 1)
    e0 = pe[o0:o0 + m]
    e1 = pe[o0 + stride:o0 + stride + m] if nh > 1 else scratch[0:m]
    e2 = pe[o0 + 2 * stride:o0 + 2 * stride + m] if nh > 2 else scratch[0:m]
    t0 = teff[0]
    t1 = teff[1] if nh > 1 else np.float32(0.0)
    t2 = teff[2] if nh > 2 else np.float32(0.0)
    m0 = np.float32(-np.inf)
    m1 = np.float32(-np.inf)
    m2 = np.float32(-np.inf)
    n0 = np.float32(np.inf)
    n1 = np.float32(np.inf)
    n2 = np.float32(np.inf)
    for jj in range(m):
        acc = np.int64(0)
        for w in range(W):
            x = cu[jj * W + w]
            for t in range(8):
                acc += lp[w * 2048 + t * 256 + np.intp((x >> np.uint64(8 * t)) & np.uint64(255))]
        a0 = np.float32((acc & mask) - off) * t0
        a1 = np.float32(((acc >> np.int64(_PROB_FIELD)) & mask) - off) * t1
        a2 = np.float32(((acc >> np.int64(2 * _PROB_FIELD)) & mask) - off) * t2
        e0[jj] = a0
        e1[jj] = a1
        e2[jj] = a2
        m0 = max(m0, a0)
        m1 = max(m1, a1)
        m2 = max(m2, a2)
        n0 = min(n0, a0)
        n1 = min(n1, a1)
        n2 = min(n2, a2)
    for j in range(nh):
        e = e0 if j == 0 else (e1 if j == 1 else e2)
        mx = m0 if j == 0 else (m1 if j == 1 else m2)
        z = _exp_sum(e, m, mx, store) if m > 0 else np.float32(0.0)
        stat[3 * j] = mx
        stat[3 * j + 1] = n0 if j == 0 else (n1 if j == 1 else n2)
        stat[3 * j + 2] = z


@njit(cache=True)
def _bits_shift(lo_bits, hi_bits, top):
    """The smallest shift that maps the float32 bit patterns lo_bits .. hi_bits into buckets 0 .. top."""
    shift = 0
    while (hi_bits - lo_bits) >> shift > top:
        shift += 1
    return shift


@njit(cache=True)
def _prob_normalise(sidx, kvh, G, nch, PLUT, P, W, plut, off, ustat, logzs, temps, cf, cbase, s0, sink, N, window,
                    top, pbase, pshift, phi):
    """Probability mode, one KV head of one row (its scan units are sidx*nch ... sidx*nch + nch-1):
    log Z_g per query head over all valid positions (the units' parts plus the sinks and the window,
    scored here through unit 0's packed tables of the integer levels, times the row's effective temperatures
    `temps`) into logzs[sidx*G + g], and the bucket map of p: base and shift of its float32 bit pattern
    between a lower and an upper bound of p over the candidates (the upper bound's bits into phi[sidx])."""
    u0 = sidx * nch
    plo = -np.inf
    hi_sum = 0.0
    nfix = sink + window
    fixed = np.empty(nfix, np.float64)
    for g in range(G):
        t = np.float32(temps[kvh * G + g])
        lp = plut[u0 * PLUT + (g // 3) * P * 256:u0 * PLUT + (g // 3 + 1) * P * 256]  # unit 0 has candidates
        mx = -np.inf
        mn = np.inf
        for c in range(nch):
            st3 = ustat[((u0 + c) * G + g) * 3:((u0 + c) * G + g + 1) * 3]
            if st3[2] > 0.0:
                mx = max(mx, st3[0])
                mn = min(mn, st3[1])
        cmax = mx  # the candidates' largest logit
        for r in range(nfix):
            pos = s0 + r if r < sink else N - window + (r - sink)
            o = cbase + pos * W
            fixed[r] = np.float64(np.float32(_prob_packed_exact(cf[o:o + W], W, lp, g % 3, off)) * t)
            mx = max(mx, fixed[r])
        z = 0.0
        for c in range(nch):
            st3 = ustat[((u0 + c) * G + g) * 3:((u0 + c) * G + g + 1) * 3]
            if st3[2] > 0.0:
                z += st3[2] * math.exp(st3[0] - mx)
        for r in range(nfix):
            z += math.exp(fixed[r] - mx)
        logz = mx + math.log(z)
        logzs[sidx * G + g] = np.float32(logz)
        plo = max(plo, mn - logz)  # every candidate's p is at least each head's smallest term
        hi_sum += math.exp(cmax - logz)  # and at most the sum of each head's largest
    lo_bits = np.int64(_float32_bits_as_int32(np.float32(math.exp(plo) * 0.5)))  # rounding margin
    hi_bits = np.int64(_float32_bits_as_int32(np.float32(min(hi_sum * 2.0, 1e30))))
    shift = _bits_shift(lo_bits, hi_bits, top)
    pbase[sidx] = lo_bits
    pshift[sidx] = shift
    phi[sidx] = hi_bits


@njit(cache=True, fastmath=True)
def _prob_buckets(pe, m, G, stride, logz, ust, stored, base, shift, top, bu, hs):
    """p = sum_g exp(logit_g - logz[g]) into pe[0:m] (over the g = 0 row), its bucket into bu[0:m], counted
    into hs. With `stored`, pe holds exp(logit_g - max_g) (`_prob_unit_packed`, the unit's max in ust[3g])
    and p = sum_g pe_g * exp(max_g - logz[g]): one multiply per head (serial schedule: the unit is the
    whole head). Otherwise pe holds the logits and p is a function of them alone, so that equal codes get
    equal p in every scan unit of the parallel schedule (its ties then break as the serial one's)."""
    if stored:  # floored at exp(-87), as `_exp_neg` floors exp(logit - logz): vanishing terms still tie
        floor = _exp_neg(np.float32(-87.0))
        c = np.float32(math.exp(np.float64(ust[0]) - np.float64(logz[0])))
        for jj in range(m):
            pe[jj] = max(pe[jj] * c, floor)
        for g in range(1, G):
            eg = pe[g * stride:g * stride + m]
            c = np.float32(math.exp(np.float64(ust[3 * g]) - np.float64(logz[g])))
            for jj in range(m):
                pe[jj] += max(eg[jj] * c, floor)
    else:
        lz = logz[0]
        for jj in range(m):
            pe[jj] = _exp_neg(pe[jj] - lz)
        for g in range(1, G):
            eg = pe[g * stride:g * stride + m]
            lz = logz[g]
            for jj in range(m):
                pe[jj] += _exp_neg(eg[jj] - lz)
    for jj in range(m):
        k = (np.int64(_float32_bits_as_int32(pe[jj])) - base) >> shift
        bu[jj] = min(max(k, 0), top)
    for jj in range(m):
        hs[np.intp(bu[jj])] += 1


@njit(cache=True)
def _bucket_mid(t, hamming, span, af, sf):
    """The score at the middle of bucket t (asymmetric: inverse of the scan's binning; Hamming: exact)."""
    if hamming:
        return 2.0 * t - span
    if sf == 0.0:
        return 0.0
    return (t + 0.5) / np.float64(sf) - np.float64(af)


@njit(cache=True)
def _pool_counts(htot, S, nbins, hamming, span, afs, sfs, temps, mean_k, k_min, capn, out):
    """Water-filling of one batch row's S x mean_k exact tokens over its S selecting heads (`_pool_greedy`),
    by summed-score buckets.

    htot[s*nbins + t]: candidates of head s in score bucket t. A token's estimated log-probability is
    temps[s] * mid_s(t) - log Z_s (Z_s over all of head s's candidates, bucket midpoints).
    """
    est = np.zeros(S * nbins)
    for x in range(S):
        m = -np.inf
        for t in range(nbins):
            if htot[x * nbins + t] > 0:
                m = max(m, temps[x] * _bucket_mid(t, hamming, span, afs[x], sfs[x]))
        z = 0.0
        for t in range(nbins):
            h = htot[x * nbins + t]
            if h > 0:
                z += h * math.exp(temps[x] * _bucket_mid(t, hamming, span, afs[x], sfs[x]) - m)
        logz = m + math.log(z) if z > 0.0 else 0.0
        for t in range(nbins):
            if htot[x * nbins + t] > 0:
                est[x * nbins + t] = temps[x] * _bucket_mid(t, hamming, span, afs[x], sfs[x]) - logz
    _pool_greedy(htot, S, nbins, est, mean_k, k_min, capn, out)


@njit(cache=True)
def _pool_greedy(htot, S, nbins, est, mean_k, k_min, capn, out):
    """Every head keeps its best k_min (capped at capn); the rest of the row's S x mean_k go, bucket by bucket,
    to the highest estimate est[s*nbins + t] of any head (ties: the lower head), a head taking at most capn.
    out[s] = tokens head s selects. With the probability score the buckets of all heads share one map,
    monotone in p, and est is the bucket index itself."""
    top = nbins - 1
    ptr = np.empty(S, np.int64)
    left = np.zeros(S, np.int64)
    extra = 0
    for x in range(S):
        f = min(k_min, capn)
        out[x] = f
        extra += mean_k - f
        t = top
        avail = htot[x * nbins + t]
        rem = f
        while t >= 0:  # the floor takes the head's best f tokens
            if avail > rem:
                avail -= rem
                break
            rem -= avail
            t -= 1
            avail = htot[x * nbins + t] if t >= 0 else 0
        while t >= 0 and avail == 0:
            t -= 1
            avail = htot[x * nbins + t] if t >= 0 else 0
        ptr[x] = t
        left[x] = avail
    while extra > 0:
        best = -1
        bu = -np.inf
        for x in range(S):
            if ptr[x] >= 0 and out[x] < capn:
                u = est[x * nbins + ptr[x]]
                if best < 0 or u > bu:
                    best = x
                    bu = u
        if best < 0:
            break
        take = min(left[best], extra, capn - out[best])
        out[best] += take
        extra -= take
        left[best] -= take
        if left[best] == 0:
            t = ptr[best] - 1
            while t >= 0 and htot[best * nbins + t] == 0:
                t -= 1
            ptr[best] = t
            left[best] = htot[best * nbins + t] if t >= 0 else 0


@njit(cache=True, fastmath=True)
def _rerank_rows(qs, h0, Gq, d, k8f, k8s, base, cand, keep):
    """The re-rank stage for one selecting head: cand[0:m] (positions) -> its best `keep` in cand[0:keep].

    Score of a candidate: its softmax probability among the candidates under the int8 keys
    (logit = scale_j * <q_g * scaling, k8_j>), summed over the Gq query heads; ties keep the lower slot.
    """
    m = cand.size
    lg = np.empty(Gq * m, np.float32)
    kx = np.empty(d, np.float32)
    ql = np.empty(Gq * d, np.float32)  # the group's queries, copied once: no array view per row in the loop
    for g in range(Gq):
        for i in range(d):
            ql[g * d + i] = qs[h0 + g, i]
    w = k8f.shape[1]  # d int8 levels, or d/2 bytes of packed 4-bit ones (level + 8 per nibble)
    packed = w != d
    for r in range(min(m, _PREFETCH)):
        _prefetch(k8f, (base + np.intp(cand[r])) * w)
    for r in range(m):
        if r + _PREFETCH < m:
            _prefetch(k8f, (base + np.intp(cand[r + _PREFETCH])) * w)
        row = base + np.intp(cand[r])
        sc8 = k8s[row]
        if packed:  # unpack and widen once, scaled: every head's dot then reads float32
            for i in range(w):
                x = np.int32(k8f[row, i])
                kx[2 * i] = np.float32((x & 15) - 8) * sc8
                kx[2 * i + 1] = np.float32(((x >> 4) & 15) - 8) * sc8
        else:
            for i in range(d):
                kx[i] = np.float32(k8f[row, i]) * sc8
        for g in range(Gq):
            s = np.float32(0.0)
            for i in range(d):
                s += ql[g * d + i] * kx[i]
            lg[g * m + r] = s
    tot = np.zeros(m, np.float32)
    for g in range(Gq):
        lgg = lg[g * m:(g + 1) * m]
        z = _exp_shift(lgg, m)[1]
        inv = np.float32(1.0) / z
        for r in range(m):
            tot[r] -= lgg[r] * inv
    # the keep smallest of tot (= largest probabilities) in O(m): the keep-th value, then those below
    # it and, in slot order, as many equal to it as fit (ties: lower slot first)
    thr = np.partition(tot, keep - 1)[keep - 1]
    best = np.empty(keep, cand.dtype)
    j = 0
    for r in range(m):
        if tot[r] < thr:
            best[j] = cand[r]
            j += 1
    for r in range(m):
        if j < keep and tot[r] == thr:
            best[j] = cand[r]
            j += 1
    for r in range(keep):
        cand[r] = best[r]


@njit(cache=True)
def _merge_parts(B, Hq, Hkv, G, d, per_query, npart, pm, pl, pacc, out):
    """Combine the parts' partial softmaxes into out (B, Hq, d)."""
    Gq = 1 if per_query else G
    S = Hq if per_query else Hkv
    for bh in range(B * Hq):
        b = bh // Hq
        h = bh % Hq
        if per_query:
            sidx = bh
            g = 0
        else:
            sidx = b * S + h // G
            g = h % G
        o = out[b, h]
        for i in range(d):
            o[i] = 0.0
        M = -np.inf
        for p in range(npart):
            M = max(M, pm[(sidx * npart + p) * Gq + g])
        if M == -np.inf:
            continue
        tot = 0.0
        for p in range(npart):
            u = (sidx * npart + p) * Gq + g
            if pm[u] == -np.inf:
                continue
            w = math.exp(pm[u] - M)
            tot += w * pl[u]
            acc = pacc[u]
            for i in range(d):
                o[i] += w * acc[i]
        inv = 1.0 / tot
        for i in range(d):
            o[i] *= inv


@njit(cache=True)
def _splits(target_units, base, cap):
    """How many pieces to cut each of `base` items into: about target_units in all, within [1, cap]."""
    s = max(1, -(-target_units // max(base, 1)))
    return max(1, min(s, cap))


def _prange_only() -> ParallelOptions:
    """numba's parallel options with only `prange` parallelised.

    With `parallel=True` numba also turns every array expression (`np.zeros`, `.copy()`, ...) into a
    parallel loop of its own, each a launch that wakes the thread pool: the kernel's dozen small
    allocations cost ~1.3 ms per call at 64K, 3.6x the serial scan itself (measured, workqueue layer).
    An options object, not a dict: numba consumes a dict at the first compile, and every later
    signature (bf16, fp16 K/V) would then get the defaults, i.e. everything parallel.
    """
    return ParallelOptions(dict(comprehension=False, reduction=False, inplace_binop=False, setitem=False,
                                numpy=False, stencil=False, fusion=False, prange=True))


# ---------------------------------------------------------------------------------------------
# the fused kernel
# ---------------------------------------------------------------------------------------------
@njit(parallel=_prange_only(), cache=True)
def _dashkv_kernel(q, qp, scaling, kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cf, cb0, csb, csh, N, W, start,
                   sink, window, critical, Hkv, per_query, hamming, nthreads, mode,
                   k8f, k8s, k8b0, k8sb, k8sh, keep, pool_temps, k_min, pool_cap, qbits, low, v8f, v8s,
                   prob_temps, prob_lbits, qenc_w, qenc_b, pq_qmap, pq_books, ws16, ws32, wsf, ws64, out):
    """Returns (status, need16, need32, needf, need64, idx_offset, Lmax).

    Folded query encoder (qenc_w (Hq, d, b) non-empty, qenc_b (Hq, b)): the query's projection
    qp = q @ qenc_w + qenc_b is computed here (`_linear_heads`, as `linear_heads_cpu` computes it), not
    passed in: one Python round trip less per layer and step (~45 µs inside `generate`).

    Re-rank stage (keep > 0): the scan selects `critical` candidates (fewer if the row has fewer), which
    are re-scored from the int8 keys k8f (rows, d) with per-row scales k8s (same row numbering as kf:
    k8b0 + b*k8sb + h*k8sh + j) as their softmax probability among the candidates, summed over the query
    heads of the selecting head; the best `keep` of them are attended exactly.

    Pooled per-head budgets (pool_temps non-empty, one temperature per selecting head of a row): the
    row's S x `critical` exact tokens are shared by its selecting heads by estimated probability, at
    bucket granularity (`_pool_counts`); each head keeps at least k_min and at most pool_cap x critical.

    kf, vf: (rows, d) views of the K/V storage; row of (b, h, j) = kb0 + b*ksb + h*ksh + j (row strides).
    cf: flat uint64 code words; word w of (b, h, j) = cb0 + b*csb + h*csh + j*W + w.
    status 1: a workspace is too small (nothing computed; grow to the returned sizes and call again).
    Bit-plane scan (qbits 4 or 8, asymmetric scorer, not pooled): each selecting head's projection is
    rounded to integer levels and scored by AND + popcount (`_build_planes`); the selection is the exact
    top-`critical` by that integer score, ties to the lower position (`DashKVPolicy.quantised_scan_scores`).
    Low-precision tier (low > 0, fixed exact tier, no re-rank or pooling): the scan selects critical + low
    candidates; the `critical` best (exact score, ties to the lower position) are attended exactly, the
    rest from the int8 copies k8f/v8f (scales k8s/v8s, k8's row numbering), in the same softmax.
    Probability group score (prob_temps non-empty: one float32 temperature per query head; kv_head grouping,
    asymmetric scorer, no bit planes or pooling): each query head g of a KV head is scanned on its own,
    its estimated log-probability is t_g * s_g - log Z_g (Z_g over all the row's valid positions, sinks and
    window included; s_g the exact integer score of the projection rounded to prob_lbits-bit levels,
    `_prob_query`, and t_g the temperature times the rounding step; three heads per packed table look-up), and the KV head ranks its candidates by p = sum_g exp(.) (a function of the logits
    alone, so equal codes tie exactly whatever the chunking) -- what
    `DashKVPolicy.probability_scores` computes. Buckets are the float32 bit patterns of p (monotone),
    shifted to fit the bins; the boundary bucket is ranked by the stored p (stable).
    PQ codes (pq_books (Hkv, P, s, 256) non-empty, pq_qmap (Hkv, d, d); probability group score only): each
    code byte is a centroid index; each query head's integer levels are its score tables (`_pq_query`)
    instead of its projection's, packed as the sign codes' tables are (`_pq_tables`); the rest of the
    probability path is unchanged.
    ws64[:B*S] receives the number of tokens read per selecting head. mode 0: the whole step; 1: stop
    after the selection (scan + select, for timing); 2: stop after the scan.
    """
    B, Hq, d = q.shape
    G = Hq // Hkv
    NS = G if per_query else 1
    S = Hkv * NS
    BS = B * S
    Gq = 1 if per_query else G
    P = 8 * W
    bbits = 64 * W
    pq = pq_books.size > 0
    if qenc_w.shape[0] > 0:  # the query encoder folded into the call
        qp = np.empty((B, Hq, bbits), np.float32)
        _linear_heads(q.reshape((B, Hq, 1, d)), qenc_w, qenc_b, qp.reshape((B, Hq, 1, bbits)))

    # ---- per-row plan (tiny, serial) ----
    st = np.empty(B, np.int64)
    crit = np.zeros(B, np.int64)  # candidates the scan selects in row b (the mean, when pooled)
    pooled = pool_temps.size > 0
    crit_s = np.zeros(BS, np.int64)  # candidates selected per selecting head
    exact_k = keep if keep > 0 else critical  # exact-tier size after the (optional) re-rank
    dense = np.empty(B, np.bool_)
    clo = np.empty(B, np.int64)
    ncand = np.zeros(B, np.int64)
    rowlen = np.empty(B, np.int64)
    maxcand = 1
    Lmax = 1
    anyscan = False
    for b in range(B):
        s0 = min(max(start[b], 0), N)
        st[b] = s0
        valid = N - s0
        dense[b] = sink + window + exact_k >= valid
        clo[b] = s0 + sink
        if dense[b]:
            rowlen[b] = valid
        else:
            crit[b] = min(critical + low, N - window - clo[b])
            rowlen[b] = sink + window + crit[b]
            if pooled:  # room for the largest share a head may get
                rowlen[b] = sink + window + min(pool_cap * crit[b], N - window - clo[b])
            if critical > 0:
                ncand[b] = N - window - clo[b]
                maxcand = max(maxcand, ncand[b])
                anyscan = True
        Lmax = max(Lmax, rowlen[b])
        for x in range(S):
            crit_s[b * S + x] = crit[b]

    nbins = (bbits * Gq + 1) if hamming else NBINS_ASYM
    top = nbins - 1
    # scan units: (b, kvh, chunk); about 8 per thread, chunks of >= _SCAN_MIN_CHUNK positions
    units = 8 * nthreads if nthreads > 1 else 1  # serial: one unit per head (no table rebuilt per chunk)
    nch = _splits(units, B * Hkv, max(1, maxcand // _SCAN_MIN_CHUNK))
    U = B * Hkv * nch
    # attention units: (selecting head, part of its rows)
    npart = _splits(8 * nthreads, BS, max(1, Lmax // _ATTN_MIN_ROWS))  # serial too: fewer parts measured slower
    npart2 = 2 * npart if low > 0 else npart  # with the 8-bit tier: as many parts again for its rows
    AU = BS * npart2
    rpp = -(-Lmax // npart)
    prob = prob_temps.size > 0
    LUTU = NS * P * 256 if (anyscan and not hamming and qbits == 0) else 0  # byte tables per scan unit
    PLUT = 0
    if prob and anyscan:
        LUTU = 0
        PLUT = ((G + 2) // 3) * P * 256  # packed int64 tables per scan unit, three query heads each

    # ---- workspace layout ----
    n16 = BS * maxcand if anyscan else 1
    o_idx = 0
    o_bnd = o_idx + BS * Lmax
    o_hist = o_bnd + (BS * (maxcand + 1) if anyscan else 0)  # +1: the branchless collect's spare slot
    o_ib = o_hist + (U * NS * nbins if anyscan else 0)
    n32 = o_ib + (U * _BLOCK if (anyscan and qbits > 0) else 0)
    o_lut = 0
    o_buf = o_lut + U * LUTU
    o_lg = o_buf + U * _BLOCK
    o_pm = o_lg + AU * rpp * Gq
    o_pl = o_pm + AU * Gq
    o_pacc = o_pl + AU * Gq
    o_qs = o_pacc + AU * Gq * d
    o_pe = o_qs + B * Hq * d
    nf = o_pe + (BS * G * maxcand if (prob and anyscan) else 0)  # probability mode: per query head, then p
    o_cnt = 2 * BS  # after lens and the 8-bit tier's row counts
    o_plut = o_cnt + 2 * U * NS + 4 * BS + 16
    n64 = o_plut + U * PLUT
    if ws16.size < n16 or ws32.size < n32 or wsf.size < nf or ws64.size < n64:
        return 1, n16, n32, nf, n64, o_idx, Lmax

    bk = ws16[0:n16]
    idx = ws32[o_idx:o_bnd]
    bnd = ws32[o_bnd:o_hist]
    hist = ws32[o_hist:o_ib]
    ibuf = ws32[o_ib:n32]
    lut = wsf[o_lut:o_buf]
    sbuf = wsf[o_buf:o_lg]
    lg = wsf[o_lg:o_pm]
    pm = wsf[o_pm:o_pl]
    pl = wsf[o_pl:o_pacc]
    pacc = wsf[o_pacc:o_qs].reshape(AU * Gq, d)
    qs = wsf[o_qs:o_pe].reshape(B * Hq, d)
    pbuf = wsf[o_pe:nf]  # probability mode: [sidx][g][candidate] logits, then p in the g = 0 row
    lens = ws64[0:BS]
    lowc = ws64[BS:2 * BS]  # rows of each head read from the 8-bit copies
    ogt = ws64[o_cnt:o_cnt + U * NS]
    oeq = ws64[o_cnt + U * NS:o_cnt + 2 * U * NS]
    o2 = o_cnt + 2 * U * NS
    thr = ws64[o2:o2 + BS]
    ngt = ws64[o2 + BS:o2 + 2 * BS]
    neq = ws64[o2 + 2 * BS:o2 + 3 * BS]
    lexact = ws64[o2 + 3 * BS:o2 + 4 * BS]  # rows [0, lexact) exact, [lexact, lens) from the 8-bit copies
    plut = ws64[o_plut:n64]  # probability mode: the packed tables of each scan unit

    # scaled queries
    for bh in range(B * Hq):
        qr = qs[bh]
        for i in range(d):
            qr[i] = np.float32(q[bh // Hq, bh % Hq, i] * scaling)

    QL = max(qbits, 1)  # bit planes per code word of the integer query levels
    qpl = np.zeros(BS * W * QL if (anyscan and qbits > 0) else 0, np.uint64)
    qoffs = np.zeros(BS, np.int32)
    qshifts = np.zeros(BS, np.int32)
    qw = np.zeros(B * Hq * W if anyscan else 0, np.uint64)  # Hamming: query sign words, one set per query head
    if anyscan:
        afs = np.zeros(BS, np.float32)
        sfs = np.zeros(BS, np.float32)
        if hamming:
            for bh in range(B * Hq):
                for w in range(W):
                    word = np.uint64(0)
                    for t in range(64):
                        if qp[bh // Hq, bh % Hq, 64 * w + t] > 0:
                            word |= np.uint64(1) << np.uint64(t)
                    qw[bh * W + w] = word
        # bit-plane scan: every selecting head's integer query levels, once (tiny, serial)
        if qbits > 0:
            for sidx in range(BS):
                b = sidx // S
                h0 = ((sidx % S) // NS) * G + sidx % NS
                o, sh = _build_planes(qp, b, h0, Gq, W, qbits, qpl[sidx * W * QL:(sidx + 1) * W * QL])
                qoffs[sidx] = o
                qshifts[sidx] = sh

        ustat = np.zeros(U * G * 3 if prob else 0, np.float64)  # probability mode: (max, min, exp-sum)
        poff = P * ((1 << (prob_lbits - 1)) - 1) if pq else 64 * W * ((1 << (prob_lbits - 1)) - 1)
        # probability mode: every query head's integer levels and effective temperature (tiny, serial)
        plev = (1 << (prob_lbits - 1)) - 1 if prob else 1
        qlev = np.zeros((B if prob else 0, Hq, P * 256 if pq else bbits), np.float32)
        teff = np.zeros(B * Hq if prob else 0, np.float32)
        if prob:
            for bh in range(B * Hq):
                if pq:
                    delta = _pq_query(q, bh // Hq, bh % Hq, (bh % Hq) // G, pq_qmap, pq_books, plev,
                                      qlev[bh // Hq, bh % Hq])
                else:
                    delta = _prob_query(qp, bh // Hq, bh % Hq, bbits, plev, qlev[bh // Hq, bh % Hq])
                teff[bh] = np.float32(np.float64(prob_temps[bh % Hq]) * delta)
        logzs = np.zeros(BS * G if prob else 0, np.float32)
        pbase = np.zeros(BS if prob else 0, np.int64)
        pshift = np.zeros(BS if prob else 0, np.int64)
        phi = np.zeros(BS if prob else 0, np.int64)
        # ---- phase 1 (parallel): byte tables, scan, bucket histogram per unit ----
        for u in prange(U):
            b = u // (Hkv * nch)
            kvh = (u // nch) % Hkv
            c = u % nch
            hu = hist[u * NS * nbins:(u + 1) * NS * nbins]
            for i in range(NS * nbins):
                hu[i] = 0
            if ncand[b] > 0:
                lo, hi = _unit_range(clo[b], ncand[b], nch, c)
                m = hi - lo
                cw = (cb0 + b * csb + kvh * csh + lo * W)
                cu = cf[cw:cw + m * W]
            if ncand[b] > 0 and prob:  # each query head's logits, their max, min and exp-sum in this unit
                sidx = b * Hkv + kvh
                scratch = np.empty(m if G % 3 else 0, np.float32)  # rows of the absent heads of a last group
                for g0 in range(0, G, 3):
                    nh = min(3, G - g0)
                    lp = plut[u * PLUT + (g0 // 3) * P * 256:u * PLUT + (g0 // 3 + 1) * P * 256]
                    if pq:
                        _pq_tables(qlev, b, kvh * G + g0, nh, P, plev, lp)
                    else:
                        _prob_tables(qlev, b, kvh * G + g0, nh, P, plev, lp)
                    h0 = b * Hq + kvh * G + g0
                    _prob_unit_packed(cu, m, W, lp, nh, poff, teff[h0:h0 + nh], pbuf,
                                      (sidx * G + g0) * maxcand + (lo - clo[b]), maxcand,
                                      ustat[(u * G + g0) * 3:(u * G + g0 + nh) * 3], scratch, nch == 1)
            elif ncand[b] > 0:
                buf = sbuf[u * _BLOCK:(u + 1) * _BLOCK]
                ib = ibuf[u * _BLOCK:(u + 1) * _BLOCK] if qbits > 0 else ibuf[0:0]
                for ns in range(NS):
                    sidx = (b * Hkv + kvh) * NS + ns
                    bu = bk[sidx * maxcand + (lo - clo[b]):sidx * maxcand + (hi - clo[b])]
                    hs = hu[ns * nbins:(ns + 1) * nbins]
                    h0 = kvh * G + ns  # first query head of this selecting head
                    af = np.float32(0.0)
                    sf = np.float32(0.0)
                    lt = lut[0:0]
                    if not hamming and qbits == 0:
                        lt = lut[u * LUTU + ns * P * 256:u * LUTU + (ns + 1) * P * 256]
                        a = _build_lut(qp, b, h0, Gq, P, lt)
                        af = np.float32(a)
                        sf = np.float32(NBINS_ASYM / (2.0 * a)) if a > 0.0 else np.float32(0.0)
                        afs[sidx] = af  # every chunk of the head writes the same values
                        sfs[sidx] = sf
                    qwu = qw[(b * Hq + h0) * W:(b * Hq + h0 + Gq) * W]
                    _scan_unit(cu, m, W, hamming, lt, af, sf, qwu, Gq, top, buf, bu, hs, qbits,
                               qpl[sidx * W * QL:(sidx + 1) * W * QL], qoffs[sidx], qshifts[sidx], ib)
        if prob:  # normalisers (serial, tiny), then p and its bucket per candidate (parallel)
            for sidx in range(BS):
                b = sidx // S
                if ncand[b] > 0:
                    _prob_normalise(sidx, sidx % Hkv, G, nch, PLUT, P, W, plut, poff, ustat, logzs,
                                    teff[b * Hq:(b + 1) * Hq],
                                    cf, cb0 + b * csb + (sidx % Hkv) * csh, st[b], sink, N, window, top,
                                    pbase, pshift, phi)
            if pooled:  # one bucket map per row, so that a bucket means the same p in every head of the row
                for b in range(B):
                    if ncand[b] > 0:
                        lo_bits = pbase[b * S]
                        hi_bits = phi[b * S]
                        for x in range(1, S):
                            lo_bits = min(lo_bits, pbase[b * S + x])
                            hi_bits = max(hi_bits, phi[b * S + x])
                        shift = _bits_shift(lo_bits, hi_bits, top)
                        for x in range(S):
                            pbase[b * S + x] = lo_bits
                            pshift[b * S + x] = shift
            for u in prange(U):
                b = u // (Hkv * nch)
                kvh = (u // nch) % Hkv
                c = u % nch
                hu = hist[u * nbins:(u + 1) * nbins]
                for i in range(nbins):
                    hu[i] = 0
                if ncand[b] > 0:
                    lo, hi = _unit_range(clo[b], ncand[b], nch, c)
                    sidx = b * Hkv + kvh
                    off = sidx * G * maxcand + (lo - clo[b])
                    _prob_buckets(pbuf[off:], hi - lo, G, maxcand, logzs[sidx * G:(sidx + 1) * G],
                                  ustat[u * G * 3:(u + 1) * G * 3], nch == 1, pbase[sidx], pshift[sidx],
                                  top, bk[sidx * maxcand + (lo - clo[b]):sidx * maxcand + (hi - clo[b])], hu)
        if mode == 2:
            return 0, n16, n32, nf, n64, o_idx, Lmax

        # ---- phase 1b (serial, pooled budgets only): exact-tier size per selecting head ----
        if pooled:
            bucket_est = np.empty(S * nbins if prob else 0)  # probability mode: the estimate is the bucket
            for i in range(bucket_est.size):
                bucket_est[i] = np.float64(i % nbins)
            for b in range(B):
                if ncand[b] <= 0:
                    continue
                htot = np.zeros(S * nbins, np.int64)
                for x in range(S):
                    kvh = x // NS
                    ns = x % NS
                    u0 = (b * Hkv + kvh) * nch
                    for c in range(nch):
                        hc = hist[((u0 + c) * NS + ns) * nbins:((u0 + c) * NS + ns + 1) * nbins]
                        for t in range(nbins):
                            htot[x * nbins + t] += hc[t]
                if prob:  # the buckets share the row's map, monotone in p: the bucket is the estimate
                    _pool_greedy(htot, S, nbins, bucket_est, crit[b], min(k_min, crit[b]),
                                 min(pool_cap * crit[b], ncand[b]), crit_s[b * S:(b + 1) * S])
                else:
                    _pool_counts(htot, S, nbins, hamming, Gq * bbits, afs[b * S:(b + 1) * S], sfs[b * S:(b + 1) * S],
                                 pool_temps, crit[b], min(k_min, crit[b]),
                                 min(pool_cap * crit[b], ncand[b]), crit_s[b * S:(b + 1) * S])

        # ---- phase 2 (serial, small): threshold bucket and write offsets per selecting head ----
        for sidx in range(BS):
            b = sidx // S
            kvh = (sidx % S) // NS
            ns = sidx % NS
            thr[sidx] = nbins
            ngt[sidx] = 0
            neq[sidx] = 0
            if ncand[b] > 0:
                u0 = (b * Hkv + kvh) * nch
                cum = 0
                t = top
                while t > 0:
                    cnt = 0
                    for c in range(nch):
                        cnt += hist[((u0 + c) * NS + ns) * nbins + t]
                    if cum + cnt >= crit_s[sidx]:
                        break
                    cum += cnt
                    t -= 1
                thr[sidx] = t
                ngt[sidx] = cum
                rg = 0
                re = 0
                for c in range(nch):
                    hc = hist[((u0 + c) * NS + ns) * nbins:((u0 + c) * NS + ns + 1) * nbins]
                    gt = 0
                    for x in range(t + 1, nbins):
                        gt += hc[x]
                    ogt[(u0 + c) * NS + ns] = rg
                    oeq[(u0 + c) * NS + ns] = re
                    rg += gt
                    re += hc[t]
                neq[sidx] = re

        # ---- phase 3 (parallel): positions above the threshold bucket, and the boundary bucket ----
        for u in prange(U):
            b = u // (Hkv * nch)
            kvh = (u // nch) % Hkv
            c = u % nch
            if ncand[b] > 0:
                lo, hi = _unit_range(clo[b], ncand[b], nch, c)
                for ns in range(NS):
                    sidx = (b * Hkv + kvh) * NS + ns
                    t = thr[sidx]
                    bu = bk[sidx * maxcand + (lo - clo[b]):sidx * maxcand + (hi - clo[b])]
                    gi = idx[sidx * Lmax + sink + ogt[u * NS + ns]:(sidx + 1) * Lmax]
                    ei = bnd[sidx * (maxcand + 1) + oeq[u * NS + ns]:(sidx + 1) * (maxcand + 1)]
                    pg = 0
                    pe = 0
                    if nch == 1:  # branchless: every position is written, kept only if it passes
                        # (safe: one unit owns the head's rows; the slot after the last kept one is
                        # the boundary winners' (phase 4) or bnd's spare slot)
                        for jj in range(hi - lo):
                            k = np.intp(bu[jj])
                            gi[pg] = lo + jj
                            pg += np.intp(k > t)
                            ei[pe] = lo + jj
                            pe += np.intp(k == t)
                    else:
                        for jj in range(hi - lo):
                            k = np.intp(bu[jj])
                            if k > t:
                                gi[pg] = lo + jj
                                pg += 1
                            elif k == t:
                                ei[pe] = lo + jj
                                pe += 1

    # ---- phase 4 (serial): each row set = sinks | above threshold | boundary winners | window ----
    for sidx in range(BS):
        b = sidx // S
        kvh = (sidx % S) // NS
        ns = sidx % NS
        ii = idx[sidx * Lmax:(sidx + 1) * Lmax]
        lens[sidx] = rowlen[b]
        lexact[sidx] = -1  # set below when the 8-bit tier takes rows; else every row is exact
        if dense[b]:
            for r in range(rowlen[b]):
                ii[r] = st[b] + r
        else:
            for r in range(sink):
                ii[r] = st[b] + r
            cb = crit_s[sidx]
            lens[sidx] = sink + cb + window
            for r in range(window):
                ii[sink + cb + r] = N - window + r
            if ncand[b] > 0:
                need = cb - ngt[sidx]
                eb = bnd[sidx * (maxcand + 1):sidx * (maxcand + 1) + neq[sidx]]
                dst = ii[sink + ngt[sidx]:sink + cb]
                # what re-ranks this head's codes exactly: its byte tables (any chunk's are identical), its
                # query sign words, its bit planes
                u0 = (b * Hkv + kvh) * nch
                lt = lut[u0 * LUTU + ns * P * 256:u0 * LUTU + (ns + 1) * P * 256]
                qwu = qw[(b * Hq + kvh * G + ns) * W:(b * Hq + kvh * G + ns + Gq) * W]
                pw = qpl[sidx * W * QL:(sidx + 1) * W * QL]
                cbase = cb0 + b * csb + kvh * csh
                pp = pbuf[sidx * G * maxcand:sidx * G * maxcand + ncand[b]] if prob else pbuf[0:0]
                if hamming or neq[sidx] == need or (qbits > 0 and qshifts[sidx] == 0):
                    for r in range(need):
                        dst[r] = eb[r]  # ties: lower position first
                else:  # several scores share the threshold bucket: exact scores, stable
                    m = neq[sidx]
                    sc = np.empty(m, np.float64)
                    for r in range(m):
                        o = cbase + np.intp(eb[r]) * W
                        sc[r] = (-np.float64(pp[np.intp(eb[r]) - clo[b]]) if prob else
                                 _exact_rank_key(cf[o:o + W], W, hamming, qbits, lt, qwu, Gq, pw))
                    order = np.argsort(sc, kind="mergesort")  # stable: ties keep position order
                    for r in range(need):
                        dst[r] = eb[order[r]]
                if low > 0 and cb > critical:  # the best `critical` exact, the rest to the 8-bit tier
                    sel = ii[sink:sink + cb].copy()
                    sc2 = np.empty(cb, np.float64)
                    for r in range(cb):
                        o = cbase + np.intp(sel[r]) * W
                        sc2[r] = (-np.float64(pp[np.intp(sel[r]) - clo[b]]) if prob else
                                  _exact_rank_key(cf[o:o + W], W, hamming, qbits, lt, qwu, Gq, pw))
                    # the critical-th best score in O(cb), then: better ones exact, ties in slot order (=
                    # position order: ties never straddle the two groups, whose buckets differ), rest 8-bit
                    thr2 = np.partition(sc2, critical - 1)[critical - 1]
                    je = 0
                    jl = 0
                    lo8 = ii[sink + critical + window:sink + cb + window]
                    for r in range(cb):
                        if sc2[r] < thr2:
                            ii[sink + je] = sel[r]
                            je += 1
                    for r in range(cb):
                        if sc2[r] == thr2:
                            if je < critical:
                                ii[sink + je] = sel[r]
                                je += 1
                            else:
                                lo8[jl] = sel[r]
                                jl += 1
                        elif sc2[r] > thr2:
                            lo8[jl] = sel[r]
                            jl += 1
                    for r in range(window):
                        ii[sink + critical + r] = N - window + r
                    lexact[sidx] = sink + critical + window
                if keep > 0 and cb > keep:
                    _rerank_rows(qs, b * Hq + kvh * G + ns, Gq, d, k8f, k8s, k8b0 + b * k8sb + kvh * k8sh,
                                 ii[sink:sink + cb], keep)
                    for r in range(window):
                        ii[sink + keep + r] = N - window + r
                    lens[sidx] = sink + keep + window
    for sidx in range(BS):
        if lexact[sidx] < 0:
            lexact[sidx] = lens[sidx]
        lowc[sidx] = lens[sidx] - lexact[sidx]
    if mode == 1:
        return 0, n16, n32, nf, n64, o_idx, Lmax

    # ---- phase 5 (parallel): attention parts over the row sets (then over the 8-bit tier's rows) ----
    for au in prange(AU):
        sidx = au // npart2
        part = au % npart2
        b = sidx // S
        kvh = (sidx % S) // NS
        ns = sidx % NS
        h0 = b * Hq + kvh * G + ns
        lgu = lg[au * rpp * Gq:(au + 1) * rpp * Gq]
        if part < npart:
            r0 = min(lexact[sidx], part * rpp)
            n = min(lexact[sidx], r0 + rpp) - r0
            rows = idx[sidx * Lmax + r0:sidx * Lmax + r0 + n]
            _attend_rows(qs, h0, Gq, d, kf, vf, kb0 + b * ksb + kvh * ksh, vb0 + b * vsb + kvh * vsh,
                         rows, n, 0, lgu, pm, pl, pacc, au * Gq)
        else:
            r0 = min(lens[sidx], lexact[sidx] + (part - npart) * rpp)
            n = min(lens[sidx], r0 + rpp) - r0
            rows = idx[sidx * Lmax + r0:sidx * Lmax + r0 + n]
            _attend_rows8(qs, h0, Gq, d, k8f, k8s, v8f, v8s, k8b0 + b * k8sb + kvh * k8sh, rows, n, lgu,
                          pm, pl, pacc, au * Gq)

    _merge_parts(B, Hq, Hkv, G, d, per_query, npart2, pm, pl, pacc, out)
    return 0, n16, n32, nf, n64, o_idx, Lmax


@njit(parallel=_prange_only(), cache=True)
def _dense_kernel(q, scaling, kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, N, start, Hkv, nthreads, wsf, out):
    """Dense GQA decode attention, split over (batch, KV head, chunk of positions). Returns 0 or need."""
    B, Hq, d = q.shape
    G = Hq // Hkv
    BH = B * Hkv
    npart = _splits(8 * nthreads, BH, max(1, N // 256))
    AU = BH * npart
    rpp = -(-N // npart)
    o_pm = AU * rpp * G
    o_pl = o_pm + AU * G
    o_pacc = o_pl + AU * G
    o_qs = o_pacc + AU * G * d
    nf = o_qs + B * Hq * d
    if wsf.size < nf:
        return nf
    lg = wsf[0:o_pm]
    pm = wsf[o_pm:o_pl]
    pl = wsf[o_pl:o_pacc]
    pacc = wsf[o_pacc:o_qs].reshape(AU * G, d)
    qs = wsf[o_qs:nf].reshape(B * Hq, d)
    for bh in range(B * Hq):
        qr = qs[bh]
        for i in range(d):
            qr[i] = np.float32(q[bh // Hq, bh % Hq, i] * scaling)
    norows = np.empty(0, np.int32)
    for au in prange(AU):
        bk = au // npart
        part = au % npart
        b = bk // Hkv
        kvh = bk % Hkv
        s0 = min(max(start[b], 0), N)
        cl = -(-(N - s0) // npart)
        r0 = min(N, s0 + part * cl)
        n = min(N, r0 + cl) - r0
        _attend_rows(qs, b * Hq + kvh * G, G, d, kf, vf, kb0 + b * ksb + kvh * ksh, vb0 + b * vsb + kvh * vsh,
                     norows, n, r0, lg[au * rpp * G:(au + 1) * rpp * G], pm, pl, pacc, au * G)
    _merge_parts(B, Hq, Hkv, G, d, False, npart, pm, pl, pacc, out)
    return 0


@njit(cache=True, fastmath=True)
def _linear_heads(x, w, bias, out):
    """out[b, h, t] = x[b, h, t] @ w[h] + bias[h] for (B, H, T, d) x of any stored dtype, float32 out."""
    B, H, T, d = x.shape
    nb = w.shape[2]
    for b in range(B):
        for h in range(H):
            wh = w[h]
            for t in range(T):
                acc = out[b, h, t]
                for j in range(nb):
                    acc[j] = bias[h, j]
                for i in range(d):
                    xi = _f32(x[b, h, t, i])
                    wr = wh[i]
                    for j in range(nb):
                        acc[j] += xi * wr[j]


@njit(cache=True)
def _pack_codes(proj, levels, out):
    """(B, H, T, m) float32 -> (B, H, T, m*levels/64) words (`dashkv.codes.key_code_bits`): levels 1 sets
    bit j of word w iff proj[..., 64w + j] > 0; levels L > 1 stores output j as the offset-binary level
    v = clamp(floor(proj + 2^(L-1)), 0, 2^L - 1), its bit t at code bit j*L + t."""
    B, H, T, m = proj.shape
    nw = out.shape[3]
    half = np.float32(1 << (levels - 1))
    top = np.float32((1 << levels) - 1)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                p = proj[b, h, t]
                if levels == 1:
                    for wd in range(nw):
                        word = np.uint64(0)
                        for j in range(64):
                            if p[64 * wd + j] > 0:
                                word |= np.uint64(1) << np.uint64(j)
                        out[b, h, t, wd] = word
                    continue
                for wd in range(nw):
                    out[b, h, t, wd] = np.uint64(0)
                for j in range(m):
                    v = np.int64(min(max(np.floor(p[j] + half), np.float32(0.0)), top))
                    for tb in range(levels):
                        if (v >> tb) & 1:
                            i = j * levels + tb
                            out[b, h, t, i // 64] |= np.uint64(1) << np.uint64(i % 64)


def linear_heads_cpu(x: torch.Tensor, weight: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    """Head-wise linear map (B, H, T, d) -> (B, H, T, b) float32 in one compiled loop.

    For the few tokens of a decode step this replaces a batched matmul and its dispatch (~50-100 us per
    layer in torch) by a few microseconds; `weight` (H, d, b) and `bias` (H, b) are float32 numpy arrays.
    """
    B, H, T, _ = x.shape
    out = np.empty((B, H, T, weight.shape[2]), np.float32)
    _linear_heads(_np(x.detach()), weight, bias, out)
    return torch.from_numpy(out)


def _check_code_width(outputs: int, levels: int) -> None:
    """The packer writes outputs x levels bits into whole 64-bit words, unchecked inside numba."""
    if levels < 1 or (outputs * levels) % 64:
        raise ValueError(f"{outputs} key outputs x {levels}-bit levels is not a whole number of 64-bit words")


def encode_linear_cpu(x: torch.Tensor, weight: np.ndarray, bias: np.ndarray, levels: int = 1) -> torch.Tensor:
    """Packed key codes (B, H, T, b/64) int64 of a head-wise linear key encoder (see `linear_heads_cpu`),
    b = outputs x `levels` (sign codes, or multi-bit levels: `_pack_codes`)."""
    B, H, T, _ = x.shape
    _check_code_width(weight.shape[2], levels)
    proj = np.empty((B, H, T, weight.shape[2]), np.float32)
    _linear_heads(_np(x.detach()), weight, bias, proj)
    words = np.empty((B, H, T, weight.shape[2] * levels // 64), np.uint64)
    _pack_codes(proj, levels, words)
    return torch.from_numpy(words.view(np.int64))


@njit(cache=True)
def _append_coded(kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cf, cb0, csb, csh, W, pos, knew, vnew, w, bias, levels,
                  proj, words):
    """Write the T new tokens' K/V rows at positions pos.. of the cache buffers and their key codes, in one
    call: the same `_linear_heads` + `_pack_codes` as `encode_linear_cpu`, so the codes are identical."""
    B, H, T, d = knew.shape
    _linear_heads(knew, w, bias, proj)
    _pack_codes(proj, levels, words)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kr = kf[kb0 + b * ksb + h * ksh + pos + t]
                vr = vf[vb0 + b * vsb + h * vsh + pos + t]
                for i in range(d):
                    kr[i] = knew[b, h, t, i]
                    vr[i] = vnew[b, h, t, i]
                c0 = cb0 + b * csb + h * csh + (pos + t) * W
                for wd in range(W):
                    cf[c0 + wd] = words[b, h, t, wd]


@njit(cache=True)
def _pq_encode(knew, kmap, books, norms, words):
    """PQ codes of (B, H, T, d) keys -> words (B, H, T, P/8): per sub-space p the centroid c minimising
    |c|^2 - 2 x.c (x = (kmap[h] k)[p s:(p+1) s], float32, ties to the lower index): `dashkv.pq.encode_keys`
    for a decode step's few tokens."""
    B, H, T, d = knew.shape
    P = books.shape[1]
    s = books.shape[3]
    x = np.empty(d, np.float32)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for r in range(d):
                    acc = np.float32(0.0)
                    for i in range(d):
                        acc += kmap[h, r, i] * _f32(knew[b, h, t, i])
                    x[r] = acc
                for wd in range(words.shape[3]):
                    words[b, h, t, wd] = np.uint64(0)
                for p in range(P):
                    best = np.float32(np.inf)
                    arg = 0
                    for c in range(256):
                        dot = np.float32(0.0)
                        for j in range(s):
                            dot += x[p * s + j] * books[h, p, c, j]
                        dist = norms[h, p, c] - np.float32(2.0) * dot
                        if dist < best:
                            best = dist
                            arg = c
                    words[b, h, t, p // 8] |= np.uint64(arg) << np.uint64(8 * (p % 8))


@njit(cache=True)
def _append_pq(kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cf, cb0, csb, csh, W, pos, knew, vnew, kmap, books, norms,
               words):
    """`_append_coded` for PQ codes (`_pq_encode`)."""
    B, H, T, d = knew.shape
    _pq_encode(knew, kmap, books, norms, words)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kr = kf[kb0 + b * ksb + h * ksh + pos + t]
                vr = vf[vb0 + b * vsb + h * vsh + pos + t]
                for i in range(d):
                    kr[i] = knew[b, h, t, i]
                    vr[i] = vnew[b, h, t, i]
                c0 = cb0 + b * csb + h * csh + (pos + t) * W
                for wd in range(W):
                    cf[c0 + wd] = words[b, h, t, wd]


@njit(cache=True)
def _append_int8(qf, qb0, qsb, qsh, sf, pos, x):
    """Write the T new rows of x (B, H, T, d) as symmetric int8 at positions pos.. of an int8 buffer (rows
    view qf, row strides as `_rows` gives them) and their float32 scales into sf (same row numbering):
    scale = max(max|row|, 1e-12) / 127, q = round-half-even(row / scale) clamped to +-127, in float32 --
    `QuantizedRows.quantize`, value for value."""
    B, H, T, d = x.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = qb0 + b * qsb + h * qsh + pos + t
                amax = np.float32(0.0)
                for i in range(d):
                    amax = max(amax, abs(_f32(x[b, h, t, i])))
                sc = max(amax, np.float32(1e-12)) / np.float32(127.0)
                sf[row] = sc
                qr = qf[row]
                for i in range(d):
                    v = np.rint(_f32(x[b, h, t, i]) / sc)
                    qr[i] = np.int8(min(max(v, np.float32(-127.0)), np.float32(127.0)))


@njit(cache=True)
def _append_int4(qf, qb0, qsb, qsh, sf, pos, x):
    """`_append_int8` for the packed 4-bit copy (`QuantizedRows.quantize(x, 4)`, value for value): scale =
    max(max|row|, 1e-12) / 7, levels round-half-even(row / scale) clamped to +-7, stored as level + 8,
    element 2i in the low nibble of byte i and 2i+1 in its high nibble."""
    B, H, T, d = x.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = qb0 + b * qsb + h * qsh + pos + t
                amax = np.float32(0.0)
                for i in range(d):
                    amax = max(amax, abs(_f32(x[b, h, t, i])))
                sc = max(amax, np.float32(1e-12)) / np.float32(7.0)
                sf[row] = sc
                qr = qf[row]
                for i in range(d // 2):
                    lo = np.int32(min(max(np.rint(_f32(x[b, h, t, 2 * i]) / sc), np.float32(-7.0)), np.float32(7.0)))
                    hi = np.int32(min(max(np.rint(_f32(x[b, h, t, 2 * i + 1]) / sc), np.float32(-7.0)),
                                      np.float32(7.0)))
                    byte = (lo + 8) | ((hi + 8) << 4)
                    qr[i] = np.int8(byte - 256 if byte > 127 else byte)


def append_int8_cpu(rows8: tuple, pos: int, x: torch.Tensor, bits: int = 8) -> None:
    """Append T tokens' rows (B, H, T, d) to an int8 (or, bits=4, packed int4) copy: rows8 = (`_rows` of the
    int8 buffer, `_rows` of its scales buffer), both laid out as the cache's K buffer (the fused append's
    int8 part)."""
    (qf, qsb, qsh, qb0), (sf, _, _, _) = rows8
    (_append_int4 if bits == 4 else _append_int8)(qf, qb0, qsb, qsh, sf.reshape(-1), int(pos), _np(x.detach()))


class BufferViews:
    """Zero-copy numpy views of one cache layer's K, V and code buffers, made once per buffer allocation.

    A decode step at 8K otherwise re-derives them from the tensors' strides in Python for every call
    (~5 us each, x 3 buffers, x 2 calls, x 28 layers); the cache layer keeps this object while its buffers
    stay, and both the fused append and the kernel take it. `ptrs` are the buffers' data pointers: a view
    of the same buffers ([:, :, :N]) has the same ones, which is what the kernel checks before using it.
    `int8` holds the same for the int8 copies (re-rank stage, 8-bit tier): name -> (int8 rows, scales).
    """

    __slots__ = ("k", "v", "codes", "ptrs", "W", "int8", "int8_ptrs")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, codes: torch.Tensor,
                 int8: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        int8 = int8 or {}
        for t in (keys, values, codes, *(x for pair in int8.values() for x in pair)):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("BufferViews takes whole contiguous CPU buffers")
        self.k = _rows(keys)
        self.v = _rows(values)
        cft, csb, csh, cb0 = _flat(codes)
        self.codes = (cft.view(np.uint64), csb, csh, cb0)
        self.W = codes.shape[-1]
        self.ptrs = (keys.data_ptr(), values.data_ptr(), codes.data_ptr())
        self.int8 = {name: (_rows(q), _rows(sc)) for name, (q, sc) in int8.items()}
        self.int8_ptrs = {name: (q.data_ptr(), sc.data_ptr()) for name, (q, sc) in int8.items()}

    def matches(self, keys: torch.Tensor, values: torch.Tensor, codes: torch.Tensor,
                int8: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> bool:
        """Views of these buffers (and, if given, of exactly these int8 copies)?"""
        if (keys.data_ptr(), values.data_ptr(), codes.data_ptr()) != self.ptrs:
            return False
        return int8 is None or {n: (q.data_ptr(), sc.data_ptr()) for n, (q, sc) in int8.items()} == self.int8_ptrs



def _int8_rows(views: BufferViews | None, name: str, rows: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """(`_rows` of the int8 rows, `_rows` of their scales) for the copy `rows` (views of buffer `name`):
    the memoized ones when `views` holds exactly these buffers, else derived now."""
    memo = views.int8.get(name) if views is not None else None
    if memo is not None and (rows[0].data_ptr(), rows[1].data_ptr()) == views.int8_ptrs[name]:
        return memo
    return _rows(rows[0]), _rows(rows[1])


def append_coded_cpu(views: BufferViews, pos: int, keys: torch.Tensor, values: torch.Tensor,
                     weight: np.ndarray, bias: np.ndarray, levels: int = 1) -> None:
    """Append T decode tokens' keys/values (B, H, T, d) at `pos` and write their codes, in one compiled call
    (the cache's fast path; `DashKVLayer._append`+`encode_linear_cpu` is the reference it is tested on)."""
    B, H, T, _ = keys.shape
    nb = weight.shape[2]
    _check_code_width(nb, levels)
    proj = np.empty((B, H, T, nb), np.float32)
    words = np.empty((B, H, T, nb * levels // 64), np.uint64)
    kf, ksb, ksh, kb0 = views.k
    vf, vsb, vsh, vb0 = views.v
    cf, csb, csh, cb0 = views.codes
    _append_coded(kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cf, cb0, csb, csh, views.W, int(pos),
                  _np(keys.detach()), _np(values.detach()), weight, bias, int(levels), proj, words)


def append_pq_cpu(views: BufferViews, pos: int, keys: torch.Tensor, values: torch.Tensor, key_map: np.ndarray,
                  books: np.ndarray, norms: np.ndarray) -> None:
    """`append_coded_cpu` for PQ codes: key_map (H, d, d), books (H, P, 256, s), norms (H, P, 256) float32
    (`HashEncoders.pq_key_arrays`)."""
    B, H, T, _ = keys.shape
    words = np.empty((B, H, T, books.shape[1] // 8), np.uint64)
    kf, ksb, ksh, kb0 = views.k
    vf, vsb, vsh, vb0 = views.v
    cf, csb, csh, cb0 = views.codes
    _append_pq(kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cf, cb0, csb, csh, views.W, int(pos),
               _np(keys.detach()), _np(values.detach()), key_map, books, norms, words)


def encode_pq_cpu(keys: torch.Tensor, key_map: np.ndarray, books: np.ndarray, norms: np.ndarray) -> torch.Tensor:
    """PQ codes (B, H, T, P/8) int64 of a few keys by the compiled encoder (`append_pq_cpu`'s)."""
    B, H, T, _ = keys.shape
    words = np.empty((B, H, T, books.shape[1] // 8), np.uint64)
    _pq_encode(_np(keys.detach()), key_map, books, norms, words)
    return torch.from_numpy(words.view(np.int64))


def _serial(dispatcher, name: str):
    """The same kernel compiled without `parallel=True` (prange runs as range) under its own name, so
    numba's on-disk cache keeps both. One body, two schedules: the tests run both against the reference."""
    f = dispatcher.py_func
    g = pytypes.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    g.__doc__ = f.__doc__
    return njit(cache=True, nogil=True)(g)  # nogil: batch rows may run on several Python threads at once


_dashkv_kernel_serial = _serial(_dashkv_kernel, "_dashkv_kernel_serial")
_dense_kernel_serial = _serial(_dense_kernel, "_dense_kernel_serial")


# ---------------------------------------------------------------------------------------------
# Python side: thread pool, zero-copy views, per-thread workspaces
# ---------------------------------------------------------------------------------------------
def _init_threads() -> None:
    """Pick numba's `workqueue` threading layer before its first parallel launch, unless the user chose
    one (NUMBA_THREADING_LAYER).

    numba's OpenMP layer loads the *system* libgomp beside the copy torch bundles; once it starts,
    torch's own thread settings are no longer what the user set (measured: `torch.get_num_threads()`
    went from 1 to 2 in the same process), and two OpenMP runtimes with spinning workers share the
    cores. workqueue threads sleep between launches and touch nothing of torch's. It does not allow
    concurrent launches from several Python threads, so parallel launches hold a lock
    (`_PARALLEL_LOCK`); single sequences run the serial kernels and never launch at all.
    """
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", False):
        return
    if "NUMBA_THREADING_LAYER" in os.environ or numba.config.THREADING_LAYER != "default":
        return
    numba.config.THREADING_LAYER = "workqueue"


def threading_info() -> dict:
    """The threads and layer the kernels run with (for benchmark reports); starts no threads."""
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not started"
    return {"numba_threads": numba.config.NUMBA_NUM_THREADS, "numba_layer": layer,
            "torch_threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", ""), "row_threads": row_threads()}


_init_threads()
_tls = threading.local()
_PARALLEL_LOCK = threading.Lock()  # numba's workqueue layer takes one parallel launch at a time
_NO_LOCK = contextlib.nullcontext()


def _workspace() -> list:
    ws = getattr(_tls, "ws", None)
    if ws is None:
        ws = _tls.ws = [np.empty(1, np.uint16), np.empty(1, np.int32), np.empty(1, np.float32),
                        np.empty(1, np.int64)]
    return ws


def row_threads() -> int:
    """How many threads one serial kernel call splits its batch rows (or, for one row, its KV heads) over
    (`set_row_threads`, else `DASHKV_ROW_THREADS`; default: torch's thread count, so that batch decoding
    uses the cores torch's matmuls use)."""
    if _ROW_THREADS[0] is None:  # read the environment at first use, so a bad value fails with its name
        _ROW_THREADS[0] = _env_row_threads()
    return _ROW_THREADS[0] or max(1, torch.get_num_threads())


def _env_row_threads() -> int:
    raw = os.environ.get("DASHKV_ROW_THREADS", "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 1 <= n <= 64:
        raise ValueError(f"DASHKV_ROW_THREADS must be an integer in [1, 64] (or unset: torch's thread count), "
                         f"got {raw!r}")
    return n


def set_row_threads(n: int | None) -> None:
    """Split a serial kernel call's batch rows (or one row's KV heads) over n threads: the calling one plus
    n - 1 workers kept for the process. Rows and heads are independent, so which tokens are selected and
    the counts do not depend on n; the outputs agree to float rounding (~1e-7: a part's attention rows are
    cut into as many pieces as its size asks, and the pieces' softmax sums are merged in that order).
    None: `DASHKV_ROW_THREADS`, else torch's thread count; 1: everything on the calling thread."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64):
        raise ValueError(f"row threads must be None or an integer in [1, 64], got {n!r}")
    _ROW_THREADS[0] = n if n is not None else _env_row_threads()


_ROW_THREADS: list = [None]  # None: not read from the environment yet; 0: torch's thread count
_ROW_POOL: list = [None, 0]  # (executor, workers)
_ROW_POOL_LOCK = threading.Lock()


def _reset_row_pool_in_child() -> None:
    """A forked child inherits the pool object but none of its threads: submitting to it would wait
    forever. The child starts its own pool on first use."""
    global _ROW_POOL_LOCK
    _ROW_POOL_LOCK = threading.Lock()
    _ROW_POOL[:] = [None, 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_row_pool_in_child)


def _omp_spin_unbounded() -> bool:
    """Whether torch's OpenMP workers spin on after each op for libgomp's default (300000 rounds, several
    ms here): they then hold the cores the row threads need, and splitting rows buys nothing (measured,
    docs/kernels.md "Batch rows on threads"). The environment is read once, when torch loads libgomp."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").lower()
    return "GOMP_SPINCOUNT" not in os.environ and policy != "passive" and "OpenMP" in torch.__config__.parallel_info()


def _warn_spin_once() -> None:
    if _SPIN_CHECKED[0]:
        return
    _SPIN_CHECKED[0] = True
    if _omp_spin_unbounded():
        from .._logging import get_logger, warn_once

        warn_once(get_logger(__name__), "omp-spin",
                  "dashkv: batch rows run on %d threads, but torch's OpenMP workers spin for milliseconds after "
                  "each op and hold those cores; set GOMP_SPINCOUNT=10000 before torch is imported (the dashkv "
                  "command does) for the measured ~1.2x faster batch decode step", row_threads())


_SPIN_CHECKED = [False]
# Below these many (row, KV head, position) codes per call a split costs more than it saves: the hand-off
# to a worker is ~0.1 ms, and 3 KV heads split 2 + 1 (measured, 2 threads, GOMP_SPINCOUNT=10000, after
# a matmul: rows 4 x 3 x 8192 1.42 -> 1.21 ms, 4 x 3 x 4096 0.67 -> 0.74; heads 3 x 32768 1.55 -> 1.63,
# 3 x 65536 5.42 -> 4.13, 8 x 8192 2.30 -> 2.07, 8 x 65536 23.2 -> 11.9).
_SPLIT_MIN_CODES_ROWS = 1 << 16
_SPLIT_MIN_CODES_HEADS = 1 << 17


def _row_pool(workers: int):
    with _ROW_POOL_LOCK:
        if _ROW_POOL[1] < workers:
            # the old pool is dropped, not shut down: another thread may be submitting to it right now;
            # its idle workers exit once it is garbage-collected
            _ROW_POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="dashkv-rows"), workers]
        return _ROW_POOL[0]


def _run_rows(kernel, args, out: np.ndarray, counts: int = 0) -> np.ndarray | None:
    """One kernel call on this thread's workspace, grown and repeated if it was too small; returns a copy
    of the first `counts` entries of its counts (ws64: tokens read, then 8-bit-tier rows, per head)."""
    ws = _workspace()
    res = kernel(*args, ws[0], ws[1], ws[2], ws[3], out)
    if res[0] != 0:
        _grow(ws, res[1:5])
        res = kernel(*args, ws[0], ws[1], ws[2], ws[3], out)
    return ws[3][:counts].copy() if counts else None


def _grow(ws: list, sizes) -> None:
    for i, (dtype, n) in enumerate(zip((np.uint16, np.int32, np.float32, np.int64), sizes)):
        if ws[i].size < n:
            ws[i] = np.empty(int(n * 1.25) + 64, dtype)


_AS_NUMPY = {torch.float32: None, torch.bfloat16: torch.uint16, torch.float16: torch.int16}
_NO_K8 = np.zeros((1, 1), np.int8)  # placeholders when the re-rank stage is off (one compiled variant)
_NO_K8S = np.zeros(1, np.float32)
_NO_TEMPS = np.zeros(0, np.float64)
_NO_PROB = np.zeros(0, np.float32)
_NO_QP = np.zeros((0, 0, 0), np.float32)  # q_proj when the query encoder is folded into the call
_NO_QW = np.zeros((0, 0, 0), np.float32)  # no folded query encoder
_NO_QB = np.zeros((0, 0), np.float32)
_CHECKED_TEMPS: dict = {}  # id -> read-only prob_temps array already found finite (the policy's, per layer)
_NO_PQM = np.zeros((0, 0, 0), np.float32)  # no PQ codes
_NO_PQB = np.zeros((0, 0, 0, 0), np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view; bfloat16/float16 storage is viewed as uint16/int16 (see `_f32`)."""
    view = _AS_NUMPY.get(t.dtype)
    return (t if view is None else t.view(view)).numpy()


def _flat(t: torch.Tensor):
    """A 4-D (B, H, N, D) tensor whose (N, D) blocks are contiguous -> (flat 1-D numpy view, sB, sH, base).

    Element (b, h, n, i) is flat[base + b*sB + h*sH + n*D + i]. Zero-copy for contiguous tensors and for
    views [:, :, :N] of a larger contiguous buffer (the cache's layout: the buffer itself is viewed, so
    no per-call as_strided); anything else is copied once.
    """
    B, H, N, D = t.shape
    sb, sh, sn, sd = t.stride()
    sb = 0 if B == 1 else sb
    sh = 0 if H == 1 else sh
    if (sd != 1 and D > 1) or (sn != D and N > 1) or sb % D or sh % D or sb < 0 or sh < 0:
        t = t.contiguous()
        sb, sh = (0 if B == 1 else t.stride(0)), (0 if H == 1 else t.stride(1))
    if t.is_contiguous():
        return _np(t.detach().reshape(-1)), sb, sh, 0
    base = t._base
    if base is not None and base.is_contiguous() and base.dtype == t.dtype:
        off = t.storage_offset() - base.storage_offset()
        if off >= 0 and off % D == 0:
            return _np(base.detach().reshape(-1)), sb, sh, off
    size = (B - 1) * sb + (H - 1) * sh + N * D
    flat = torch.as_strided(t.detach(), (size,), (1,), t.storage_offset())
    return _np(flat), sb, sh, 0


def _rows(t: torch.Tensor):
    """K or V (B, H, N, d) -> ((rows, d) numpy view of its storage, row strides sB, sH, base row)."""
    flat, sb, sh, off = _flat(t)
    d = t.shape[-1]
    return flat.reshape(-1, d), sb // d, sh // d, off // d


def _start_array(start, B: int) -> np.ndarray:
    if start is None:
        return _zeros_i64(B)
    return start.detach().to(torch.int64).contiguous().numpy()


def _zeros_i64(B: int) -> np.ndarray:
    z = getattr(_tls, "zeros", None)
    if z is None or z.size < B:
        z = _tls.zeros = np.zeros(max(B, 8), np.int64)
    return z[:B]




def _check(query, keys, values, codes=None) -> None:
    if keys.dtype not in CPU_KV_DTYPES or values.dtype != keys.dtype or not query.is_floating_point():
        raise TypeError("dashkv CPU kernels take float32, bfloat16 or float16 keys/values of one dtype and a "
                        f"floating-point query (got {query.dtype}, {keys.dtype}, {values.dtype})")
    if keys.device.type != "cpu":
        raise ValueError("dashkv CPU kernels take CPU tensors")
    if codes is not None and codes.dtype != torch.int64:
        raise TypeError(f"packed key codes must be int64 words, got {codes.dtype}")


def _describe(a) -> str:
    """An argument's kind, dtype, shape and layout, for error messages."""
    if isinstance(a, np.ndarray):
        return f"{a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' (not C-contiguous)'}"
    return type(a).__name__ + (f" {tuple(a.shape)}" if hasattr(a, "shape") else "")


def _query_f32(query: torch.Tensor) -> np.ndarray:
    q = query.detach()
    if q.dtype != torch.float32:
        q = q.float()
    return (q if q.is_contiguous() else q.contiguous()).numpy()


def dashkv_decode_cpu(query: torch.Tensor, q_proj: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      codes: torch.Tensor, *, sink: int, window: int, critical: int, scaling: float,
                      grouping: str = "kv_head", scorer: str = "asymmetric",
                      start: torch.Tensor | None = None, return_indices: bool = False,
                      return_counts: bool = False, parallel: bool = False, keys8=None, keep: int = 0,
                      pool_temps=None, k_min: int = 0, pool_cap: int = 4, views: "BufferViews | None" = None,
                      query_bits: int | None = None, lowprec: int = 0, values8=None,
                      return_lowprec_counts: bool = False, prob_temps=None, query_encoder=None,
                      pq=None, _mode: int = 0):
    """One DASH-KV decode step of one layer on the CPU (fused numba kernel).

    query (B, Hq, d) any float dtype; q_proj (B, Hq, b) float32 (the query encoder's real-valued
    projection), or None with `query_encoder` = (weight (Hq, d, b), bias (Hq, b)) float32 numpy arrays of
    a linear query encoder, which the kernel then applies itself (what the cache's decode step does:
    `DashKVPolicy.fused_query_encoder`); keys, values (B, Hkv, N, d) float32, bfloat16 or float16 (accumulation is float32)
    and codes (B, Hkv, N, b/64) int64 -- each may be a view
    [:, :, :N] of a larger preallocated buffer (each head's (N, d) block must be contiguous; other
    layouts are copied). start (B,) int64: left padding per batch row (None = 0). `views`: the cache
    layer's `BufferViews` of the buffers keys/values/codes are [:, :, :N] views of (used when they match).

    Returns out (B, Hq, d) float32, then (if asked) indices (B, Hs, L) int64 -- the positions read per
    selecting head (Hs = Hkv for grouping="kv_head", Hq for "query_head"), ascending, padded with -1 --
    and counts (B, Hs) int64, the number of positions read.

    Re-rank stage: with `keep` > 0 and keys8 = (int8 keys (B, Hkv, N, d), float32 scales (B, Hkv, N, 1))
    (`QuantizedRows`; or packed 4-bit keys (B, Hkv, N, d/2), `QuantizedRows.quantize(k, 4)`), the scan picks `critical` candidates and the `keep` most probable of them under
    the int8 keys are attended (see `DashKVPolicy.rerank_scores`, the reference).

    Pooled per-head budgets: `pool_temps` (Hs,) float -- the temperature turning each selecting head's
    score into an estimated log-probability -- shares B x Hs x `critical` exact tokens between the heads
    of each row (at least `k_min`, at most `pool_cap` x critical each; `dashkv.selection.pooled_counts`
    is the reference). Not combined with the re-rank stage.

    Low-precision tier: with `lowprec` > 0, keys8 and values8 = (int8 values, float32 scales) in keys8's
    layout, the scan selects critical + lowprec candidates; the `critical` best are attended exactly and
    the others from the int8 copies (`build_selection` with `plan.lowprec` and `sparse_decode_attention`
    are the reference). Not combined with the re-rank stage, pooled budgets or `query_bits`.
    `return_lowprec_counts` appends (B, Hs) int64: the rows of each head read from the 8-bit copies.

    Probability group score: `prob_temps` (Hq,) -- each query head's temperature (calibrated logit scale
    / b) -- ranks each KV head's candidates by the summed estimated probabilities of its query heads
    (integer query levels, three heads per packed table look-up; `DashKVPolicy.probability_scores` is the
    reference). kv_head grouping and the asymmetric scorer; combines with the re-rank stage, the 8-bit
    tier and pooled budgets (`pool_temps` then only says "pooled", its values unused: the p of a row's
    heads share one bucket map and are pooled bucket by bucket, `DashKVPolicy.pooled_probability_selection`
    is the reference), not with `query_bits`.

    PQ codes (`dashkv.pq`): q_proj None and `pq` = (query maps, transposed (Hkv, d_in, d_out), centroids (Hkv, P, s, 256))
    float32 C-contiguous numpy arrays (`HashEncoders.pq_arrays`), with `prob_temps`: each code byte is a
    centroid index and each query head's tables are built here from the query itself
    (`pq_probability_logits` is the reference).

    `query_bits` 4 or 8: the bit-plane scan of the integer query levels (`DashKVConfig.query_bits`;
    asymmetric scorer, not with pooled budgets); None: float32 byte tables.

    `parallel=False` (what decoding uses, at every batch size) runs the serial kernel: on the calling
    thread, or, above a measured size, with the batch rows (one row: its KV heads) cut into
    `row_threads()` contiguous parts, one on the calling thread and the others on a small pool of Python
    threads shared by the process (the kernel releases the GIL); nothing to fight torch's OpenMP threads
    for, safe from several Python threads at once (docs/kernels.md "Batch rows on threads"). `parallel=True` splits the step
    over numba's threads (launches serialised by a lock): the stand-alone kernel benchmark's schedule.
    """
    _check(query, keys, values, codes)
    B, Hq, d = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    W = codes.shape[-1]
    if grouping not in ("kv_head", "query_head"):
        raise ValueError(f"grouping must be 'kv_head' or 'query_head', got {grouping!r}")
    if scorer not in ("asymmetric", "hamming"):
        raise ValueError(f"scorer must be 'asymmetric' or 'hamming', got {scorer!r}")
    pq_qmap, pq_books = _NO_PQM, _NO_PQB
    if pq is not None:
        pq_qmap, pq_books = pq
        P = 8 * W
        if q_proj is not None or query_encoder is not None or prob_temps is None:
            raise ValueError("PQ codes (pq=...) take no q_proj or query_encoder, and need prob_temps: they are "
                             "ranked by the probability group score")
        if (not isinstance(pq_qmap, np.ndarray) or not isinstance(pq_books, np.ndarray)
                or pq_qmap.dtype != np.float32 or pq_books.dtype != np.float32
                or pq_qmap.shape != (Hkv, d, d) or pq_books.ndim != 4 or pq_books.shape[0] != Hkv
                or pq_books.shape[1] != P or pq_books.shape[1] * pq_books.shape[2] != d or pq_books.shape[3] != 256
                or not (pq_qmap.flags.c_contiguous and pq_books.flags.c_contiguous)):
            raise ValueError(f"pq must be C-contiguous float32 numpy arrays of shapes {(Hkv, d, d)} and "
                             f"{(Hkv, P, d // P if P else 0, 256)}, got {_describe(pq_qmap)} and {_describe(pq_books)}")
        qenc_w, qenc_b = _NO_QW, _NO_QB
        proj_width = 64 * W
    elif q_proj is None:
        if query_encoder is None:
            raise ValueError("dashkv_decode_cpu needs q_proj or a query_encoder (weight, bias)")
        qenc_w, qenc_b = query_encoder
        if (not isinstance(qenc_w, np.ndarray) or not isinstance(qenc_b, np.ndarray)
                or qenc_w.dtype != np.float32 or qenc_b.dtype != np.float32
                or qenc_w.shape != (Hq, d, 64 * W) or qenc_b.shape != (Hq, 64 * W)
                or not (qenc_w.flags.c_contiguous and qenc_b.flags.c_contiguous)):
            raise ValueError(f"query_encoder must be C-contiguous float32 numpy arrays of shapes {(Hq, d, 64 * W)} "
                             f"and {(Hq, 64 * W)}, got {_describe(qenc_w)} and {_describe(qenc_b)}")
        proj_width = 64 * W
    else:
        if query_encoder is not None:
            raise ValueError("give q_proj or query_encoder, not both")
        qenc_w, qenc_b = _NO_QW, _NO_QB
        proj_width = q_proj.shape[-1]
    if Hq % Hkv or proj_width != 64 * W or codes.shape[2] != N:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, q_proj width {proj_width}, "
                         f"keys {tuple(keys.shape)}, codes {tuple(codes.shape)}")
    if min(sink, window, critical, keep) < 0:
        raise ValueError("sink, window, critical and keep must be >= 0")
    if keep > 0 and (keys8 is None or keep > critical):
        raise ValueError("the re-rank stage (keep > 0) needs keys8 and keep <= critical")
    qbits = int(query_bits or 0)
    if qbits and (qbits not in (4, 8) or scorer != "asymmetric" or pool_temps is not None):
        raise ValueError(f"query_bits must be None, 4 or 8, with the asymmetric scorer and no pooled budgets "
                         f"(got query_bits={query_bits!r}, scorer={scorer!r})")
    lowprec = int(lowprec or 0)
    if lowprec < 0 or (lowprec and (keys8 is None or values8 is None or keep > 0 or pool_temps is not None or qbits)):
        raise ValueError("the low-precision tier (lowprec > 0) needs keys8 and values8, and combines with neither "
                         "the re-rank stage, pooled budgets nor query_bits")
    hs_count = Hq if grouping == "query_head" else Hkv
    if pool_temps is not None:
        pool_temps = np.ascontiguousarray(np.asarray(pool_temps, dtype=np.float64).reshape(-1))
        if pool_temps.size != hs_count or keep > 0 or pool_cap < 1:
            raise ValueError(f"pooled budgets need one temperature per selecting head ({hs_count}), "
                             "pool_cap >= 1 and no re-rank stage")
    else:
        pool_temps = _NO_TEMPS
    if prob_temps is not None:
        if not (isinstance(prob_temps, np.ndarray) and prob_temps.dtype == np.float32 and prob_temps.ndim == 1
                and prob_temps.flags.c_contiguous):  # (the policy's arrays already are: kept as the same object)
            prob_temps = np.ascontiguousarray(np.asarray(prob_temps, dtype=np.float32).reshape(-1))
        if prob_temps.size != Hq or grouping != "kv_head" or scorer != "asymmetric" or qbits:
            raise ValueError(f"the probability group score needs one temperature per query head ({Hq}), "
                             "grouping='kv_head', the asymmetric scorer, and no query_bits "
                             f"(got {prob_temps.size} temperatures, grouping={grouping!r}, scorer={scorer!r})")
        if _CHECKED_TEMPS.get(id(prob_temps)) is not prob_temps or prob_temps.flags.writeable:
            if not math.isfinite(np.add.reduce(prob_temps, dtype=np.float64)):  # NaN or inf anywhere (~5x
                raise ValueError("prob_temps must be finite")                     # cheaper than isfinite().all())
            if not prob_temps.flags.writeable:  # read-only (the policy's cached arrays): checked once
                if len(_CHECKED_TEMPS) > 4096:
                    _CHECKED_TEMPS.clear()
                _CHECKED_TEMPS[id(prob_temps)] = prob_temps
    else:
        prob_temps = _NO_PROB
    per_query = grouping == "query_head"
    out = torch.empty(B, Hq, d, dtype=torch.float32)
    if N == 0:
        out.zero_()
        hs = Hq if per_query else Hkv
        extra = ([torch.empty(B, hs, 0, dtype=torch.int64)] if return_indices else []) + (
            [torch.zeros(B, hs, dtype=torch.int64)] if return_counts else []) + (
            [torch.zeros(B, hs, dtype=torch.int64)] if return_lowprec_counts else [])
        return (out, *extra) if extra else out
    if views is not None and not views.matches(keys, values, codes):
        views = None
    if views is not None:
        kf, ksb, ksh, kb0 = views.k
        vf, vsb, vsh, vb0 = views.v
        cfu, csb, csh, cb0 = views.codes
    else:
        kf, ksb, ksh, kb0 = _rows(keys)
        vf, vsb, vsh, vb0 = _rows(values)
        cft, csb, csh, cb0 = _flat(codes)
        cfu = cft.view(np.uint64)
    q = _query_f32(query)
    qp = _query_f32(q_proj) if q_proj is not None else _NO_QP
    st = _start_array(start, B)
    ws = _workspace()
    kernel, nthreads = (_dashkv_kernel, numba.get_num_threads()) if parallel else (_dashkv_kernel_serial, 1)
    v8f, v8s = _NO_K8, _NO_K8S
    if keep > 0 or lowprec > 0:
        width = keys8[0].shape[-1]
        if width not in (d, d // 2) or (width != d and (d % 2 or lowprec > 0)):
            raise ValueError(f"keys8: rows of {width} bytes for head dim {d}: int8 keys have d, packed 4-bit "
                             "keys d/2 (the re-rank stage only; the 8-bit tier reads int8 keys)")
        (k8f, k8sb, k8sh, k8b0), (k8s, ssb, ssh, sb0) = _int8_rows(views, "k8" if width == d else "k4", keys8)
        if (ssb, ssh, sb0) != (k8sb, k8sh, k8b0) or keys8[0].shape[:3] != keys.shape[:3]:
            raise ValueError("keys8: the int8 keys and their scales must share the cache's layout")
        k8s = k8s.reshape(-1)
        if lowprec > 0:
            (v8f, vsb8, vsh8, vb08), (v8s, vssb, vssh, vsb0) = _int8_rows(views, "v8", values8)
            if (vsb8, vsh8, vb08) != (k8sb, k8sh, k8b0) or (vssb, vssh, vsb0) != (k8sb, k8sh, k8b0) \
                    or values8[0].shape[:3] != keys.shape[:3]:
                raise ValueError("values8: the int8 values and their scales must share keys8's layout")
            v8s = v8s.reshape(-1)
    else:
        k8f, k8s, k8sb, k8sh, k8b0 = _NO_K8, _NO_K8S, 0, 0, 0
    args = (q, qp, float(scaling), kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, cfu, cb0, csb, csh, N, W, st,
            int(sink), int(window), int(critical), Hkv, per_query, scorer == "hamming", nthreads, _mode,
            k8f, k8s, k8b0, k8sb, k8sh, int(keep), pool_temps, int(k_min), int(pool_cap), qbits, lowprec,
            v8f, v8s, prob_temps, probability_level_bits(W) if prob_temps.size else 1, qenc_w, qenc_b,
            pq_qmap, pq_books)
    extras = return_indices or return_counts or return_lowprec_counts
    # independent work on the row pool: contiguous slices of the batch rows, or of one row's KV heads
    # (not with pooled budgets, which share a row's exact tier between its heads)
    by_heads = B == 1 and pool_temps.size == 0
    units = Hkv if by_heads else B
    small = B * Hkv * N < (_SPLIT_MIN_CODES_HEADS if by_heads else _SPLIT_MIN_CODES_ROWS)
    parts = 1 if parallel or return_indices or _mode or small else min(units, row_threads())
    if parts > 1:
        if qenc_w.shape[0] > 0:  # project once here: the parts take slices of the projection
            qp = np.empty((B, Hq, 64 * W), np.float32)
            _linear_heads(q.reshape(B, Hq, 1, d), qenc_w, qenc_b, qp.reshape(B, Hq, 1, 64 * W))
            args = (args[0], qp) + args[2:-4] + (_NO_QW, _NO_QB) + args[-2:]
        bounds = [units * i // parts for i in range(parts + 1)]
        outn = out.numpy()
        G = Hq // Hkv
        hs1 = G if per_query else 1  # selecting heads per KV head

        def piece(u0: int, u1: int) -> tuple:
            a = list(args)
            if by_heads:
                a[0], a[1] = q[:, u0 * G:u1 * G], qp[:, u0 * G:u1 * G]
                a[4], a[8], a[12] = kb0 + u0 * ksh, vb0 + u0 * vsh, cb0 + u0 * csh
                a[21] = u1 - u0
                if keep > 0 or lowprec > 0:
                    a[28] = k8b0 + u0 * k8sh
                if prob_temps.size:
                    a[39] = prob_temps[u0 * G:u1 * G]
                if pq_books.size:
                    a[43], a[44] = pq_qmap[u0:u1], pq_books[u0:u1]
                return tuple(a), outn[:, u0 * G:u1 * G], (u1 - u0) * hs1
            a[0], a[1], a[17] = q[u0:u1], qp[u0:u1], st[u0:u1]
            a[4], a[8], a[12] = kb0 + u0 * ksb, vb0 + u0 * vsb, cb0 + u0 * csb
            if keep > 0 or lowprec > 0:
                a[28] = k8b0 + u0 * k8sb
            return tuple(a), outn[u0:u1], (u1 - u0) * Hkv * hs1
        nc = (2 if return_lowprec_counts else 1) if extras else 0  # count arrays to copy out per part
        pool = _row_pool(parts - 1)
        _warn_spin_once()
        futures = []
        for i in range(1, parts):
            a, o, n_heads = piece(bounds[i], bounds[i + 1])
            futures.append(pool.submit(_run_rows, kernel, a, o, nc * n_heads))
        a, o, n_heads = piece(0, bounds[1])
        try:
            got = [_run_rows(kernel, a, o, nc * n_heads)]
        finally:  # never return (or raise) while a worker still writes into `out`
            wait(futures)
        got += [f.result() for f in futures]  # a worker's exception is raised here
        if not extras:
            return out
        # each part's counts: (nc, its rows, its selecting heads); concatenated along rows or heads
        shaped = [torch.from_numpy(c).reshape(nc, 1, -1) if by_heads else torch.from_numpy(c).reshape(nc, -1, Hkv * hs1)
                  for c in got]
        axis = 1 if by_heads else 0
        extra = [torch.cat([c[0] for c in shaped], axis)] if return_counts else []
        if return_lowprec_counts:
            extra.append(torch.cat([c[1] for c in shaped], axis))
        return (out, *extra)
    with _PARALLEL_LOCK if parallel else _NO_LOCK:
        res = kernel(*args, ws[0], ws[1], ws[2], ws[3], out.numpy())
        if res[0] != 0:
            _grow(ws, res[1:5])
            res = kernel(*args, ws[0], ws[1], ws[2], ws[3], out.numpy())
    if not extras:
        return out
    hs = Hq if per_query else Hkv
    lens = torch.from_numpy(ws[3][:B * hs].copy()).reshape(B, hs)
    extra = []
    if return_indices:
        lmax = res[6]
        raw = torch.from_numpy(ws[1][res[5]:res[5] + B * hs * lmax].astype(np.int64)).reshape(B, hs, lmax)
        slot = torch.arange(lmax)
        raw = torch.where(slot < lens[..., None], raw, torch.full_like(raw, torch.iinfo(torch.int64).max))
        raw = raw.sort(-1).values
        extra.append(raw.masked_fill(slot >= lens[..., None], -1)[..., :max(1, int(lens.max()))])
    if return_counts:
        extra.append(lens)
    if return_lowprec_counts:
        extra.append(torch.from_numpy(ws[3][B * hs:2 * B * hs].copy()).reshape(B, hs))
    return (out, *extra)


def dense_decode_cpu(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                     start: torch.Tensor | None = None, parallel: bool = True) -> torch.Tensor:
    """Dense GQA decode attention (B, Hq, d) float32 over (B, Hkv, N, d) keys/values (float32, bfloat16
    or float16); all cores unless `parallel=False`.

    The numba split-K kernel: each (batch row, KV head, chunk of positions) reads its K and V rows once
    for all G query heads, keeps a partial softmax, and the parts are merged (flash-decoding). Positions
    < start[b] are masked out.
    """
    _check(query, keys, values)
    B, Hq, d = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    out = torch.empty(B, Hq, d, dtype=torch.float32)
    if N == 0:
        return out.zero_()
    kf, ksb, ksh, kb0 = _rows(keys)
    vf, vsb, vsh, vb0 = _rows(values)
    q = _query_f32(query)
    st = _start_array(start, B)
    ws = _workspace()
    kernel, nthreads = (_dense_kernel, numba.get_num_threads()) if parallel else (_dense_kernel_serial, 1)
    args = (q, float(scaling), kf, kb0, ksb, ksh, vf, vb0, vsb, vsh, N, st, Hkv, nthreads)
    with _PARALLEL_LOCK if parallel else _NO_LOCK:
        need = kernel(*args, ws[2], out.numpy())
        if need != 0:
            _grow(ws, (0, 0, need, 0))
            kernel(*args, ws[2], out.numpy())
    return out


def dense_decode_torch(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                       start: torch.Tensor | None = None) -> torch.Tensor:
    """Dense GQA decode attention as plain torch matmul + softmax (no K/V repeat): (B, Hq, d) float32.
    Any device (the decode path's dense steps use it on CUDA too)."""
    B, Hq, d = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    q = query.reshape(B, Hkv, Hq // Hkv, d).to(keys.dtype)  # bf16 K/V: bf16 matmuls (AMX on this CPU)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # (B, Hkv, G, N)
    if start is not None:  # left padding (no host sync: the mask is built on the keys' device)
        mask = torch.arange(N, device=keys.device)[None, :] < start.to(keys.device)[:, None]
        logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs.to(values.dtype), values).float().reshape(B, Hq, d)


def warmup(dtypes=(torch.float32,), parallel: bool = False, verbose: bool = False) -> float:
    """Compile (or load from numba's on-disk cache) the kernels for K/V of these dtypes.

    Specialisations differ only by the K/V element type (the rest are run-time arguments). Returns the
    seconds it took: the first call in a fresh environment compiles (tens of seconds), later processes
    load the cache (about a second).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, generator=g)
    qp = torch.randn(1, 2, 64, generator=g)
    c = torch.randint(-2**62, 2**62, (1, 1, 40, 1), generator=g)
    for dtype in dtypes:  # one call per compiled variant: grouping, scorer and code words are run-time values
        k = torch.randn(1, 1, 40, 8, generator=g).to(dtype)
        for par in ((False, True) if parallel else (False,)):
            dashkv_decode_cpu(q, qp, k, k, c, sink=2, window=4, critical=8, scaling=0.3, parallel=par)
            dense_decode_cpu(q, k, k, 0.3, parallel=par)
        encode_linear_cpu(k[:, :, :2], np.ones((1, 8, 64), np.float32), np.zeros((1, 64), np.float32))
        linear_heads_cpu(q[:, :, None].to(dtype), np.ones((2, 8, 64), np.float32), np.zeros((2, 64), np.float32))
    dt = time.perf_counter() - t0
    if verbose:
        print(f"dashkv.kernels.cpu: kernels ready in {dt:.2f} s")
    return dt
