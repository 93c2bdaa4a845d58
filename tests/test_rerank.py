"""The re-rank stage (DashKVConfig.rerank): budget accounting, the fused kernel against a float64
reference written out here, the policy's torch path against the kernel, and real decoding with it."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_cpu import indices_to_mask, make_inputs, masked_attention, reference_allowed
from kernel_refs import reference_scores

from dashkv.attention import QuantizedRows
from dashkv.config import DashKVConfig, rerank_read_cost
from dashkv.kernels.cpu import dashkv_decode_cpu


def reference_rerank(query, q_proj, keys, codes, *, sink, window, critical, keep, scaling, grouping, scorer,
                     start, bits=8):
    """Stage 1: the code scan's top `critical` (stable). Stage 2: each candidate's softmax probability
    among the candidates under the dequantised int8 keys, in float64, summed over the query heads of a
    selecting head; the top `keep` (stable) plus sinks and window."""
    n = keys.shape[2]
    hkv = keys.shape[1]
    g = query.shape[1] // hkv
    first = reference_allowed(reference_scores(q_proj, codes, grouping, scorer), start, sink, window, critical)
    k8 = QuantizedRows.quantize(keys, bits).dequantize().double()
    allowed = torch.zeros_like(first)
    for b in range(keys.shape[0]):
        s0 = 0 if start is None else int(start[b])
        fixed = torch.zeros(n, dtype=torch.bool)
        fixed[s0:s0 + sink] = True
        fixed[n - window:] = True
        fixed[:s0] = False
        if sink + window + keep >= n - s0:
            allowed[b, :, s0:] = True
            continue
        for h in range(first.shape[1]):
            cand = (first[b, h] & ~fixed).nonzero().flatten()
            heads = [h] if grouping == "query_head" else range(h * g, (h + 1) * g)
            kv = h // g if grouping == "query_head" else h
            score = torch.zeros(cand.numel(), dtype=torch.float64)
            for qh in heads:
                logits = k8[b, kv, cand] @ query[b, qh].double() * scaling
                score += torch.softmax(logits, -1)
            best = cand[torch.sort(-score, stable=True).indices[:keep]]
            allowed[b, h] = fixed
            allowed[b, h, best] = True
    return allowed


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_rerank_matches_float64_reference(grouping, scorer, kv_dtype, seed, bits):
    n, d = 1200 + 97 * seed, 32
    query, q_proj, keys, values, codes, start = make_inputs(seed, 2, 3, 2, 1, d, n, ties=seed == 1)
    keys, values = keys.to(kv_dtype), values.to(kv_dtype)
    k8 = QuantizedRows.quantize(keys, bits)
    kw = dict(sink=4, window=16, scaling=d ** -0.5, grouping=grouping, scorer=scorer, start=start)
    keep, critical = 30, 120
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, critical=critical, keep=keep,
                                         keys8=(k8.q, k8.scale), return_indices=True, return_counts=True, **kw)
    allowed = reference_rerank(query, q_proj, keys, codes, critical=critical, keep=keep, bits=bits, **kw)
    assert torch.equal(indices_to_mask(idx, n), allowed)
    assert torch.equal(counts, allowed.sum(-1))
    g = query.shape[1] // keys.shape[1]
    allowed_q = allowed.repeat_interleave(g, dim=1) if grouping == "kv_head" else allowed
    torch.testing.assert_close(out, masked_attention(query, keys, values, allowed_q, d ** -0.5),
                               atol=2e-5, rtol=1e-4)


def test_fused_rerank_with_fewer_candidates_than_asked_takes_them_all():
    """A short row (left padding) with fewer candidates than `critical`: stage 1 keeps them all."""
    n, d = 300, 16
    query, q_proj, keys, values, codes, _ = make_inputs(5, 2, 2, 1, 1, d, n, starts=False)
    start = torch.tensor([0, 150])
    k8 = QuantizedRows.quantize(keys)
    kw = dict(sink=2, window=8, scaling=0.25, grouping="kv_head", scorer="asymmetric", start=start)
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, critical=200, keep=40,
                                         keys8=(k8.q, k8.scale), return_indices=True, return_counts=True, **kw)
    allowed = reference_rerank(query, q_proj, keys, codes, critical=200, keep=40, **kw)
    assert torch.equal(indices_to_mask(idx, n), allowed)
    assert counts.tolist() == [[50], [50]]


def test_rerank_needs_keys8_and_keep_within_critical():
    query, q_proj, keys, values, codes, _ = make_inputs(0, 1, 2, 1, 1, 8, 100)
    with pytest.raises(ValueError, match="keys8"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=1, window=1, critical=20, keep=5, scaling=1.0)
    k8 = QuantizedRows.quantize(keys)
    with pytest.raises(ValueError, match="keep <= critical"):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=1, window=1, critical=4, keep=5, scaling=1.0,
                          keys8=(k8.q, k8.scale))


def test_plan_charges_the_rescored_keys_to_the_budget():
    assert rerank_read_cost(64, 4, bits=4) == pytest.approx(36 / 512)  # packed: half the bytes, the same scale
    assert rerank_read_cost(64, 2, bits=4) == pytest.approx(36 / 256)
    cost = rerank_read_cost(64, 4)
    assert cost == pytest.approx(68 / 512)
    plain = DashKVConfig(min_context=0, budget=1 / 16).plan(8192)
    for r in (1, 2, 4, 8):
        plan = DashKVConfig(min_context=0, budget=1 / 16, rerank=r).plan(8192, cost)
        assert plan.rerank == r * plan.critical
        assert plan.reads <= plain.total + 1e-9  # exact rows + int8 keys at their cost: within the budget
        assert plan.reads > plain.total - 1 - r * cost
        assert plan.critical == math.floor(plain.critical / (1 + r * cost))
    with pytest.raises(ValueError, match="rerank"):
        DashKVConfig(rerank=-1)
    with pytest.raises(ValueError, match="rerank"):
        DashKVConfig(rerank=True)
    for bad in (2, 16, True):
        with pytest.raises(ValueError, match="rerank_bits"):
            DashKVConfig(rerank=2, rerank_bits=bad)
    with pytest.raises(ValueError, match="rerank_bits.*lowprec_fraction"):
        DashKVConfig(rerank_bits=4, lowprec_fraction=0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_rows_pack_two_levels_per_byte_within_half_a_step(seed):
    """4-bit copies: levels in +-7 at max|row| / 7, element 2i in the low nibble (level + 8), 2i+1 in the
    high one; dequantised within half a step of the row; the kernel's append writes the same bytes."""
    from dashkv.kernels.cpu import _rows, append_int8_cpu

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 50, 16, generator=gen) * torch.rand(2, 3, 50, 1, generator=gen) * 5
    x[0, 0, 0] = 0.0  # an all-zero row: scale clamps, levels 0
    r = QuantizedRows.quantize(x, 4)
    assert r.q.shape == (2, 3, 50, 8) and r.q.dtype == torch.int8 and r.bits == 4
    u = r.q.view(torch.uint8).int()
    lo, hi = (u & 15) - 8, (u >> 4) - 8
    levels = torch.round(x / r.scale).clamp(-7, 7).int()
    assert torch.equal(lo, levels[..., 0::2]) and torch.equal(hi, levels[..., 1::2])
    assert ((lo >= -7) & (hi >= -7)).all()  # nibble 0 never used
    assert (r.dequantize() - x).abs().le(r.scale / 2 + 1e-6).all()
    torch.testing.assert_close(r.scale, x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7)
    assert torch.equal(r.gather(torch.tensor([[[3, 0, 49]] * 3] * 2))[:, :, 0], r.dequantize()[:, :, [3, 0, 49]])
    buf, sc = torch.zeros(2, 3, 60, 8, dtype=torch.int8), torch.zeros(2, 3, 60, 1)
    append_int8_cpu((_rows(buf), _rows(sc)), 5, x, bits=4)
    assert torch.equal(buf[:, :, 5:55], r.q) and torch.equal(sc[:, :, 5:55], r.scale)
    with pytest.raises(ValueError, match="bits"):
        QuantizedRows.quantize(x, 2)
    with pytest.raises(ValueError, match="even"):
        QuantizedRows.quantize(x[..., :15], 4)


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
@pytest.mark.parametrize("bits", [8, 4])
def test_policy_path_matches_fused_kernel(grouping, scorer, bits):
    from dashkv.decode import StepStats, decode_step
    from dashkv.encoders import HashEncoders
    from dashkv.selection import DashKVPolicy, LayerState

    shape = dict(model_type="x", num_layers=1, num_q_heads=6, num_kv_heads=2, head_dim=32, hidden_size=192)
    enc = HashEncoders.simhash(shape, 64, [0], seed=0)
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 1500, 32, generator=gen)
    v = torch.randn(2, 2, 1500, 32, generator=gen)
    q = torch.randn(2, 6, 1, 32, generator=gen) * 2
    start = torch.tensor([0, 37])
    pol = DashKVPolicy(DashKVConfig(min_context=0, budget=1 / 16, rerank=4, grouping=grouping, scorer=scorer,
                                    rerank_bits=bits), enc)
    state = LayerState(0, codes=pol.encode_keys(0, k), keys8=QuantizedRows.quantize(k, bits))
    stats = [StepStats(), StepStats()]
    ref = decode_step(pol, state, q, k, v, 32 ** -0.5, start=start, fast=False, stats=stats[0])
    fused = decode_step(pol, state, q, k, v, 32 ** -0.5, start=start, fast=True, stats=stats[1])
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert stats[0].attended == pytest.approx(stats[1].attended)
    assert stats[0].fraction <= 1 / 16 + 1e-3  # int8 keys counted: still the budget
    other = LayerState(0, codes=state.codes, keys8=QuantizedRows.quantize(k, 12 - bits))
    for fast in (False, True):  # a key copy at other bits than the configuration's: refused by name
        with pytest.raises(ValueError, match="rerank_bits"):
            decode_step(pol, other, q, k, v, 32 ** -0.5, start=start, fast=fast, stats=StepStats())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("bits", [8, 4])
def test_rerank_generate_fused_equals_reference_and_stays_in_budget(family, bits):
    """Real decoding through transformers with the re-rank stage on (tiny random models, padded batch)."""
    from test_fused_paths import SPARSE, _generate

    from dashkv.models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 900), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :200] = 0
    cfg = DashKVConfig(**{**SPARSE.to_dict(), "rerank": 4, "rerank_bits": bits})
    fused, frac_fused = _generate(model, ids, True, mask, config=cfg)
    ref, frac_ref = _generate(model, ids, False, mask, config=cfg)
    assert torch.equal(fused, ref)
    assert frac_fused == pytest.approx(frac_ref)
    assert 0 < frac_fused < 0.2
