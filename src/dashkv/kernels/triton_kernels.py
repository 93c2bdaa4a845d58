"""Triton (GPU) decode step of DASH-KV for one layer: code scan, on-device top-k, sparse attention.

`dashkv_decode_triton` has the signature and the semantics of `dashkv.kernels.cpu.dashkv_decode_cpu`:

1. **scan** (`_scan_kernel`): every position's b-bit key code (b/64 int64 words, any strides, so a view
   `[:, :, :N]` of a preallocated `(B, Hkv, cap, W)` buffer is read in place) is scored against each
   selecting head's query projection:
   - asymmetric `<q_proj, c_k>`, c_k in {-1,+1}^b. Default implementation ("unpack"): each 64-bit word
     is split into two 32-bit halves and its bits are unpacked in registers against the 32 projection
     values of that half held in registers: `sum_t where(bit_t, q_t, -q_t)`. No memory traffic besides
     the code words, no shared-memory gathers, no bank conflicts; ~3-4 ALU ops per bit. The CPU's
     byte look-up tables (b/8 loads per key) are also implemented ("lut": tables of 256 floats per
     code byte built once per step by torch, read through L1-cached gathers); `scripts/gpu_check.py`
     times both, the default is to be confirmed on a GPU.
   - Hamming `b - 2*popcount(sign(q_proj) XOR c_k)`: xor of int64 words and a SWAR popcount (portable:
     it also runs in Triton's interpreter; ~12 integer ops per word).
   `grouping="kv_head"` scores against the sum of the G query heads' projections (asymmetric: the
   summed projection, linear; Hamming: the sum of the G Hamming similarities), `"query_head"` keeps one
   row per query head. Non-candidates (left padding before `start`, the sinks, the window) score -inf.
   For the selection itself the kernel writes int64 *keys* instead of float scores: the order-preserving
   integer image of the float32 score in the high 32 bits and `2^32-1-position` in the low 32 bits, so
   `torch.topk` on device returns exactly the top-`critical` candidates with ties going to the lower
   position -- the CPU kernel's deterministic rule -- whatever the top-k algorithm does with ties.
2. **select**: `torch.topk(keys, critical)` on device, then sinks ∪ top-k ∪ window as a fixed-size
   `(B, Hs, K)` int32 index list, K = min(sink + window + critical, N); rows whose budget covers all
   their valid tokens (`sink + window + critical >= N - start[b]`) take all their valid positions
   instead (dense). Unused slots are -1. No host synchronisation and only shapes that depend on
   (B, Hq, N, sink, window, critical): the step can be captured in a CUDA graph.
3. **attend** (`_attn_kernel` + `_merge_kernel`): flash-decoding. Each program takes one (batch row,
   selecting head) and a contiguous block of its K slots, gathers the K and V rows by index (each row
   read once for all query heads that share it: the G heads of a KV head under "kv_head"), runs an
   online softmax in float32 (exp2, the log2(e) folded into the query scale) and writes its partial
   (max, sum, weighted V). A second small kernel merges the parts. With one part per row the first
   kernel normalises and writes the output directly.

Bytes per step and selecting head: N*b/8 code bytes + K*2*d*sizeof(dtype) K/V bytes, against 2*N*d*sizeof
for dense attention.

Everything also runs under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is
imported) on CPU tensors, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: the module imports without it, `triton_available()` then says False
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = ["triton_available", "interpreting", "dashkv_decode_triton", "dashkv_scan_triton",
           "select_indices_triton", "sparse_decode_triton", "scores_from_keys", "warmup"]

_LOG2E = 1.4426950408889634
_ASYM_IMPLS = ("unpack", "lut")


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter.

    Triton decides at decoration time, i.e. when this module is imported: TRITON_INTERPRET=1 must be
    set before that (`importlib.reload` the module after changing it).
    """
    if triton is None:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return type(_scan_kernel).__name__ == "InterpretedFunction"


def triton_available() -> bool:
    """Triton imports and can run here: a CUDA device is present, or TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return interpreting() or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    # Reductions through tl.reduce with triton's own combine functions (what tl.sum / tl.max compile
    # to for float32) rather than tl.sum / tl.max / tl.zeros themselves: those are @jit functions of
    # triton.language, decorated once when triton is first imported, so they break the interpreter
    # if anything imported triton before TRITON_INTERPRET=1 was set. Only this module must be
    # (re)imported after setting it; the interpreter still takes its numpy fast path for these.
    @triton.jit
    def _tl_sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @triton.jit
    def _tl_max(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    @triton.jit
    def _popcount64(x):
        """SWAR popcount of int64 words (wrapping arithmetic; arithmetic shifts are masked off)."""
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        return (x * 0x0101010101010101) >> 56

    @triton.jit
    def _scan_kernel(q_ptr, codes_ptr, c_sb, c_sh, c_sn, c_sw, start_ptr, out_ptr,
                     N, sink, window, NBLK,
                     HKV: tl.constexpr, NS: tl.constexpr, GQ: tl.constexpr, W: tl.constexpr,
                     HAMMING: tl.constexpr, LUT: tl.constexpr, OUT_KEYS: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """Scores of BLOCK_N positions for one selecting head.

        q_ptr: Hamming -> (B, Hs, GQ, W) int64 sign words; asymmetric unpack -> (B, Hs, 64W) float32
        projections (already summed over a KV head's query heads); asymmetric LUT -> (B, Hs, 8W, 256)
        float32 byte tables. out: (B, Hs, N) float32 scores (-inf off candidates) or int64 keys.
        """
        pid = tl.program_id(0)
        ns = pid % NS
        blk = pid // NS
        bk = tl.program_id(1)
        b = bk // HKV
        kvh = bk % HKV
        hs = HKV * NS
        srow = b * hs + kvh * NS + ns  # flat (batch, selecting head)
        pos = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        s0 = tl.load(start_ptr + b)
        cand = (pos >= s0 + sink) & (pos < N - window)
        cbase = codes_ptr + b.to(tl.int64) * c_sb + kvh.to(tl.int64) * c_sh + pos.to(tl.int64) * c_sn
        if HAMMING:
            pc = tl.full([BLOCK_N], 0, tl.int64)
            for w in tl.static_range(W):
                cw = tl.load(cbase + w * c_sw, mask=cand, other=0)
                for g in tl.static_range(GQ):
                    qw = tl.load(q_ptr + (srow * GQ + g) * W + w)
                    pc += _popcount64(cw ^ qw)
            score = (GQ * W * 64 - 2 * pc).to(tl.float32)
        else:
            score = tl.full([BLOCK_N], 0, tl.float32)
            for w in tl.static_range(W):
                cw = tl.load(cbase + w * c_sw, mask=cand, other=0)
                if LUT:
                    lut_row = q_ptr + (srow * (8 * W) + 8 * w) * 256
                    for t in tl.static_range(8):
                        byte = ((cw >> (8 * t)) & 255).to(tl.int32)
                        score += tl.load(lut_row + t * 256 + byte, mask=cand, other=0.0)
                else:
                    sh = tl.arange(0, 32)
                    qrow = q_ptr + srow * (64 * W) + 64 * w
                    q_lo = tl.load(qrow + sh)
                    q_hi = tl.load(qrow + 32 + sh)
                    lo = cw.to(tl.int32)
                    hi = (cw >> 32).to(tl.int32)
                    b_lo = ((lo[:, None] >> sh[None, :]) & 1) != 0
                    b_hi = ((hi[:, None] >> sh[None, :]) & 1) != 0
                    score += _tl_sum(tl.where(b_lo, q_lo[None, :], -q_lo[None, :]), axis=1)
                    score += _tl_sum(tl.where(b_hi, q_hi[None, :], -q_hi[None, :]), axis=1)
        optr = out_ptr + srow.to(tl.int64) * N + pos
        inb = pos < N
        if OUT_KEYS:
            score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 are the same score
            bits = score.to(tl.int32, bitcast=True)
            bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone float32 -> int32
            key = (bits.to(tl.int64) << 32) + (4294967295 - pos.to(tl.int64))
            key = tl.where(cand, key, -9223372036854775808)
            tl.store(optr, key, mask=inb)
        else:
            tl.store(optr, tl.where(cand, score, float("-inf")), mask=inb)

    @triton.jit
    def _attn_kernel(q_ptr, q_sb, q_sh, q_sd,
                     k_ptr, k_sb, k_sh, k_sn, k_sd,
                     v_ptr, v_sb, v_sh, v_sn, v_sd,
                     idx_ptr, K, PER_SPLIT, NSPLIT, qscale,
                     out_ptr, pm_ptr, pl_ptr, pacc_ptr,
                     HS: tl.constexpr, NS: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                     DIRECT: tl.constexpr):
        """Partial attention of one selecting head's GQ query heads over slots [lo, hi) of its index row."""
        split = tl.program_id(0)
        srow = tl.program_id(1)  # b * HS + s
        b = srow // HS
        s = srow % HS
        kvh = s // NS
        g = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, BLOCK_D)
        gm = g < GQ
        dm = dd < D
        qh = s * GQ + g  # query heads of this selecting head
        q = tl.load(q_ptr + b.to(tl.int64) * q_sb + qh[:, None] * q_sh + dd[None, :] * q_sd,
                    mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32) * qscale
        kbase = k_ptr + b.to(tl.int64) * k_sb + kvh.to(tl.int64) * k_sh
        vbase = v_ptr + b.to(tl.int64) * v_sb + kvh.to(tl.int64) * v_sh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_G], 0, tl.float32)
        acc = tl.full([BLOCK_G, BLOCK_D], 0, tl.float32)
        lo = split * PER_SPLIT
        hi = tl.minimum(lo + PER_SPLIT, K)
        for j0 in range(lo, hi, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            r = tl.load(idx_ptr + srow.to(tl.int64) * K + j, mask=j < hi, other=-1)
            rm = r >= 0
            roff = r.to(tl.int64)
            lm = rm[:, None] & dm[None, :]
            kt = tl.load(kbase + roff[:, None] * k_sn + dd[None, :] * k_sd, mask=lm, other=0.0).to(tl.float32)
            logits = _tl_sum(q[:, None, :] * kt[None, :, :], axis=2)  # (BLOCK_G, BLOCK_K), log2 units
            logits = tl.where(rm[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, _tl_max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(logits - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + _tl_sum(p, axis=1)
            vt = tl.load(vbase + roff[:, None] * v_sn + dd[None, :] * v_sd, mask=lm, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + _tl_sum(p[:, :, None] * vt[None, :, :], axis=1)
            m_i = m_new
        if DIRECT:
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            optr = out_ptr + (b * (HS * GQ) + qh)[:, None] * D + dd[None, :]
            tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
        else:
            prow = (srow * NSPLIT + split) * BLOCK_G + g
            tl.store(pm_ptr + prow, m_i)
            tl.store(pl_ptr + prow, l_i)
            tl.store(pacc_ptr + prow[:, None] * BLOCK_D + dd[None, :], acc)

    @triton.jit
    def _merge_kernel(pm_ptr, pl_ptr, pacc_ptr, out_ptr, NSPLIT,
                      GQ: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        """Merge the NSPLIT partial softmaxes of one query head (log-sum-exp weights)."""
        srow = tl.program_id(0)
        g = tl.program_id(1)
        dd = tl.arange(0, BLOCK_D)
        sp0 = tl.arange(0, BLOCK_S)
        mx = _tl_max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
        for c in range(0, NSPLIT, BLOCK_S):
            sp = c + sp0
            m = tl.load(pm_ptr + (srow * NSPLIT + sp) * BLOCK_G + g, mask=sp < NSPLIT, other=float("-inf"))
            mx = tl.maximum(mx, _tl_max(m, axis=0))
        m_safe = tl.where(mx == float("-inf"), 0.0, mx)
        den = _tl_sum(tl.full([BLOCK_S], 0, tl.float32), axis=0)
        num = tl.full([BLOCK_D], 0, tl.float32)
        for c in range(0, NSPLIT, BLOCK_S):
            sp = c + sp0
            sm = sp < NSPLIT
            prow = (srow * NSPLIT + sp) * BLOCK_G + g
            m = tl.load(pm_ptr + prow, mask=sm, other=float("-inf"))
            wgt = tl.exp2(m - m_safe)
            den += _tl_sum(wgt * tl.load(pl_ptr + prow, mask=sm, other=0.0), axis=0)
            a = tl.load(pacc_ptr + prow[:, None] * BLOCK_D + dd[None, :], mask=sm[:, None], other=0.0)
            num += _tl_sum(wgt[:, None] * a, axis=0)
        o = num / tl.where(den > 0.0, den, 1.0)
        tl.store(out_ptr + (srow * GQ + g) * D + dd, o.to(out_ptr.dtype.element_ty), mask=dd < D)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _require() -> None:
    if triton is None:
        raise RuntimeError("dashkv's Triton kernels need `triton` (pip install 'dashkv[gpu]')")


def _check_device(*tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError("dashkv Triton kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)")
    return dev


def _start_tensor(start: torch.Tensor | None, B: int, N: int, device) -> torch.Tensor:
    if start is None:
        return torch.zeros(B, dtype=torch.int64, device=device)
    return start.to(device=device, dtype=torch.int64).clamp(0, N)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _scan_operand(q_proj: torch.Tensor, Hkv: int, per_query: bool, scorer: str, impl: str) -> torch.Tensor:
    """What the scan kernel reads per selecting head (see `_scan_kernel`)."""
    B, Hq, bits = q_proj.shape
    G = Hq // Hkv
    if scorer == "hamming":
        from ..codes import pack_bits

        return pack_bits(q_proj > 0).contiguous()  # (B, Hq, W) == (B, Hs, GQ, W)
    qp = q_proj.float()
    if not per_query:  # summed over the KV head's query heads, in head order (like the CPU kernel)
        qp = qp.reshape(B, Hkv, G, bits)
        acc = qp[:, :, 0]
        for g in range(1, G):
            acc = acc + qp[:, :, g]
        qp = acc
    qp = qp.contiguous()
    if impl == "lut":
        from ..codes import byte_tables

        return byte_tables(qp).contiguous()  # (B, Hs, b/8, 256)
    return qp


def dashkv_scan_triton(q_proj: torch.Tensor, codes: torch.Tensor, *, sink: int = 0, window: int = 0,
                       grouping: str = "kv_head", scorer: str = "asymmetric", start: torch.Tensor | None = None,
                       keys: bool = False, _asym_impl: str = "unpack", _block_n: int | None = None) -> torch.Tensor:
    """Scan of packed key codes (B, Hkv, N, W) int64 (any strides) against q_proj (B, Hq, 64W).

    Returns (B, Hs, N): float32 scores, -inf off the candidates [start+sink, N-window); or, with
    keys=True, int64 keys ordered like (score, -position) (INT64_MIN off the candidates) for a
    tie-exact on-device top-k (`scores_from_keys` recovers the scores).
    """
    _require()
    if grouping not in ("kv_head", "query_head"):
        raise ValueError(f"grouping must be 'kv_head' or 'query_head', got {grouping!r}")
    if scorer not in ("asymmetric", "hamming"):
        raise ValueError(f"scorer must be 'asymmetric' or 'hamming', got {scorer!r}")
    if _asym_impl not in _ASYM_IMPLS:
        raise ValueError(f"asymmetric scan implementation must be one of {_ASYM_IMPLS}, got {_asym_impl!r}")
    if codes.dtype != torch.int64:
        raise TypeError(f"packed key codes must be int64 words, got {codes.dtype}")
    B, Hkv, N, W = codes.shape
    Hq = q_proj.shape[1]
    if q_proj.shape[0] != B or Hq % Hkv or q_proj.shape[-1] != 64 * W:
        raise ValueError(f"shape mismatch: q_proj {tuple(q_proj.shape)}, codes {tuple(codes.shape)}")
    device = _check_device(codes, q_proj)
    per_query = grouping == "query_head"
    G = Hq // Hkv
    NS, GQ = (G, 1) if per_query else (1, G)
    Hs = Hkv * NS
    out = torch.empty(B, Hs, N, dtype=torch.int64 if keys else torch.float32, device=device)
    if N == 0 or B == 0:
        return out
    st = _start_tensor(start, B, N, device)
    operand = _scan_operand(q_proj, Hkv, per_query, scorer, _asym_impl)
    block_n = _block_n or (256 if (scorer == "hamming" or _asym_impl == "lut") else 128)
    nblk = triton.cdiv(N, block_n)
    cs = codes.stride()
    grid = (nblk * NS, B * Hkv)
    _scan_kernel[grid](operand, codes, cs[0], cs[1], cs[2], cs[3], st, out, N, int(sink), int(window), nblk,
                       HKV=Hkv, NS=NS, GQ=GQ, W=W, HAMMING=scorer == "hamming", LUT=_asym_impl == "lut",
                       OUT_KEYS=bool(keys), BLOCK_N=block_n, num_warps=4)
    return out


def scores_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Invert `dashkv_scan_triton(..., keys=True)`: int64 keys -> float32 scores (-inf off candidates)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    s = bits.view(torch.float32)
    return s.masked_fill(keys == torch.iinfo(torch.int64).min, float("-inf"))


def _attn_blocks(Gq: int, d: int, device) -> tuple[int, int, int]:
    block_g = max(1, _next_pow2(Gq))
    block_d = max(16, _next_pow2(d))
    # keep the (G, K, d) product tile near 8K floats per program (registers)
    block_k = max(16, min(64, _next_pow2(8192 // (block_g * block_d))))
    return block_g, block_d, block_k


def sparse_decode_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         scaling: float, *, _splits: int | None = None, _block_k: int | None = None) -> torch.Tensor:
    """Decode attention of query (B, Hq, d) over the rows `indices` (B, Hs, K) of keys/values (B, Hkv, N, d).

    Hs = Hkv: each row set is shared by the G query heads of its KV head; Hs = Hq: one set per query
    head. Slots < 0 are unused. Any strides; K/V may be float32/16 or bfloat16 (accumulation in
    float32). Returns (B, Hq, d) in query's dtype; a head with no used slot gets zeros.
    """
    _require()
    B, Hq, d = query.shape
    Hkv = keys.shape[1]
    Hs, K = indices.shape[1], indices.shape[2]
    if Hq % Hkv or Hs not in (Hkv, Hq) or keys.shape != values.shape or keys.shape[-1] != d:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, keys {tuple(keys.shape)}, "
                         f"values {tuple(values.shape)}, indices {tuple(indices.shape)}")
    device = _check_device(query, keys, values, indices)
    G = Hq // Hkv
    NS = Hs // Hkv
    GQ = G // NS
    out = torch.empty(B, Hq, d, dtype=query.dtype, device=device)
    if K == 0 or B == 0:
        return out.zero_()
    idx = indices.to(torch.int32).contiguous()
    block_g, block_d, block_k = _attn_blocks(GQ, d, device)
    if _block_k:
        block_k = _block_k
    nblocks = triton.cdiv(K, block_k)
    if _splits is None:
        target = 4 * _num_sms(device) if device.type == "cuda" else 2
        splits = min(nblocks, max(1, triton.cdiv(target, B * Hs)))
    else:
        splits = max(1, min(int(_splits), nblocks))
    per_split = triton.cdiv(nblocks, splits) * block_k
    splits = triton.cdiv(K, per_split)
    direct = splits == 1
    if direct:
        pm = pl = pacc = torch.empty(1, dtype=torch.float32, device=device)
    else:
        rows = B * Hs * splits * block_g
        pm = torch.empty(rows, dtype=torch.float32, device=device)
        pl = torch.empty(rows, dtype=torch.float32, device=device)
        pacc = torch.empty(rows, block_d, dtype=torch.float32, device=device)
    qs, ks, vs = query.stride(), keys.stride(), values.stride()
    _attn_kernel[(splits, B * Hs)](
        query, qs[0], qs[1], qs[2], keys, ks[0], ks[1], ks[2], ks[3], values, vs[0], vs[1], vs[2], vs[3],
        idx, K, per_split, splits, float(scaling) * _LOG2E, out, pm, pl, pacc,
        HS=Hs, NS=NS, GQ=GQ, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_K=block_k, DIRECT=direct,
        num_warps=4)
    if not direct:
        _merge_kernel[(B * Hs, GQ)](pm, pl, pacc, out, splits, GQ=GQ, D=d, BLOCK_G=block_g, BLOCK_D=block_d,
                                    BLOCK_S=min(64, _next_pow2(splits)), num_warps=4)
    return out


def select_indices_triton(q_proj: torch.Tensor, codes: torch.Tensor, N: int, *, sink: int, window: int,
                          critical: int, grouping: str = "kv_head", scorer: str = "asymmetric",
                          start: torch.Tensor | None = None,
                          _asym_impl: str = "unpack") -> tuple[torch.Tensor, torch.Tensor]:
    """The positions one step reads: (indices (B, Hs, K) int32 with -1 for unused slots, counts (B, Hs) int64).

    K = min(sink + window + critical, N): a static shape; no host synchronisation.
    """
    B, Hq = q_proj.shape[:2]
    Hkv = codes.shape[1]
    Hs = Hq if grouping == "query_head" else Hkv
    device = codes.device
    st = _start_tensor(start, B, N, device)
    budget = sink + window + critical
    K = min(budget, N)
    valid = N - st  # (B,)
    dense = budget >= valid
    dense_idx = st[:, None] + torch.arange(K, device=device)[None, :]
    dense_idx = torch.where(dense_idx < N, dense_idx, torch.full_like(dense_idx, -1))
    if budget < N:  # rows with start = 0 are sparse (others may still be dense)
        parts = [(st[:, None] + torch.arange(sink, device=device)[None, :])[:, None, :].expand(B, Hs, sink)]
        if critical > 0:
            keys = dashkv_scan_triton(q_proj, codes, sink=sink, window=window, grouping=grouping, scorer=scorer,
                                      start=st, keys=True, _asym_impl=_asym_impl)
            parts.append(torch.topk(keys, critical, dim=-1, sorted=False).indices)
        parts.append(torch.arange(N - window, N, device=device)[None, None, :].expand(B, Hs, window))
        sparse_idx = torch.cat(parts, dim=-1)
        idx = torch.where(dense[:, None, None], dense_idx[:, None, :], sparse_idx)
    else:
        idx = dense_idx[:, None, :].expand(B, Hs, K)
    counts = torch.where(dense, valid, torch.full_like(valid, budget))[:, None].expand(B, Hs).contiguous()
    return idx.to(torch.int32).contiguous(), counts


def dashkv_decode_triton(query: torch.Tensor, q_proj: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         codes: torch.Tensor, *, sink: int, window: int, critical: int, scaling: float,
                         grouping: str = "kv_head", scorer: str = "asymmetric",
                         start: torch.Tensor | None = None, return_indices: bool = False,
                         return_counts: bool = False, _asym_impl: str = "unpack", _splits: int | None = None,
                         _block_k: int | None = None):
    """One DASH-KV decode step of one layer on the GPU (Triton): same contract as `dashkv_decode_cpu`.

    query (B, Hq, d); q_proj (B, Hq, b) (the query encoder's real-valued projection); keys, values
    (B, Hkv, N, d) and codes (B, Hkv, N, b/64) int64 -- any strides, e.g. views [:, :, :N] of larger
    preallocated buffers, read in place. start (B,) int64: left padding per batch row (None = 0).
    query/keys/values may be float32, float16 or bfloat16 (float32 accumulation); the output has
    query's dtype (float32 for the CPU kernel's float32 inputs).

    Returns out (B, Hq, d), then (if asked) indices (B, Hs, L) int64 -- the positions read per
    selecting head (Hs = Hkv for grouping="kv_head", Hq for "query_head"), ascending, padded with -1,
    L = max(1, max count) (this one needs a host synchronisation) -- and counts (B, Hs) int64.
    Selection: sinks start..start+sink-1, the last `window` positions, and the top-`critical`
    candidates by score (ties: lower position first); a row whose budget covers all its valid tokens
    attends to all of them (dense).
    """
    _require()
    if not (query.is_floating_point() and keys.is_floating_point() and values.is_floating_point()):
        raise TypeError(f"query/keys/values must be floating point (got {query.dtype}, {keys.dtype}, {values.dtype})")
    if codes.dtype != torch.int64:
        raise TypeError(f"packed key codes must be int64 words, got {codes.dtype}")
    if grouping not in ("kv_head", "query_head"):
        raise ValueError(f"grouping must be 'kv_head' or 'query_head', got {grouping!r}")
    if scorer not in ("asymmetric", "hamming"):
        raise ValueError(f"scorer must be 'asymmetric' or 'hamming', got {scorer!r}")
    B, Hq, d = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    W = codes.shape[-1]
    if (Hq % Hkv or q_proj.shape[-1] != 64 * W or codes.shape[:3] != keys.shape[:3] or keys.shape != values.shape
            or q_proj.shape[:2] != query.shape[:2] or keys.shape[0] != B or keys.shape[-1] != d):
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, q_proj {tuple(q_proj.shape)}, "
                         f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, codes {tuple(codes.shape)}")
    if min(sink, window, critical) < 0:
        raise ValueError("sink, window and critical must be >= 0")
    device = _check_device(query, q_proj, keys, values, codes)
    sink, window, critical = int(sink), int(window), int(critical)
    Hs = Hq if grouping == "query_head" else Hkv
    if N == 0:
        out = torch.zeros(B, Hq, d, dtype=query.dtype, device=device)
        extra = ([torch.empty(B, Hs, 0, dtype=torch.int64, device=device)] if return_indices else []) + (
            [torch.zeros(B, Hs, dtype=torch.int64, device=device)] if return_counts else [])
        return (out, *extra) if extra else out
    idx, counts = select_indices_triton(q_proj, codes, N, sink=sink, window=window, critical=critical,
                                        grouping=grouping, scorer=scorer, start=start, _asym_impl=_asym_impl)
    out = sparse_decode_triton(query, keys, values, idx, scaling, _splits=_splits, _block_k=_block_k)
    if not (return_indices or return_counts):
        return out
    extra = []
    if return_indices:
        big = torch.iinfo(torch.int64).max
        raw = idx.long()
        raw = torch.where(raw >= 0, raw, torch.full_like(raw, big)).sort(-1).values
        slot = torch.arange(raw.shape[-1], device=device)
        raw = raw.masked_fill(slot >= counts[..., None], -1)
        lmax = max(1, int(counts.max()))
        if raw.shape[-1] < lmax:  # cannot happen (counts <= K); kept for safety
            raw = torch.nn.functional.pad(raw, (0, lmax - raw.shape[-1]), value=-1)
        extra.append(raw[..., :lmax])
    if return_counts:
        extra.append(counts)
    return (out, *extra)


def warmup(device="cuda", verbose: bool = False) -> float:
    """Compile every kernel specialisation of a typical model once (seconds it took)."""
    import time

    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(0)
    for W in (1, 2):
        q = torch.randn(1, 2, 64, generator=g).to(device)
        qp = torch.randn(1, 2, 64 * W, generator=g).to(device)
        k = torch.randn(1, 1, 300, 64, generator=g).to(device)
        c = torch.randint(-2**62, 2**62, (1, 1, 300, W), generator=g).to(device)
        for grouping in ("kv_head", "query_head"):
            for scorer in ("asymmetric", "hamming"):
                dashkv_decode_triton(q, qp, k, k, c, sink=2, window=4, critical=8, scaling=0.125,
                                     grouping=grouping, scorer=scorer)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if verbose:
        print(f"dashkv.kernels.triton_kernels: kernels ready in {dt:.2f} s")
    return dt
