"""Core correctness: config, packing, scans, selection, attention, the decode step."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dashkv.attention import QuantizedRows, dense_decode_attention, restricted_attention_reference, \
    sparse_decode_attention
from dashkv.codes import asymmetric_scores, asymmetric_scores_reference, hamming_similarity, \
    hamming_similarity_reference, pack_bits, to_signs, unpack_bits
from dashkv.config import DashKVConfig, parse_budget
from dashkv.decode import StepStats, decode_step
from dashkv.encoders import HashEncoders
from dashkv.selection import POLICIES, LayerState, build_selection, make_policy

SHAPE = dict(model_type="llama", num_layers=2, num_q_heads=6, num_kv_heads=2, head_dim=16)


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("bits", 32), ("bits", 100), ("budget", 0.0), ("budget", 1.5), ("budget", 0), ("budget", -3),
    ("sink", -1), ("window", -1), ("k_min", -2), ("mass_target", 0.0), ("lowprec_fraction", 1.0),
    ("scorer", "cosine"), ("grouping", "layer"), ("k_max", 0), ("temporal", -0.5), ("temporal", float("nan")),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DashKVConfig(**{field: value})


def test_budget_parsing_and_plan():
    assert parse_budget("1/16") == pytest.approx(0.0625)
    assert parse_budget("512") == 512
    with pytest.raises(ValueError, match="budget"):
        parse_budget("a lot")
    cfg = DashKVConfig(min_context=0, budget="1/16", sink=4, window=64)
    plan = cfg.plan(8192)
    assert (plan.sink, plan.window, plan.critical, plan.lowprec) == (4, 64, 512 - 68, 0)
    assert plan.total == 512 and not plan.dense
    assert cfg.plan(50).dense  # budget would cover everything
    lp = DashKVConfig(min_context=0, budget=1000, lowprec_fraction=0.5).plan(10_000)
    # half the candidate bytes go to the 8-bit tier, whose rows cost 2 x 0.125 of a full row each
    assert lp.critical == 466 and lp.lowprec == 466 * 4 and lp.reads == 1000 and lp.total == 68 + 466 * 5


# ---- codes --------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(words=st.integers(1, 3), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_roundtrip_and_hamming_matches_bitwise_reference(words, n, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(2, n, 64 * words, generator=g) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.int64 and packed.shape == (2, n, words)
    assert torch.equal(unpack_bits(packed), bits)
    assert torch.equal(pack_bits(to_signs(packed)), packed)
    q = pack_bits(torch.rand(2, 64 * words, generator=g) > 0.5)
    assert torch.equal(hamming_similarity(q, packed), hamming_similarity_reference(q, packed))
    # the direct definition: number of agreeing bits minus disagreeing bits
    agree = (unpack_bits(q)[:, None, :] == bits).sum(-1)
    assert torch.equal(hamming_similarity(q, packed), (2 * agree - 64 * words).int())


@settings(max_examples=25, deadline=None)
@given(words=st.integers(1, 2), n=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_asymmetric_lut_scan_matches_reference(words, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = pack_bits(torch.randn(3, n, 64 * words, generator=g))
    q = torch.randn(3, 64 * words, generator=g)
    torch.testing.assert_close(asymmetric_scores(q, codes), asymmetric_scores_reference(q, codes),
                               rtol=1e-5, atol=1e-4)


# ---- attention ----------------------------------------------------------------------------------
def _inputs(b, hq, hkv, n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q, k, v


def _encoders(hq, hkv, d=16, bits=64, layers=(0,)):
    shape = dict(SHAPE, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, num_layers=max(layers) + 1)
    return HashEncoders.simhash(shape, bits, layers, seed=1)


def _state(policy, keys, layer=0):
    state = LayerState(layer_idx=layer)
    if policy is not None and policy.uses_codes:
        state.codes = policy.encode_keys(layer, keys)
    return state


@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 17, 640, 5000])
@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
def test_full_budget_equals_dense(group, batch, n, grouping):
    hkv = 2
    hq = hkv * group
    q, k, v = _inputs(batch, hq, hkv, n, seed=n + group)
    dense = dense_decode_attention(q, k, v, 0.25)
    enc = _encoders(hq, hkv)
    # budget = 1.0 takes the exact dense path; a token budget of n through the selection path must agree too
    for budget in (1.0, n):
        cfg = DashKVConfig(min_context=0, budget=budget, sink=2, window=3, grouping=grouping, dense_layers=())
        policy = make_policy("dashkv", cfg, enc)
        out = decode_step(policy, _state(policy, k), q, k, v, 0.25, fast=False)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    # a selection holding every position (no shortcut) equals dense
    plan = DashKVConfig(min_context=0, budget=n, sink=1, window=1).plan(n + 10)  # not dense: forces the selection path
    plan = type(plan)(n=n, dense=False, sink=min(1, n), window=0, critical=n, lowprec=0)
    hs = hkv if grouping == "kv_head" else hq
    sel = build_selection(torch.randn(batch, hs, n), plan, None)
    assert bool((sel.attended() == n).all())
    torch.testing.assert_close(sparse_decode_attention(q, k, v, sel, 0.25), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
def test_tiny_budget_is_restricted_softmax_and_keeps_sinks_and_window(name, grouping):
    b, hkv, g, n = 2, 2, 3, 300
    q, k, v = _inputs(b, hkv * g, hkv, n, seed=7)
    cfg = DashKVConfig(min_context=0, budget=24, sink=3, window=5, grouping=grouping)
    policy = make_policy(name, cfg, _encoders(hkv * g, hkv))
    state = _state(policy, k)
    start = torch.tensor([0, 11])  # second row is left-padded by 11 tokens
    plan = cfg.plan(n)
    policy.on_prefill(state, q.expand(-1, -1, 4, -1), k, 0.25, start)
    sel = policy.select(state, q[:, :, 0], k, plan, 0.25, start)
    assert bool((sel.attended() <= cfg.budget_tokens(n)).all())
    assert bool((sel.attended() == 24).all())
    out = sparse_decode_attention(q, k, v, sel, 0.25)
    # masked dense reference over exactly the selected positions
    allowed = torch.zeros(b, sel.heads, n, dtype=torch.bool)
    allowed.scatter_(-1, sel.indices, sel.exact)
    for row, s0 in enumerate(start.tolist()):
        assert allowed[row, :, s0:s0 + 3].all() and allowed[row, :, n - 5:].all()  # sinks, window
        assert not allowed[row, :, :s0].any()  # never padding
    allowed_q = allowed if sel.heads == hkv * g else allowed.repeat_interleave(g, dim=1)
    ref = restricted_attention_reference(q, k, v, allowed_q, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_step_reads_the_budget_not_n():
    q, k, v = _inputs(1, 6, 2, 4096)
    cfg = DashKVConfig(min_context=0, budget="1/16", sink=4, window=16)
    policy = make_policy("dashkv", cfg, _encoders(6, 2))
    stats = StepStats()
    decode_step(policy, _state(policy, k), q, k, v, 0.25, fast=False, stats=stats)
    assert stats.attended == 2 * 256 and stats.fraction == pytest.approx(1 / 16)


def test_adaptive_exact_tier_stays_within_bounds():
    q, k, v = _inputs(1, 6, 2, 2000)
    cfg = DashKVConfig(min_context=0, budget=400, sink=4, window=16, adaptive=True, mass_target=0.5, k_min=8)
    enc = _encoders(6, 2)
    for layer in enc.layers.values():
        layer.log_scale.data.fill_(math.log(20.0))
    policy = make_policy("dashkv", cfg, enc)
    sel = policy.select(_state(policy, k), q[:, :, 0], k, cfg.plan(2000), 0.25, None)
    counts = sel.attended()
    assert bool((counts >= 20 + 8).all()) and bool((counts <= 400).all())


def test_lowprec_tier_error_is_bounded():
    """8-bit per-token K/V: each element is off by at most max|row|/254, so logits move by at most
    scaling * |q|_1 * max|k|/254 and outputs by at most max|v|/254 plus the softmax shift. With
    Gaussian data (d=64) we measured a max relative output error of ~0.5% against dense when half of a
    full budget is served in 8 bits; we assert < 2%."""
    b, hkv, g, n, d = 2, 3, 3, 2048, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    k8, v8 = QuantizedRows.quantize(k), QuantizedRows.quantize(v)
    assert float(((k8.dequantize() - k).abs() - k.abs().amax(-1, keepdim=True) / 254).max()) <= 1e-6
    cfg = DashKVConfig(min_context=0, budget=n - 1, sink=4, window=64, lowprec_fraction=0.5)
    plan = cfg.plan(n)
    policy = make_policy("oracle", cfg)
    sel = policy.select(LayerState(0), q[:, :, 0], k, plan, d ** -0.5, None)
    assert sel.lowprec is not None and int(sel.lowprec.sum()) > 0
    out = sparse_decode_attention(q, k, v, sel, d ** -0.5, lowprec=(k8, v8))
    dense = dense_decode_attention(q, k, v, d ** -0.5)
    rel = (out - dense).norm(dim=-1) / dense.norm(dim=-1)
    assert float(rel.max()) < 0.02


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        make_policy("magic", DashKVConfig(min_context=0))


def test_quest_reads_the_whole_page_holding_the_most_aligned_key():
    torch.manual_seed(0)
    b, hkv, g, n, d = 1, 2, 3, 640, 16
    q = torch.randn(b, hkv * g, d)
    k = torch.randn(b, hkv, n, d) * 0.1
    hot = 333  # inside page 20 (positions 320..335)
    k[:, :, hot] = q.reshape(b, hkv, g, d).sum(2) * 3  # strongly aligned with every query of the group
    cfg = DashKVConfig(min_context=0, budget=68 + 32, sink=4, window=64)
    policy = make_policy("quest", cfg)
    sel = policy.select(LayerState(0), q, k, cfg.plan(n), 0.25, None)
    for h in range(hkv):
        chosen = set(sel.indices[0, h][sel.exact[0, h]].tolist())
        assert set(range(320, 336)) <= chosen  # the hot key's page, whole


def test_short_contexts_decode_densely_by_default():
    """min_context is the measured crossover (docs/RESULTS.md §1): selection does not pay below it."""
    cfg = DashKVConfig(budget="1/16")
    assert cfg.min_context is None and cfg.dense_context() == 2560
    assert cfg.plan(2560).dense and not cfg.plan(2561).dense
    summed = DashKVConfig(budget="1/16", group_score="sum")  # one scan: selection pays earlier
    assert summed.dense_context() == 1536 and summed.dense_context(2) == 5120
    assert not DashKVConfig(budget="1/16", min_context=0).plan(1000).dense


def test_half_precision_kv_has_its_own_measured_crossover():
    """bf16/fp16 dense decoding is cheaper, so selection starts later (5120, both group scores); an
    explicit min_context overrides both defaults; the plan memo keeps the two element sizes apart."""
    cfg = DashKVConfig(budget="1/16")
    assert cfg.dense_context(2) == 5120 and cfg.dense_context(4) == 2560
    assert not cfg.plan(4096, element_bytes=4).dense
    assert cfg.plan(4096, element_bytes=2).dense and not cfg.plan(5121, element_bytes=2).dense
    assert not cfg.plan(4096, element_bytes=4).dense  # the memo did not answer for the other dtype
    fixed = DashKVConfig(budget="1/16", min_context=2000)
    assert fixed.dense_context(2) == fixed.dense_context(4) == 2000
    with pytest.raises(ValueError, match="min_context"):
        DashKVConfig(min_context=-1)
    with pytest.raises(ValueError, match="min_context"):
        DashKVConfig(min_context=True)



def test_plan_is_remembered_per_length_and_forgotten_when_a_field_changes():
    c = DashKVConfig(budget=1 / 16, min_context=0)
    p = c.plan(8000)
    assert c.plan(8000) is p and c.plan(8000, 0.25) is not p
    assert c.plan(4000).n == 4000 and c.plan(8000) == p
    c.budget = 1 / 8
    assert c.plan(8000).critical > p.critical
    c.min_context = 10_000
    assert c.plan(8000).dense
    assert c == DashKVConfig(budget=1 / 8, min_context=10_000) and "_plan_memo" not in repr(c)
