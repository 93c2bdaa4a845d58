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
                     start):
    """Stage 1: the code scan's top `critical` (stable). Stage 2: each candidate's softmax probability
    among the candidates under the dequantised int8 keys, in float64, summed over the query heads of a
    selecting head; the top `keep` (stable) plus sinks and window."""
    n = keys.shape[2]
    hkv = keys.shape[1]
    g = query.shape[1] // hkv
    first = reference_allowed(reference_scores(q_proj, codes, grouping, scorer), start, sink, window, critical)
    k8 = QuantizedRows.quantize(keys).dequantize().double()
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
def test_fused_rerank_matches_float64_reference(grouping, scorer, kv_dtype, seed):
    n, d = 1200 + 97 * seed, 32
    query, q_proj, keys, values, codes, start = make_inputs(seed, 2, 3, 2, 1, d, n, ties=seed == 1)
    keys, values = keys.to(kv_dtype), values.to(kv_dtype)
    k8 = QuantizedRows.quantize(keys)
    kw = dict(sink=4, window=16, scaling=d ** -0.5, grouping=grouping, scorer=scorer, start=start)
    keep, critical = 30, 120
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, critical=critical, keep=keep,
                                         keys8=(k8.q, k8.scale), return_indices=True, return_counts=True, **kw)
    allowed = reference_rerank(query, q_proj, keys, codes, critical=critical, keep=keep, **kw)
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


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
def test_policy_path_matches_fused_kernel(grouping, scorer):
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
    pol = DashKVPolicy(DashKVConfig(min_context=0, budget=1 / 16, rerank=4, grouping=grouping, scorer=scorer), enc)
    state = LayerState(0, codes=pol.encode_keys(0, k), keys8=QuantizedRows.quantize(k))
    stats = [StepStats(), StepStats()]
    ref = decode_step(pol, state, q, k, v, 32 ** -0.5, start=start, fast=False, stats=stats[0])
    fused = decode_step(pol, state, q, k, v, 32 ** -0.5, start=start, fast=True, stats=stats[1])
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert stats[0].attended == pytest.approx(stats[1].attended)
    assert stats[0].fraction <= 1 / 16 + 1e-3  # int8 keys counted: still the budget


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_rerank_generate_fused_equals_reference_and_stays_in_budget(family):
    """Real decoding through transformers with the re-rank stage on (tiny random models, padded batch)."""
    from test_fused_paths import SPARSE, _generate

    from dashkv.models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 900), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :200] = 0
    cfg = DashKVConfig(**{**SPARSE.to_dict(), "rerank": 4})
    fused, frac_fused = _generate(model, ids, True, mask, config=cfg)
    ref, frac_ref = _generate(model, ids, False, mask, config=cfg)
    assert torch.equal(fused, ref)
    assert frac_fused == pytest.approx(frac_ref)
    assert 0 < frac_fused < 0.2
