"""Pooled per-head budgets (DashKVConfig.head_budget="pooled"): equal mean, bounds, and the property that
makes them worth having -- with true probabilities they never capture less mass than the fixed split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dashkv.config import DashKVConfig
from dashkv.selection import POOL_CAP, LayerState, OraclePolicy, pooled_exact_slots


def _attention(seed, b=2, hkv=3, g=3, n=2000, d=16, sharp=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, d, generator=gen)
    if sharp is not None:  # heads of very different concentration
        q = q * torch.tensor(sharp).repeat_interleave(g)[None, :, None]
    k = torch.randn(b, hkv, n, d, generator=gen)
    return q, k


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hs=st.integers(2, 6), k=st.integers(4, 60), mean_k=st.integers(1, 15),
       k_min=st.integers(0, 4))
def test_pooled_slots_keep_the_mean_and_the_floor(seed, hs, k, mean_k, k_min):
    k_min = min(k_min, mean_k)
    gen = torch.Generator().manual_seed(seed)
    vals = torch.rand(2, hs, k, generator=gen).sort(-1, descending=True).values
    ok = torch.ones_like(vals, dtype=torch.bool)
    ok[1, 0, k // 2:] = False  # a head with few candidates
    got = pooled_exact_slots(vals, ok, mean_k, k_min)
    assert not (got & ~ok).any()
    for b in range(2):
        avail = int(ok[b].sum())
        assert int(got[b].sum()) == min(hs * mean_k, avail)  # the mean is kept while candidates last
        for h in range(hs):
            assert int(got[b, h].sum()) >= min(k_min, int(ok[b, h].sum()))
        # what is taken beyond the floor is the most probable of what is left, across heads
        rest = vals[b].clone()
        rest[:, :k_min] = float("nan")
        taken = rest[got[b] & ~torch.isnan(rest)]
        left = rest[~got[b] & ok[b] & ~torch.isnan(rest)]
        if taken.numel() and left.numel():
            assert taken.min() >= left.max()


@pytest.mark.parametrize("seed", range(4))
def test_pooled_oracle_captures_at_least_the_fixed_oracles_mass(seed):
    q, k = _attention(seed, sharp=[0.3, 1.0, 4.0])
    n = k.shape[2]
    scaling = 0.25
    probs = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q.reshape(2, 3, 3, -1), k) * scaling, -1)
    mass = {}
    for hb in ("fixed", "pooled"):
        cfg = DashKVConfig(min_context=0, budget=1 / 16, head_budget=hb)
        sel = OraclePolicy(cfg).select(LayerState(0), q, k, cfg.plan(n), scaling, None)
        allowed = torch.zeros(2, 3, n, dtype=torch.bool).scatter_(-1, sel.indices, sel.exact)
        mass[hb] = (probs * allowed[:, :, None]).sum(-1).mean()
        assert int(sel.attended().sum()) == 2 * 3 * cfg.plan(n).total  # the same tokens read in all
        per_head = sel.attended()
        if hb == "pooled":
            assert (per_head <= cfg.plan(n).sink + cfg.plan(n).window + POOL_CAP * cfg.plan(n).critical).all()
            assert per_head.max() > per_head.min()  # the budget really moved between heads
    assert mass["pooled"] >= mass["fixed"] - 1e-6


def test_head_budget_is_validated_by_name():
    with pytest.raises(ValueError, match="head_budget"):
        DashKVConfig(head_budget="adaptive")


def _reference_pooled_mask(query, q_proj, keys, codes, *, sink, window, critical, grouping, scorer, start, temps,
                           k_min, cap_factor):
    """Bucket the exact (dyadic) scores as the kernel's scan does, share the exact tier by `pooled_counts`,
    then take each head's best (stable: lower position first)."""
    from kernel_refs import reference_scores
    from test_kernels_cpu import reference_allowed

    from dashkv.kernels import NBINS_ASYM
    from dashkv.selection import pooled_counts

    scores = reference_scores(q_proj, codes, grouping, scorer)
    b, hs, n = scores.shape
    gq = query.shape[1] // hs
    span = gq * 64 * codes.shape[-1]
    if scorer == "hamming":
        buckets = ((scores.double() + span) / 2).round().long()
        mids = (2.0 * torch.arange(span + 1, dtype=torch.float64) - span).expand(b, hs, -1)
    else:
        a = q_proj.reshape(b, hs, gq, -1).sum(2).double().abs().sum(-1)
        af, sf = a.float(), (NBINS_ASYM / (2.0 * a)).float()
        buckets = ((scores.float() + af[..., None]) * sf[..., None]).clamp(0, NBINS_ASYM - 1).long()
        mids = (torch.arange(NBINS_ASYM, dtype=torch.float64) + 0.5) / sf.double()[..., None] - af.double()[..., None]
    counts = torch.zeros(b, hs, dtype=torch.int64)
    for i in range(b):
        s0 = 0 if start is None else int(start[i])
        if sink + window + critical >= n - s0:
            continue  # read densely: counts unused
        cand = torch.zeros(n, dtype=torch.bool)
        cand[s0 + sink:n - window] = True
        counts[i] = pooled_counts(buckets[i:i + 1], cand[None], mids[i:i + 1], temps, critical,
                                  min(k_min, critical), min(cap_factor * critical, int(cand.sum())))[0]
    return reference_allowed(scores, start, sink, window, critical, counts)


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_pooled_budgets_match_the_reference(grouping, scorer, seed):
    from test_kernels_cpu import indices_to_mask, make_inputs

    from dashkv.kernels.cpu import dashkv_decode_cpu

    n, d = 1500 + 211 * seed, 16
    query, q_proj, keys, values, codes, start = make_inputs(seed, 2, 3, 3, 1, d, n, ties=seed == 2)
    q_proj = q_proj * torch.tensor([0.25, 1.0, 4.0]).repeat_interleave(3)[None, :, None]  # still dyadic
    hs = 3 if grouping == "kv_head" else 9
    temps = [0.02 * (1 + x) for x in range(hs)]
    kw = dict(sink=4, window=16, critical=60, grouping=grouping, scorer=scorer, start=start)
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, scaling=d ** -0.5, return_indices=True,
                                         return_counts=True, pool_temps=temps, k_min=8, pool_cap=4, **kw)
    allowed = _reference_pooled_mask(query, q_proj, keys, codes, temps=temps, k_min=8, cap_factor=4, **kw)
    assert torch.equal(indices_to_mask(idx, n), allowed)
    assert torch.equal(counts, allowed.sum(-1))
    assert counts.sum(-1).tolist() == [hs * (4 + 16 + 60)] * 2  # the same tokens in all, per batch row
    assert counts.max() > counts.min()  # and they really moved between heads


@pytest.mark.parametrize("family, group_score", [("llama", None), ("gemma3_text", None), ("llama", "sum"),
                                                 ("gemma3_text", "sum")])
def test_pooled_generate_fused_equals_reference(family, group_score):
    from test_fused_paths import SPARSE, _generate

    from dashkv.models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 900), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :200] = 0
    cfg = DashKVConfig(**{**SPARSE.to_dict(), "head_budget": "pooled", "group_score": group_score})
    assert cfg.effective_group_score == (group_score or "probability")
    fused, frac_fused = _generate(model, ids, True, mask, config=cfg)
    ref, frac_ref = _generate(model, ids, False, mask, config=cfg)
    assert torch.equal(fused, ref)
    assert frac_fused == pytest.approx(frac_ref)
    assert 0 < frac_fused < 0.2
