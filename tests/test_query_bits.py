"""The bit-plane scan (`DashKVConfig.query_bits`): integer query levels scored by AND + popcount.

The fused kernel must pick exactly the top-`critical` tokens by the integer score that the slow
references compute (unpack the codes, multiply by the levels), ties to the lower position, for 4- and
8-bit levels, one or two code words (8-bit, two words: several scores share a bucket, so the kernel's
exact tie-break runs), both groupings, left padding and half-precision K/V; and the torch reference
path of `decode_step` must give the same tokens inside `generate`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels_cpu import indices_to_mask, make_inputs, masked_attention, reference_allowed

from dashkv.codes import asymmetric_scores_reference, quantise_query, quantised_scores
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu


def levels_by_hand(v: list[float], bits: int) -> list[int]:
    """Pure-Python quantiser: floor(x / delta + 0.5), delta = max|x| / (2^(bits-1) - 1), in float64."""
    top = (1 << (bits - 1)) - 1
    amax = max(abs(x) for x in v)
    if amax == 0:
        return [0] * len(v)
    delta = amax / top
    return [max(-top, min(top, math.floor(x / delta + 0.5))) for x in v]


def grouped_projection(q_proj: torch.Tensor, hkv: int, grouping: str) -> torch.Tensor:
    """(B, Hs, b): a selecting head's query heads summed one after another in float32."""
    b, hq, nb = q_proj.shape
    if grouping == "query_head":
        return q_proj.float()
    parts = q_proj.float().reshape(b, hkv, hq // hkv, nb)
    acc = parts[:, :, 0].clone()
    for g in range(1, parts.shape[2]):
        acc = acc + parts[:, :, g]
    return acc


def slow_scores(q_proj, codes, grouping, bits):
    """(B, Hs, N) float64 integer scores: levels . signs, from the bit-by-bit asymmetric reference."""
    b, hq, _ = q_proj.shape
    hkv = codes.shape[1]
    grouped = grouped_projection(q_proj, hkv, grouping)
    levels = torch.tensor([[levels_by_hand(grouped[i, h].double().tolist(), bits) for h in range(grouped.shape[1])]
                           for i in range(b)], dtype=torch.float64)
    g = 1 if grouping == "kv_head" else hq // hkv
    c = codes.repeat_interleave(g, dim=1)
    return asymmetric_scores_reference(levels, c)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantise_query_matches_the_hand_quantiser(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randn(6, 64, generator=gen) * torch.tensor([1, 1e-3, 1e3, 1, 1, 1])[:, None]
    v[3] = 0.0  # all zero: all levels zero
    v[4, 5] = -v[4].abs().max() * 2  # the extreme is negative
    v[5] = torch.arange(64) - 31.5  # halves on the grid
    got = quantise_query(v, bits)
    want = torch.tensor([levels_by_hand(row.double().tolist(), bits) for row in v])
    assert torch.equal(got, want)
    top = (1 << (bits - 1)) - 1
    assert got.abs().max() == top and got[3].abs().sum() == 0


def test_quantised_scores_are_levels_dot_signs():
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(-127, 128, (2, 3, 128), generator=gen)
    codes = torch.randint(-2**63, 2**63 - 1, (2, 3, 50, 2), generator=gen)
    want = asymmetric_scores_reference(levels.double(), codes).round().long()
    assert torch.equal(quantised_scores(levels, codes), want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), batch=st.sampled_from([1, 3]), g=st.sampled_from([1, 3]),
       hkv=st.sampled_from([1, 3]), words=st.sampled_from([1, 2]), n=st.integers(1, 2500), ties=st.booleans(),
       fixed=st.sampled_from([(4, 64), (0, 0), (2, 7)]), crit_frac=st.floats(0.0, 0.5),
       grouping=st.sampled_from(["kv_head", "query_head"]), bits=st.sampled_from([4, 8]),
       parallel=st.booleans(), kv_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fused_bit_plane_scan_matches_reference(seed, batch, g, hkv, words, n, ties, fixed, crit_frac, grouping,
                                                bits, parallel, kv_dtype):
    query, _, keys, values, codes, start = make_inputs(seed, batch, g, hkv, words, 16, n, ties)
    q_proj = torch.randn(batch, g * hkv, 64 * words, generator=torch.Generator().manual_seed(seed))
    keys, values = keys.to(kv_dtype), values.to(kv_dtype)
    sink, window = fixed
    critical = int(crit_frac * n)
    kw = dict(sink=sink, window=window, critical=critical, scaling=0.25, grouping=grouping, start=start)
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, return_indices=True, return_counts=True,
                                         parallel=parallel, query_bits=bits, **kw)
    allowed = reference_allowed(slow_scores(q_proj, codes, grouping, bits), start, sink, window, critical)
    assert torch.equal(indices_to_mask(idx, n), allowed)
    assert torch.equal(counts, allowed.sum(-1))
    allowed_q = allowed.repeat_interleave(g, dim=1) if grouping == "kv_head" else allowed
    torch.testing.assert_close(out, masked_attention(query, keys, values, allowed_q, 0.25), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_policy_reference_scores_select_the_kernel_set(bits):
    """`DashKVPolicy.quantised_scan_scores` (the torch path) ranks as the kernel selects."""
    from dashkv.selection import build_selection

    n, g, hkv = 1500, 3, 3
    query, _, keys, values, codes, start = make_inputs(7, 2, g, hkv, 1, 16, n)
    q_proj = torch.randn(2, g * hkv, 64, generator=torch.Generator().manual_seed(8))
    cfg = DashKVConfig(min_context=0, budget=1 / 16, query_bits=bits)
    plan = cfg.plan(n)
    scores = slow_scores(q_proj, codes, "kv_head", bits) - torch.arange(n, dtype=torch.float64) / (n + 1)
    sel = build_selection(scores, plan, start)
    lead = torch.zeros(2, hkv, n, dtype=torch.bool)
    lead.scatter_(-1, sel.indices, sel.exact)
    _, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=plan.sink, window=plan.window,
                               critical=plan.critical, scaling=0.25, start=start, return_indices=True,
                               query_bits=bits)
    assert torch.equal(indices_to_mask(idx, n), lead)


def test_generate_fused_matches_reference_with_query_bits():
    from test_fused_paths import _generate

    from dashkv.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 500, (2, 700), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :200] = 0
    ids = ids.masked_fill(mask == 0, 0)
    for bits in (4, 8):
        cfg = DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, k_min=4, dense_layers=(), query_bits=bits)
        fast, frac = _generate(model, ids, True, mask, config=cfg)
        ref, _ = _generate(model, ids, False, mask, config=cfg)
        assert frac < 0.2
        assert torch.equal(fast, ref)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(query_bits=5), "query_bits"),
    (dict(query_bits=True), "query_bits"),
    (dict(query_bits=4, scorer="hamming"), "hamming"),
    (dict(query_bits=4, head_budget="pooled"), "pooled"),
    (dict(query_bits=8, adaptive=True), "adaptive"),
])
def test_config_refuses_bad_query_bits(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DashKVConfig(**kwargs)


def test_kernel_refuses_bad_query_bits():
    query, q_proj, keys, values, codes, _ = make_inputs(0, 1, 3, 3, 1, 16, 300)
    kw = dict(sink=4, window=8, critical=20, scaling=0.25)
    with pytest.raises(ValueError, match="query_bits"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, query_bits=6, **kw)
    with pytest.raises(ValueError, match="query_bits"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, query_bits=4, scorer="hamming", **kw)


def test_simhash_hamming_policy_drops_query_bits():
    from dashkv.encoders import HashEncoders
    from dashkv.models import model_shape, tiny_model
    from dashkv.selection import make_policy

    s = model_shape(tiny_model("llama"))
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=0)
    cfg = DashKVConfig(query_bits=4)
    assert make_policy("simhash", cfg, enc).config.query_bits is None
    assert make_policy("simhash_asym", cfg, enc).config.query_bits == 4
