"""The probability group score in the fused CPU kernel (`prob_temps`): one scan per query head, each
head's estimated probability (softmax at its temperature over all valid positions) summed per KV head.

The kernel's exponentials are float32 polynomials and the reference's are torch's, so two candidates
whose summed probabilities differ by ~1e-7 may swap at the selection boundary, and estimates below float32's
range (< 1e-30; the kernel's exp stops at e^-87) are all 0: the kernel test allows exactly that (any
disagreement is a near-tie of the k-th best under a float64 reference, or both vanish) and checks
the output against exact attention over the set the kernel chose. Inside `generate` (real rounding, tiny
models) fused and reference paths must give the same tokens, plain, re-ranked, with the 8-bit tier and
with left padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused_paths import SPARSE, _simhash
from test_kernels_cpu import indices_to_mask, make_inputs, masked_attention, reference_allowed

from dashkv import hf
from dashkv.codes import (PROB_FIELD_BITS, asymmetric_scores, probability_level_bits, probability_logits,
                          quantise_query, quantised_scores)
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu
from dashkv.selection import build_selection
from dashkv.models import tiny_model


def reference_logits(q_proj, codes, temps):
    """(B, Hq, N) float64: t_h * delta_h * s_h with s_h the bit-by-bit score of the projection rounded to
    `probability_level_bits` integer levels (step delta_h = max|v| / (2^(L-1) - 1))."""
    lbits = probability_level_bits(codes.shape[-1])
    b, hq, _ = q_proj.shape
    hkv = codes.shape[1]
    levels = quantise_query(q_proj.float(), lbits).reshape(b, hkv, hq // hkv, -1)
    per = quantised_scores(levels, codes[:, :, None]).reshape(b, hq, -1).double()  # exact integers
    delta = q_proj.float().double().abs().amax(-1) / ((1 << (lbits - 1)) - 1)
    return per * (torch.from_numpy(temps).double()[None, :] * delta)[..., None]


def reference_probabilities(q_proj, codes, temps, start):
    """(B, Hkv, N) float64: per KV head, the sum over its query heads of softmax(t_h * s_h) over the valid
    positions (`reference_logits`)."""
    logits = reference_logits(q_proj, codes, temps)
    b, hq, n = logits.shape
    st0 = torch.zeros(b, dtype=torch.long) if start is None else start
    valid = torch.arange(n)[None, :] >= st0[:, None]
    p = torch.softmax(logits.masked_fill(~valid[:, None, :], float("-inf")), -1)
    return p.reshape(b, codes.shape[1], -1, n).sum(2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), batch=st.sampled_from([1, 3]), g=st.sampled_from([1, 2, 3, 4, 5]),
       hkv=st.sampled_from([1, 2, 3]), words=st.sampled_from([1, 2]), n=st.integers(40, 2500), ties=st.booleans(),
       fixed=st.sampled_from([(4, 64), (0, 0), (2, 7)]), crit_frac=st.floats(0.01, 0.4), parallel=st.booleans(),
       temp_hi=st.sampled_from([0.3, 1.5, 6.0]))
def test_kernel_ranks_by_the_summed_probabilities(seed, batch, g, hkv, words, n, ties, fixed, crit_frac, parallel,
                                                  temp_hi):
    query, q_proj, keys, values, codes, start = make_inputs(seed, batch, g, hkv, words, 16, n, ties)
    sink, window = fixed
    critical = max(1, int(crit_frac * n))
    temps = np.random.default_rng(seed).uniform(0.05, temp_hi, g * hkv).astype(np.float32)
    out, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=sink, window=window, critical=critical,
                                 scaling=0.25, start=start, return_indices=True, parallel=parallel,
                                 prob_temps=temps)
    p = reference_probabilities(q_proj, codes, temps, start)
    want = reference_allowed(p, start, sink, window, critical)
    got = indices_to_mask(idx, n)
    for b, h in (want ^ got).any(-1).nonzero().tolist():  # disagreements: only near-ties at the boundary
        s0 = 0 if start is None else int(start[b])
        kth = p[b, h, s0 + sink:n - window].sort(descending=True).values[critical - 1]
        swapped = (want ^ got)[b, h].nonzero().flatten()
        near = (p[b, h, swapped] - kth).abs() <= 1e-5 * kth
        vanished = torch.maximum(p[b, h, swapped], kth) < 1e-30  # below float32's exp: 0, a tie, in both paths
        assert (near | vanished).all(), (b, h, swapped.tolist())
    assert (got.sum(-1) == want.sum(-1)).all()
    torch.testing.assert_close(out, masked_attention(query, keys, values, got.repeat_interleave(g, 1), 0.25),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("words", [1, 2, 3, 4, 8])
def test_level_bits_keep_three_packed_heads_apart(words):
    """8 * words table entries of at most 16 (2^(L-1) - 1) each sum below 2^21: no carry between the fields
    of the packed tables; one more level bit would overflow."""
    lbits = probability_level_bits(words)
    lev = (1 << (lbits - 1)) - 1
    assert 128 * words * lev < 1 << PROB_FIELD_BITS <= 128 * words * ((1 << lbits) - 1)


@pytest.mark.parametrize("words", [1, 4])
def test_probability_logits_are_exact_integer_scores_times_one_factor(words):
    gen = torch.Generator().manual_seed(words)
    proj = torch.randn(2, 6, 64 * words, generator=gen)
    proj[1, 2] = 0.0  # an all-zero projection: zero levels, zero logits
    codes = torch.randint(-2**62, 2**62, (2, 3, 300, words), generator=gen)
    temps = torch.rand(6, generator=gen) + 0.1
    got = probability_logits(proj, temps, codes)
    lbits = probability_level_bits(words)
    levels = quantise_query(proj, lbits).reshape(2, 3, 2, -1)
    s = quantised_scores(levels, codes[:, :, None]).reshape(2, 6, -1)
    teff = (temps.double()[None] * proj.double().abs().amax(-1) / ((1 << (lbits - 1)) - 1)).float()
    assert torch.equal(got, s.float() * teff[..., None])
    assert torch.equal(got[1, 2], torch.zeros(300))
    exact = asymmetric_scores(proj.reshape(2, 3, 2, -1), codes[:, :, None]).reshape(2, 6, -1) * temps[None, :, None]
    scale = (proj.abs().sum(-1) * temps)[..., None]  # the logits' range
    assert ((got - exact).abs() <= 2e-4 * scale).all()  # the rounding is far below the hash's error


@pytest.mark.parametrize("family, extra, padded", [
    ("llama", {}, False),
    ("llama", {}, True),
    ("gemma3_text", {}, True),
    ("llama", {"rerank": 4}, False),
    ("llama", {"lowprec_fraction": 0.5}, False),
])
def test_generate_fused_equals_reference(family, extra, padded):
    from dashkv.decode import reference_path_reasons

    model = tiny_model(family)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 500, (3 if padded else 1, 700), generator=gen)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :120] = 0
        mask[2, :400] = 0
        ids = ids.masked_fill(mask == 0, 0)
    cfg = DashKVConfig(**{**SPARSE.to_dict(), "group_score": "probability", **extra})
    assert not reference_path_reasons(cfg, "cpu", torch.float32)
    enc = _simhash(model)
    for layer in enc.layers.values():  # distinct temperatures per query head, as calibrated encoders have
        layer.log_scale.data = torch.linspace(0.5, 3.0, layer.log_scale.numel())
    outs = []
    for fast in (True, False):
        with hf.enable(model, enc, cfg, track=True) as handle:
            handle.fast = fast
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))
            assert handle.stats.fraction < 0.25  # it really was sparse
    assert torch.equal(outs[0], outs[1])


def test_bad_probability_temperatures_are_refused_by_name():
    query, q_proj, keys, values, codes, _ = make_inputs(0, 1, 2, 2, 1, 16, 200)
    kw = dict(sink=2, window=4, critical=20, scaling=0.25)
    good = np.ones(4, np.float32)
    for bad_kw in ({"prob_temps": np.ones(3, np.float32)}, {"prob_temps": good, "grouping": "query_head"},
                   {"prob_temps": good, "scorer": "hamming"}, {"prob_temps": good, "query_bits": 4},
                   {"prob_temps": np.array([1, 1, np.nan, 1], np.float32)}):
        with pytest.raises(ValueError, match="probability group score|prob_temps"):
            dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw, **bad_kw)


def test_exact_ties_go_to_the_lower_position_in_every_schedule():
    """Equal codes get equal estimated probabilities in every scan chunk, so the 2-thread schedule (several
    chunks per KV head) picks exactly the serial schedule's set: ties to the lower position."""
    gen = torch.Generator().manual_seed(7)
    n, critical = 5000, 40
    query = torch.randn(1, 2, 16, generator=gen)
    q_proj = torch.randint(-8, 9, (1, 2, 64), generator=gen).float() / 4
    keys, values = torch.randn(1, 1, n, 16, generator=gen), torch.randn(1, 1, n, 16, generator=gen)
    codes = torch.randint(-2**63, 2**63 - 1, (1, 1, n, 1), generator=gen)
    best = pack_bits_for(q_proj[0, 0] + q_proj[0, 1])  # the code both heads score highest
    codes[0, 0, 10] = best
    codes[0, 0, 100::50] = best ^ 1  # 98 copies of the second-best code, spread over every chunk
    temps = np.array([0.7, 2.0], np.float32)
    kw = dict(sink=4, window=16, critical=critical, scaling=0.25, return_indices=True, prob_temps=temps)
    _, serial = dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=False, **kw)
    _, parallel = dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=True, **kw)
    assert torch.equal(serial, parallel)
    want = reference_allowed(reference_probabilities(q_proj, codes, temps, None), None, 4, 16, critical)
    assert torch.equal(indices_to_mask(serial, n), want)  # the stable float64 ranking: ties to the lower position
    assert want[0, 0, 10] and want[0, 0, 100] and not want[0, 0, 4950]


def pack_bits_for(proj: torch.Tensor) -> torch.Tensor:
    """The int64 code word whose bits are the signs of `proj` (64 values): the best-scoring code."""
    from dashkv.codes import pack_bits

    return pack_bits(proj[None] > 0)[0, 0]


def test_probability_temperatures_follow_the_encoders_weights():
    """The kernel's temperatures are cached per layer but recomputed when the logit scale changes in place
    (fine-tuned encoders after `enable`), so the fused and reference paths never disagree on them."""
    from dashkv.selection import DashKVPolicy

    enc = _simhash(tiny_model("llama"))
    layer = min(int(i) for i in enc.layers)
    policy = DashKVPolicy(DashKVConfig(), enc)
    first = policy.probability_temperatures(layer).copy()
    with torch.no_grad():
        enc.layers[str(layer)].log_scale.add_(1.0)
    np.testing.assert_allclose(policy.probability_temperatures(layer), first * np.e, rtol=1e-6)


def test_hamming_scorer_with_the_probability_score_ranks_by_its_own_scores():
    """Integer query levels exist for the asymmetric scorer only: a Hamming (SimHash) policy asked for the
    probability score keeps softmax over its Hamming similarities (reference path), as before."""
    from dashkv.encoders import HashEncoders
    from dashkv.selection import DashKVPolicy, LayerState

    shape = {"model_type": "llama", "num_layers": 1, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    enc = HashEncoders.simhash(shape, 64, [0], seed=0)
    cfg = DashKVConfig(min_context=0, budget=1 / 4, sink=2, window=4, k_min=2, dense_layers=(),
                       scorer="hamming", group_score="probability")
    pol = DashKVPolicy(cfg, enc)
    gen = torch.Generator().manual_seed(3)
    keys, query = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 4, 16, generator=gen)
    state = LayerState(0, pol.encode_keys(0, keys))
    plan = cfg.plan(300)
    got = pol.select(state, query, keys, plan, 0.25, None)
    want_scores = pol.probability_estimate(state, pol.per_head_scores(state, query), 2, None)
    want = build_selection(want_scores, plan, None, None, cfg)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.exact, want.exact)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), words=st.sampled_from([1, 2, 4]), nh=st.sampled_from([1, 2, 3]))
def test_packed_tables_are_the_float_tables_packed(seed, words, nh):
    """`_prob_tables` builds the packed tables in int64 directly; reference: each head's exact float byte
    tables (`_build_lut`), offset by 8*lev and packed field by field. Extremes included (all +-lev)."""
    from dashkv.kernels.cpu import _build_lut, _prob_packed_exact, _prob_tables

    rng = np.random.default_rng(seed)
    lev = (1 << (probability_level_bits(words) - 1)) - 1
    P = 8 * words
    qlev = np.round(rng.uniform(-lev, lev, (1, nh + 1, 64 * words))).astype(np.float32)
    qlev[0, 1, :8] = lev  # the first head packed: one byte table all +lev, the next all -lev
    qlev[0, 1, 8:16] = -lev
    got = np.empty(P * 256, np.int64)
    _prob_tables(qlev, 0, 1, nh, P, lev, got)
    want = np.zeros(P * 256, np.int64)
    for j in range(nh):
        lt = np.empty(P * 256, np.float32)
        _build_lut(qlev, 0, 1 + j, 1, P, lt)
        want |= (lt.astype(np.int64) + 8 * lev) << (PROB_FIELD_BITS * j)
    assert np.array_equal(got, want)
    codes = rng.integers(0, 2**64, (50, words), dtype=np.uint64, endpoint=False)
    codes[0], codes[1] = 0, np.iinfo(np.uint64).max  # every sign -1 / +1
    for j in range(nh):
        lt = np.empty(P * 256, np.float32)
        _build_lut(qlev, 0, 1 + j, 1, P, lt)
        for c in codes:
            bits = np.unpackbits(c.view(np.uint8), bitorder="little").astype(np.float64) * 2 - 1
            exact = float((bits * qlev[0, 1 + j].astype(np.float64)).sum())
            assert _prob_packed_exact(c, words, got, j, 64 * words * lev) == exact


def _stub_policy(temps, q_proj, bits, **config):
    """A DashKVPolicy whose query projection and temperatures are given arrays (no encoders)."""
    from dashkv.selection import DashKVPolicy

    pol = DashKVPolicy.__new__(DashKVPolicy)
    pol.config = DashKVConfig(bits=bits, **config)
    pol._probability_temperatures = lambda layer_idx: torch.from_numpy(temps)
    pol.query_projection = lambda layer_idx, q: q_proj
    return pol


@pytest.mark.parametrize("chunk", range(4))
def test_kernel_pools_the_probability_score_as_the_reference(chunk):
    """Pooled per-head budgets with the probability score: the kernel's exact-tier size per KV head equals
    `DashKVPolicy.pooled_probability_selection`'s (one bucket map per row, the same water-filling) on 60
    fixed random cases (sharp and flat temperatures, left padding, G = 1..5, serial and parallel); the
    sets agree up to near-ties of p inside a head (float32 polynomial exp against torch's), and the row's
    total is what the fixed split would read."""
    from dataclasses import replace

    from dashkv.selection import LayerState

    for seed in range(15 * chunk, 15 * chunk + 15):
        rng = np.random.default_rng(seed)
        batch, g, hkv, words = int(rng.choice([1, 3])), int(rng.integers(1, 6)), int(rng.choice([2, 3, 4])), int(rng.choice([1, 2]))
        n = int(rng.integers(60, 2500))
        query, q_proj, keys, values, codes, start = make_inputs(seed, batch, g, hkv, words, 16, n, seed % 3 == 0)
        sink, window = [(4, 16), (0, 0), (2, 7)][seed % 3]
        critical = max(1, int(rng.uniform(0.01, 0.3) * n))
        temps = rng.uniform(0.05, [0.3, 1.5, 6.0][seed % 3], g * hkv).astype(np.float32)
        out, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=sink, window=window,
                                     critical=critical, scaling=0.25, start=start, return_indices=True,
                                     prob_temps=temps, pool_temps=np.ones(hkv), k_min=min(4, critical),
                                     pool_cap=4, parallel=bool(seed % 2))
        got = indices_to_mask(idx, n)
        pol = _stub_policy(temps, q_proj, 64 * words, k_min=4, head_budget="pooled")
        plan = replace(pol.config.plan(n), sink=sink, window=window, critical=critical, lowprec=0, rerank=0)
        sel = pol.pooled_probability_selection(LayerState(0, codes=codes), query, plan, start)
        want = torch.zeros(batch, hkv, n, dtype=torch.bool).scatter_(-1, sel.indices, sel.exact)
        assert torch.equal(got.sum(-1), want.sum(-1)), seed
        p = reference_probabilities(q_proj, codes, temps, start)
        for b, h in (want ^ got).any(-1).nonzero().tolist():  # only near-ties at a head's boundary
            swapped = (want ^ got)[b, h].nonzero().flatten()
            kth = p[b, h][want[b, h] & got[b, h]].min() if (want[b, h] & got[b, h]).any() else p[b, h, swapped].max()
            assert ((p[b, h, swapped] - kth).abs() <= 1e-5 * kth).all() or (p[b, h, swapped] < 1e-30).all(), seed
        s0 = torch.zeros(batch, dtype=torch.long) if start is None else start
        ncand = (n - window - s0 - sink).clamp(min=0)
        fixed = (torch.arange(n)[None, :] >= s0[:, None]).sum(-1).clamp(max=sink + window)
        assert torch.equal(got.sum((-1, -2)),
                           hkv * (fixed + torch.minimum(ncand, torch.full_like(ncand, critical)))), seed
        torch.testing.assert_close(out, masked_attention(query, keys, values, got.repeat_interleave(g, 1), 0.25),
                                   atol=1e-4, rtol=1e-4)
