"""The fused CPU kernel's low-precision tier against the torch reference path.

Three tiers per selecting head: the `critical` best candidates attended exactly, the next `lowprec`
from the 8-bit copies of K and V in the same softmax, the rest skipped for this step. The reference is
`build_selection` (plan.lowprec) + `sparse_decode_attention` with the `QuantizedRows` copies; with
integer query projections the scores are exact and distinct, so both must read the same rows in the same
tier and give the same output; and `generate` must give the same tokens on both paths.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_cpu import indices_to_mask, make_inputs

from dashkv.attention import QuantizedRows, sparse_decode_attention
from dashkv.codes import asymmetric_scores, hamming_similarity, pack_bits
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu
from dashkv.selection import build_selection


def _reference(query, q_proj, keys, values, codes, k8, v8, plan, scorer, grouping, start, scaling):
    b, hq, _ = q_proj.shape
    hkv, n = codes.shape[1], codes.shape[2]
    proj = q_proj.reshape(b, hkv, hq // hkv, -1)
    if scorer == "hamming":
        per_head = hamming_similarity(pack_bits(proj > 0), codes[:, :, None]).double().reshape(b, -1, n)
        per_head = per_head - torch.arange(n, dtype=torch.float64) / (n + 1) / hq  # ties: lower position
    else:
        per_head = asymmetric_scores(proj, codes[:, :, None]).reshape(b, -1, n).double()
    scores = per_head if grouping == "query_head" else per_head.reshape(b, hkv, hq // hkv, n).sum(2)
    sel = build_selection(scores, plan, start)
    out = sparse_decode_attention(query[:, :, None], keys, values, sel, scaling, lowprec=(k8, v8))[:, :, 0]
    return out, sel


@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("batch,n,frac", [(1, 1800, 0.5), (3, 2500, 0.25), (2, 700, 0.75)])
def test_fused_low_precision_tier_matches_reference(scorer, grouping, batch, n, frac):
    g, hkv, d = 3, 3, 32
    query, q_proj, keys, values, codes, start = make_inputs(batch * 31 + n, batch, g, hkv, 1, d, n)
    q_proj = torch.randint(-2**15, 2**15, q_proj.shape, generator=torch.Generator().manual_seed(n)).float()
    k8, v8 = QuantizedRows.quantize(keys), QuantizedRows.quantize(values)
    cfg = DashKVConfig(min_context=0, budget=1 / 8, sink=4, window=16, lowprec_fraction=frac, scorer=scorer,
                       grouping=grouping)
    plan = cfg.plan(n)
    assert plan.lowprec > 0 and plan.critical > 0
    scaling = d ** -0.5
    ref, sel = _reference(query, q_proj, keys, values, codes, k8, v8, plan, scorer, grouping, start, scaling)
    out, idx, counts = dashkv_decode_cpu(
        query, q_proj, keys, values, codes, sink=plan.sink, window=plan.window, critical=plan.critical,
        lowprec=plan.lowprec, keys8=(k8.q, k8.scale), values8=(v8.q, v8.scale), scaling=scaling,
        grouping=grouping, scorer=scorer, start=start, return_indices=True, return_counts=True)
    read = torch.zeros(batch, sel.heads, n, dtype=torch.bool)
    read.scatter_(-1, sel.indices, sel.used())
    assert torch.equal(indices_to_mask(idx, n), read)  # the same rows, both tiers together
    assert torch.equal(counts, read.sum(-1))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # ... and the same rows in each tier
    # the tiers matter: the same rows all exact give another output
    exact_only = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=plan.sink, window=plan.window,
                                   critical=plan.critical + plan.lowprec, scaling=scaling, grouping=grouping,
                                   scorer=scorer, start=start)
    assert not torch.allclose(exact_only, out, atol=1e-6, rtol=0)


def test_low_precision_tier_refuses_bad_combinations():
    query, q_proj, keys, values, codes, _ = make_inputs(0, 1, 3, 3, 1, 16, 300)
    k8, v8 = QuantizedRows.quantize(keys), QuantizedRows.quantize(values)
    kw = dict(sink=4, window=8, critical=20, scaling=0.25)
    with pytest.raises(ValueError, match="low-precision"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, lowprec=10, keys8=(k8.q, k8.scale), **kw)
    with pytest.raises(ValueError, match="low-precision"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, lowprec=10, keys8=(k8.q, k8.scale),
                          values8=(v8.q, v8.scale), keep=5, **kw)


def test_generate_fused_matches_reference_with_low_precision_tier():
    from test_fused_paths import _generate

    from dashkv.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 500, (2, 700), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :250] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cfg = DashKVConfig(min_context=0, budget=1 / 8, sink=4, window=8, k_min=4, dense_layers=(), lowprec_fraction=0.5)
    fast, frac = _generate(model, ids, True, mask, config=cfg)
    ref, frac_ref = _generate(model, ids, False, mask, config=cfg)
    assert torch.equal(fast, ref)
    # every step reads its budget: the 8-bit rows (4 x as many as the bytes they replace) count at their
    # bytes, on both paths alike
    assert 0.1 < frac <= 0.13 and abs(frac - frac_ref) < 1e-9


def test_plan_charges_the_8bit_tier_at_its_bytes():
    from dashkv.config import rerank_read_cost

    cost = rerank_read_cost(64, 4)
    plan = DashKVConfig(min_context=0, budget=1 / 16, lowprec_fraction=0.5).plan(8192, cost)
    assert plan.lowprec_cost == pytest.approx(2 * cost)
    assert plan.reads == pytest.approx(512, abs=1)  # what a full-precision step at 1/16 reads
    assert plan.lowprec > 3 * plan.critical  # ... spent on ~3.8x as many 8-bit rows
    assert DashKVConfig(min_context=0, budget=1 / 16).plan(8192, cost).lowprec == 0


def test_buffer_views_memoize_the_int8_copies_and_notice_new_buffers():
    """The cache's int8 copies are viewed once per buffer (as K/V/codes are), and a view of another
    buffer is never served from the memo."""
    from dashkv.attention import QuantizedRows
    from dashkv.kernels.cpu import BufferViews, _int8_rows, _rows

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 32, 16, generator=g), torch.randn(1, 2, 32, 16, generator=g)
    codes = torch.zeros(1, 2, 32, 1, dtype=torch.int64)
    k8 = QuantizedRows.quantize(k)
    views = BufferViews(k, v, codes, {"k8": (k8.q, k8.scale)})
    memo = _int8_rows(views, "k8", (k8.q[:, :, :20], k8.scale[:, :, :20]))
    assert memo is views.int8["k8"]
    assert views.matches(k, v, codes, {"k8": (k8.q, k8.scale)})
    other = QuantizedRows.quantize(k.clone())
    assert not views.matches(k, v, codes, {"k8": (other.q, other.scale)})
    fresh = _int8_rows(views, "k8", (other.q, other.scale))
    assert fresh is not views.int8["k8"] and fresh[0][0].ctypes.data == _rows(other.q)[0].ctypes.data
