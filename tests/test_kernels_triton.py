"""The Triton decode step (scan, on-device top-k, sparse attention) against the torch reference path.

Runs the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below before the
kernels module is imported), so it needs no GPU; `scripts/gpu_check.py` runs the same checks compiled
on a CUDA device. The interpreter is slow: shapes are tiny and cases are few.

Query projections are dyadic (multiples of 1/4), so every score is exact in float32 whatever the
summation order: ties are real ties, and the selected sets must match exactly. The reference breaks
ties toward the lower position (the kernels' rule) by folding the position into a tie-free score
before calling `dashkv.selection.build_selection`; attention is `dashkv.attention.sparse_decode_attention`.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from kernel_refs import reference_scores

# The interpreter, always (GPU runs: scripts/gpu_check.py). Triton reads this when a kernel is decorated,
# i.e. when dashkv.kernels.triton_kernels is imported; the module avoids triton.language's own @jit
# helpers, so triton itself may have been imported earlier (torch or transformers often do).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'dashkv[gpu]')")

from dashkv.attention import sparse_decode_attention  # noqa: E402
from dashkv.config import StepPlan  # noqa: E402
from dashkv.selection import Selection, build_selection  # noqa: E402

tk = importlib.import_module("dashkv.kernels.triton_kernels")
if not tk.interpreting():  # imported earlier, before TRITON_INTERPRET was set
    tk = importlib.reload(tk)
if not (tk.triton_available() and tk.interpreting()):
    pytest.skip("triton's interpreter is not usable here", allow_module_level=True)


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def make_inputs(seed, batch, g, hkv, words, d, n, ties=False, starts=None, cap=None):
    """Random step inputs; with `cap`, keys/values/codes are views [:, :, :n] of (.., cap, ..) buffers."""
    gen = torch.Generator().manual_seed(seed)
    hq = g * hkv
    query = torch.randn(batch, hq, d, generator=gen)
    q_proj = torch.randint(-8, 9, (batch, hq, 64 * words), generator=gen).float() / 4  # exact sums
    m = cap or n
    keys = torch.randn(batch, hkv, m, d, generator=gen)
    values = torch.randn(batch, hkv, m, d, generator=gen)
    codes = torch.randint(-2**63, 2**63 - 1, (batch, hkv, m, words), generator=gen)
    if ties and n > 3:
        codes[:, :, :n:3] = codes[:, :, :1]  # a third of the keys share one code: many exact ties
    keys, values, codes = keys[:, :, :n], values[:, :, :n], codes[:, :, :n]
    start = None if starts is None else torch.tensor(starts, dtype=torch.int64)
    return query, q_proj, keys, values, codes, start


def reference_selection(q_proj, codes, *, sink, window, critical, grouping, scorer, start):
    """build_selection on tie-free scores: ties go to the lower position, as in the kernels."""
    n = codes.shape[2]
    s = reference_scores(q_proj, codes, grouping, scorer, dtype=torch.float64)
    assert torch.equal(s * 4, (s * 4).round())  # dyadic projections: exact scores
    # integer score * 4, shifted left by the position bits, plus (n - 1 - position): exact in float32
    tie_free = (s * 4) * (1 << max(1, (n - 1).bit_length())) + (n - 1 - torch.arange(n, dtype=torch.float64))
    assert tie_free.abs().max() < 2**24
    budget = sink + window + critical
    # (build_selection expects the config's plans, whose sink and window never exceed n)
    plan = StepPlan(n=n, dense=budget >= n, sink=min(sink, n), window=min(window, n), critical=critical, lowprec=0)
    return build_selection(tie_free.float(), plan, start)


def selection_mask(indices, used, n):
    m = torch.zeros(*indices.shape[:2], n + 1, dtype=torch.bool)
    m.scatter_(-1, torch.where(used, indices, torch.full_like(indices, n)), True)
    return m[..., :n]


def check_against_reference(query, q_proj, keys, values, codes, *, atol=2e-5, **kw):
    start = kw.get("start")
    n = keys.shape[2]
    out, idx, counts = tk.dashkv_decode_triton(query, q_proj, keys, values, codes, return_indices=True,
                                               return_counts=True, **kw)
    sel_kw = {k: kw[k] for k in ("sink", "window", "critical", "grouping", "scorer")}
    sel = reference_selection(q_proj, codes, start=start, **sel_kw)
    want = selection_mask(sel.indices, sel.exact, n)
    got = selection_mask(idx.clamp(min=0), idx >= 0, n)
    assert torch.equal(got, want)
    assert torch.equal(counts, want.sum(-1))
    assert idx.dtype == torch.int64 and idx.shape[-1] == max(1, int(counts.max()))
    used = idx[idx >= 0]
    if n:  # ascending positions, then -1 padding
        assert torch.equal(idx, torch.where(idx >= 0, idx, n + 1).sort(-1).values.masked_fill(idx < 0, -1))
        assert used.numel() == 0 or int(used.max()) < n
    ref = sparse_decode_attention(query[:, :, None], keys.contiguous(), values.contiguous(), sel,
                                  kw["scaling"])[:, :, 0]
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    return out, idx


# ---------------------------------------------------------------------------------------------
# decode step == reference
# ---------------------------------------------------------------------------------------------
#   scorer, grouping, G, Hkv, words, batch, N, ties, starts, cap (view), impl, splits
CASES = [
    ("asymmetric", "kv_head", 3, 2, 1, 2, 300, True, [0, 70], 400, "unpack", None),
    ("asymmetric", "query_head", 3, 1, 2, 2, 100, True, [0, 80], None, "unpack", 3),  # row 1 dense
    ("asymmetric", "kv_head", 1, 1, 2, 2, 7, False, [0, 3], None, "unpack", None),  # N below the budget
    ("asymmetric", "query_head", 1, 2, 1, 1, 300, False, None, 320, "lut", 2),
    ("asymmetric", "kv_head", 3, 2, 2, 1, 100, True, None, None, "lut", None),
    ("hamming", "kv_head", 1, 2, 2, 1, 300, False, None, None, "unpack", 2),
    ("hamming", "query_head", 3, 2, 1, 2, 100, True, [0, 40], 150, "unpack", None),
    ("hamming", "kv_head", 3, 1, 1, 1, 1, False, None, None, "unpack", None),  # N = 1
    ("hamming", "query_head", 1, 1, 2, 2, 7, False, [2, 0], None, "unpack", None),
    ("hamming", "kv_head", 3, 2, 2, 2, 300, True, [0, 150], 300, "unpack", 4),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0][:4]}-{c[1][:2]}-G{c[2]}-H{c[3]}-b{64 * c[4]}-B{c[5]}-N{c[6]}"
                                             for c in CASES])
def test_decode_matches_reference(case):
    scorer, grouping, g, hkv, words, batch, n, ties, starts, cap, impl, splits = case
    query, q_proj, keys, values, codes, start = make_inputs(n + g, batch, g, hkv, words, 16, n, ties, starts, cap)
    kw = dict(sink=4, window=16, critical=max(1, n // 10), scaling=0.25, grouping=grouping, scorer=scorer,
              start=start, _asym_impl=impl, _splits=splits, _block_k=16 if splits else None)
    check_against_reference(query, q_proj, keys, values, codes, **kw)


def test_identical_codes_pick_lowest_positions():
    query, q_proj, keys, values, codes, _ = make_inputs(1, 1, 3, 1, 1, 8, 120)
    codes[:] = codes[:, :, :1]
    expect = torch.cat([torch.arange(4), torch.arange(4, 24), torch.arange(110, 120)])
    for scorer in ("asymmetric", "hamming"):
        _, idx = tk.dashkv_decode_triton(query, q_proj, keys, values, codes, sink=4, window=10, critical=20,
                                         scaling=0.25, scorer=scorer, return_indices=True)
        assert torch.equal(idx[0, 0], expect)


def test_zero_critical_and_zero_sink_window():
    query, q_proj, keys, values, codes, start = make_inputs(5, 2, 3, 2, 1, 8, 60, starts=[0, 10])
    check_against_reference(query, q_proj, keys, values, codes, sink=2, window=5, critical=0, scaling=0.3,
                            grouping="kv_head", scorer="hamming", start=start)
    check_against_reference(query, q_proj, keys, values, codes, sink=0, window=0, critical=9, scaling=0.3,
                            grouping="query_head", scorer="asymmetric", start=start)


# ---------------------------------------------------------------------------------------------
# scan, attention, properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer,impl", [("asymmetric", "unpack"), ("asymmetric", "lut"), ("hamming", "unpack")])
def test_scan_scores_and_keys(scorer, impl):
    _, q_proj, _, _, codes, start = make_inputs(3, 2, 3, 2, 2, 8, 70, ties=True, starts=[0, 9], cap=90)
    for grouping in ("kv_head", "query_head"):
        s = tk.dashkv_scan_triton(q_proj, codes, sink=3, window=5, grouping=grouping, scorer=scorer, start=start,
                                  _asym_impl=impl)
        ref = reference_scores(q_proj, codes, grouping, scorer, dtype=torch.float64).float()
        pos = torch.arange(70)
        cand = (pos[None, :] >= start[:, None] + 3) & (pos[None, :] < 65)
        assert torch.equal(s, ref.masked_fill(~cand[:, None, :], float("-inf")))
        keys = tk.dashkv_scan_triton(q_proj, codes, sink=3, window=5, grouping=grouping, scorer=scorer,
                                     start=start, keys=True, _asym_impl=impl)
        assert torch.equal(tk.scores_from_keys(keys), s)
        # keys order like (score, -position): a stable descending sort of the scores
        order = torch.sort(-s.double(), dim=-1, stable=True).indices
        assert torch.equal(keys.sort(-1, descending=True).indices[..., :40], order[..., :40])


def test_sparse_attention_splits_and_dtypes():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 24, generator=gen)
    kb = torch.randn(2, 2, 90, 24, generator=gen)
    vb = torch.randn(2, 2, 90, 24, generator=gen)
    k, v = kb[:, :, :80], vb.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :80]  # odd strides
    for hs in (2, 6):
        idx = torch.randperm(80, generator=gen)[:40].repeat(2, hs, 1)
        idx[..., 30:] = -1
        idx[1, 0] = -1  # a head with nothing to read -> zeros
        sel = Selection(indices=idx.clamp(min=0), exact=idx >= 0)
        ref = sparse_decode_attention(q[:, :, None], k, v, sel, 0.2)[:, :, 0]
        for splits in (1, 3):
            out = tk.sparse_decode_triton(q, k, v, idx, 0.2, _splits=splits, _block_k=16)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        assert not out[1, :6 // hs].any()  # the heads of selecting head 0 in row 1
        out = tk.sparse_decode_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, 0.2, _splits=2, _block_k=16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
def test_full_budget_is_dense(grouping):
    query, _, keys, values, codes, start = make_inputs(7, 2, 3, 2, 1, 16, 90, starts=[0, 30])
    q_proj = torch.randn(2, 6, 64)  # any projection: selection cannot matter
    out, counts = tk.dashkv_decode_triton(query, q_proj, keys, values, codes, sink=4, window=16, critical=90,
                                          scaling=0.2, grouping=grouping, start=start, return_counts=True)
    valid = torch.arange(90)[None, :] >= start[:, None]
    k = keys.double().repeat_interleave(3, dim=1)
    v = values.double().repeat_interleave(3, dim=1)
    logits = torch.einsum("bhd,bhnd->bhn", query.double(), k) * 0.2
    ref = torch.einsum("bhn,bhnd->bhd", torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), -1), v)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(counts[:, 0], valid.sum(-1))


def test_matches_cpu_kernel():
    cpu = pytest.importorskip("dashkv.kernels.cpu")
    query, q_proj, keys, values, codes, start = make_inputs(9, 2, 3, 2, 2, 16, 250, ties=True, starts=[0, 33])
    q_proj = torch.randn(q_proj.shape, generator=torch.Generator().manual_seed(0))  # real-valued projections
    for scorer, grouping in (("asymmetric", "kv_head"), ("hamming", "query_head")):
        kw = dict(sink=4, window=16, critical=25, scaling=0.25, grouping=grouping, scorer=scorer, start=start,
                  return_indices=True, return_counts=True)
        a, ia, ca = tk.dashkv_decode_triton(query, q_proj, keys, values, codes, **kw)
        b, ib, cb = cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
        # real-valued scores are summed in another order than the CPU's byte tables: a near-tie at the
        # boundary may flip, so compare sets up to one swap per row, and outputs where the sets agree
        assert torch.equal(ca, cb)
        diff = (selection_mask(ia.clamp(min=0), ia >= 0, 250) ^ selection_mask(ib.clamp(min=0), ib >= 0, 250)).sum(-1)
        same = diff == 0
        assert diff.le(2).all() and same.float().mean() > 0.7
        g = 1 if grouping == "query_head" else 3
        same_q = same.repeat_interleave(g, dim=1)
        torch.testing.assert_close(a[same_q], b[same_q], atol=2e-5, rtol=1e-4)


def test_empty_context_and_degenerate_start():
    query, q_proj, keys, values, codes, _ = make_inputs(2, 2, 3, 1, 1, 8, 10)
    out, idx, counts = tk.dashkv_decode_triton(query, q_proj, keys[:, :, :0], values[:, :, :0], codes[:, :, :0],
                                               sink=4, window=4, critical=4, scaling=0.3, return_indices=True,
                                               return_counts=True)
    assert out.shape == (2, 3, 8) and not out.any() and idx.shape == (2, 1, 0) and not counts.any()
    out = tk.dashkv_decode_triton(query, q_proj, keys, values, codes, sink=1, window=1, critical=1, scaling=0.3,
                                  start=torch.tensor([0, 10]))
    assert not out[1].any() and out[0].abs().sum() > 0


def test_rejects_bad_inputs():
    query, q_proj, keys, values, codes, _ = make_inputs(2, 1, 3, 1, 1, 8, 10)
    kw = dict(sink=1, window=1, critical=1, scaling=1.0)
    with pytest.raises(TypeError):
        tk.dashkv_decode_triton(query, q_proj, keys, values, codes.int(), **kw)
    with pytest.raises(ValueError):
        tk.dashkv_decode_triton(query, q_proj, keys, values, codes, grouping="nope", **kw)
    with pytest.raises(ValueError):
        tk.dashkv_decode_triton(query, q_proj, keys, values, codes, scorer="nope", **kw)
    with pytest.raises(ValueError):
        tk.dashkv_decode_triton(query, q_proj[..., :32], keys, values, codes, **kw)
    with pytest.raises(ValueError):
        tk.dashkv_decode_triton(query, q_proj, keys, values, codes, sink=-1, window=1, critical=1, scaling=1.0)
