"""Selection options of the torch reference path. Successor pooling (`DashKVConfig.successors`): a
candidate's score is the best of its own and its S predecessors' (against a plain loop; the selection
takes a peak's successors). `group_score="probability"`: one set per KV head ranked by the summed
per-head probability estimates (against the formula written out). Successor pooling names itself as a
reason for the reference path (the probability score does only off the CPU kernel), and bad values are
refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dashkv.config import DashKVConfig
from dashkv.decode import reference_path_reasons
from dashkv.selection import build_selection, successor_pool


def _loop(scores: torch.Tensor, span: int) -> torch.Tensor:
    out = scores.clone()
    n = scores.shape[-1]
    for p in range(n):
        for i in range(1, span + 1):
            if p - i >= 0:
                out[..., p] = torch.maximum(out[..., p], scores[..., p - i])
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), span=st.integers(0, 5), seed=st.integers(0, 1000))
def test_successor_pool_matches_loop(n, span, seed):
    s = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(successor_pool(s, span), _loop(s, span))


def test_selection_takes_the_successors_of_a_peak():
    n = 400
    cfg = DashKVConfig(budget=4 + 8 + 6, sink=4, window=8, k_min=0, min_context=0, successors=2)
    scores = torch.zeros(1, 1, n)
    scores[0, 0, 100], scores[0, 0, 250] = 5.0, 4.0
    sel = build_selection(successor_pool(scores, cfg.successors), cfg.plan(n), None)
    chosen = set(sel.indices[0, 0][sel.exact[0, 0]].tolist())
    assert {100, 101, 102, 250, 251, 252} <= chosen


def test_successors_take_the_reference_path_and_bad_values_fail():
    assert any("successors" in r for r in reference_path_reasons(DashKVConfig(successors=1), "cpu", torch.float32))
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ValueError, match="successors"):
            DashKVConfig(successors=bad)
    with pytest.raises(ValueError, match="query_bits"):
        DashKVConfig(query_bits=4, successors=1)


def test_probability_group_score_is_the_summed_per_head_softmax():
    from dashkv.encoders import HashEncoders
    from dashkv.selection import DashKVPolicy, LayerState

    shape = {"model_type": "llama", "num_layers": 3, "num_q_heads": 6, "num_kv_heads": 2, "head_dim": 16}
    enc = HashEncoders.simhash(shape, 64, [2], seed=3)
    enc.layers["2"].log_scale.data = torch.linspace(0.5, 3.0, 6)  # distinct temperatures per query head
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 300, 16, generator=g)
    query = torch.randn(1, 6, 16, generator=g)
    cfg = DashKVConfig(min_context=0, budget=1 / 8, group_score="probability")
    pol = DashKVPolicy(cfg, enc)
    state = LayerState(2, codes=enc.encode_keys(2, keys))
    per_head = pol.per_head_scores(state, query)  # (1, 6, N)
    scale = enc.logit_scale(2)
    want = torch.softmax(per_head / 64 * scale[None, :, None], -1).reshape(1, 2, 3, -1).sum(2)
    plan = cfg.plan(300)
    got = pol.select(state, query, keys, plan, 0.25, None)
    ref = build_selection(want, plan, None)
    assert torch.equal(got.indices.sort(-1).values, ref.indices.sort(-1).values)
    assert not reference_path_reasons(cfg, "cpu", torch.float32)  # fused on the CPU (tests/test_prob_fused.py)
    assert any("group_score" in r for r in reference_path_reasons(cfg, "cuda", torch.float32))
    hamming = DashKVConfig(**{**cfg.to_dict(), "scorer": "hamming"})
    assert any("group_score" in r for r in reference_path_reasons(hamming, "cpu", torch.float32))
    assert not reference_path_reasons(DashKVConfig(group_score="probability", grouping="query_head"), "cpu",
                                      torch.float32)
    with pytest.raises(ValueError, match="group_score"):
        DashKVConfig(group_score="max")


def test_policy_select_applies_successor_pooling():
    from dashkv.encoders import HashEncoders
    from dashkv.selection import DashKVPolicy, LayerState

    shape = {"model_type": "llama", "num_layers": 3, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    enc = HashEncoders.simhash(shape, 64, [2], seed=1)
    g = torch.Generator().manual_seed(2)
    keys, query = torch.randn(1, 1, 300, 16, generator=g), torch.randn(1, 2, 16, generator=g)
    state = LayerState(2, codes=enc.encode_keys(2, keys))
    base = DashKVConfig(min_context=0, budget=4 + 8 + 10, sink=4, window=8, k_min=0)
    plan = base.plan(300)
    plain = DashKVPolicy(base, enc).select(state, query, keys, plan, 0.25, None)
    pooled = DashKVPolicy(DashKVConfig(**{**base.to_dict(), "successors": 1}), enc).select(
        state, query, keys, plan, 0.25, None)
    top = plain.indices[0, 0][plain.exact[0, 0]].tolist()[12:][0]  # the best candidate of the plain ranking
    chosen = set(pooled.indices[0, 0][pooled.exact[0, 0]].tolist())
    assert top in chosen and top + 1 in chosen
    with pytest.raises(ValueError, match="head_budget"):
        DashKVConfig(successors=1, head_budget="pooled")


def test_the_default_group_score_resolves_where_it_combines():
    """None ranks by probability with the asymmetric scorer (pooled head budgets too, unless pooled after a
    re-rank or with the 8-bit tier); the options measured with the sum keep it, and baselines (no code scan)
    keep the sum's dense threshold."""
    from dashkv.selection import make_policy

    assert DashKVConfig().effective_group_score == "probability"
    assert DashKVConfig(head_budget="pooled").effective_group_score == "probability"
    for kw in (dict(scorer="hamming"), dict(head_budget="pooled", rerank=4),
               dict(head_budget="pooled", lowprec_fraction=0.5), dict(query_bits=4), dict(adaptive=True),
               dict(temporal=0.25), dict(spatial_vote=0.5), dict(successors=1), dict(grouping="query_head")):
        assert DashKVConfig(**kw).effective_group_score == "sum", kw
    assert DashKVConfig(group_score="probability", adaptive=True).effective_group_score == "probability"
    oracle = make_policy("oracle", DashKVConfig())
    assert oracle.config.group_score == "sum" and oracle.config.dense_context() == 1536
    assert make_policy("oracle", DashKVConfig(group_score="probability")).config.group_score == "probability"
