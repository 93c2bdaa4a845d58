"""The fused numba CPU decode step against obviously-correct torch references.

Scores are made exact in float32 by using dyadic query projections (small multiples of 1/4): then the
kernel's byte-table sums, the reference's unpack-and-multiply sums and the lead's torch path all give
bit-identical scores, ties are real ties, and the selected sets must match exactly.
"""

from __future__ import annotations

import pytest
import torch
from kernel_refs import reference_scores
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashkv.codes import pack_bits
from dashkv.bench import _inputs as _bench_inputs
from dashkv.kernels import cpu
from dashkv.kernels.cpu import dashkv_decode_cpu, dense_decode_cpu, dense_decode_torch


# ---------------------------------------------------------------------------------------------
# slow references
# ---------------------------------------------------------------------------------------------
def reference_allowed(scores, start, sink, window, critical, counts=None):
    """(B, Hs, N) bool: sinks ∪ window ∪ top-critical candidates (stable sort: lower position wins).

    counts (B, Hs), if given, is each head's own candidate count (pooled budgets); `critical` still
    decides which rows are read densely."""
    bsz, hs, n = scores.shape
    allowed = torch.zeros(bsz, hs, n, dtype=torch.bool)
    for b in range(bsz):
        s0 = 0 if start is None else int(start[b])
        if sink + window + critical >= n - s0:
            allowed[b, :, s0:] = True
            continue
        allowed[b, :, s0:s0 + sink] = True
        allowed[b, :, n - window:] = True
        lo, hi = s0 + sink, n - window
        for h in range(hs):
            k = critical if counts is None else int(counts[b, h])
            order = torch.sort(-scores[b, h, lo:hi], stable=True).indices[:k]
            allowed[b, h, lo + order] = True
    return allowed


def masked_attention(query, keys, values, allowed_q, scaling):
    """Float64 softmax attention of (B, Hq, d) restricted to allowed_q (B, Hq, N)."""
    g = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    logits = torch.einsum("bhd,bhnd->bhn", query.double(), k) * scaling
    p = torch.softmax(logits.masked_fill(~allowed_q, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", p, v).float()


def reference_decode(query, q_proj, keys, values, codes, *, sink, window, critical, scaling, grouping, scorer,
                     start=None):
    allowed = reference_allowed(reference_scores(q_proj, codes, grouping, scorer), start, sink, window, critical)
    g = query.shape[1] // keys.shape[1]
    allowed_q = allowed.repeat_interleave(g, dim=1) if grouping == "kv_head" else allowed
    return masked_attention(query, keys, values, allowed_q, scaling), allowed


def indices_to_mask(idx, n):
    mask = torch.zeros(*idx.shape[:2], n, dtype=torch.bool)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            ii = idx[b, h][idx[b, h] >= 0]
            mask[b, h, ii] = True
    return mask


def make_inputs(seed, batch, g, hkv, words, d, n, ties=False, starts=True):
    gen = torch.Generator().manual_seed(seed)
    hq = g * hkv
    query = torch.randn(batch, hq, d, generator=gen)
    q_proj = torch.randint(-8, 9, (batch, hq, 64 * words), generator=gen).float() / 4  # exact sums
    keys = torch.randn(batch, hkv, n, d, generator=gen)
    values = torch.randn(batch, hkv, n, d, generator=gen)
    codes = torch.randint(-2**63, 2**63 - 1, (batch, hkv, n, words), generator=gen)
    if ties and n > 3:
        codes[:, :, ::3] = codes[:, :, :1]  # a third of the keys share one code: many exact ties
    start = None
    if starts and batch > 1:
        start = torch.randint(0, max(1, n // 2), (batch,), generator=gen)
        start[0] = 0
    return query, q_proj, keys, values, codes, start


# ---------------------------------------------------------------------------------------------
# fast == reference
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), batch=st.sampled_from([1, 3]), g=st.sampled_from([1, 3, 7]),
       hkv=st.sampled_from([1, 2, 3]), words=st.sampled_from([1, 2]), d=st.sampled_from([8, 64]),
       n=st.one_of(st.integers(1, 100), st.integers(100, 3000)), ties=st.booleans(),
       fixed=st.sampled_from([(4, 64), (0, 0), (2, 7), (4, 0), (0, 5)]), crit_frac=st.floats(0.0, 0.6),
       grouping=st.sampled_from(["kv_head", "query_head"]), scorer=st.sampled_from(["asymmetric", "hamming"]),
       parallel=st.booleans(), kv_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_matches_reference(seed, batch, g, hkv, words, d, n, ties, fixed, crit_frac, grouping, scorer, parallel,
                           kv_dtype):
    query, q_proj, keys, values, codes, start = make_inputs(seed, batch, g, hkv, words, d, n, ties)
    keys, values = keys.to(kv_dtype), values.to(kv_dtype)  # the reference reads the same rounded values
    sink, window = fixed
    critical = int(crit_frac * n)
    kw = dict(sink=sink, window=window, critical=critical, scaling=d ** -0.5, grouping=grouping, scorer=scorer,
              start=start)
    out, idx, counts = dashkv_decode_cpu(query, q_proj, keys, values, codes, return_indices=True,
                                         return_counts=True, parallel=parallel, **kw)
    ref, allowed = reference_decode(query, q_proj, keys, values, codes, **kw)
    got = indices_to_mask(idx, n)
    assert torch.equal(got, allowed)
    assert torch.equal(counts, allowed.sum(-1))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
def test_awkward_sizes_and_ties(grouping, scorer):
    for n in (1, 2, 67, 68, 69, 70, 100, 1023, 1025, 2999):
        for ties in (False, True):
            query, q_proj, keys, values, codes, start = make_inputs(n, 3, 3, 3, 1, 16, n, ties)
            kw = dict(sink=4, window=64, critical=max(0, n // 16), scaling=0.25, grouping=grouping,
                      scorer=scorer, start=start)
            out, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, return_indices=True, **kw)
            ref, allowed = reference_decode(query, q_proj, keys, values, codes, **kw)
            assert torch.equal(indices_to_mask(idx, n), allowed), (n, ties)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_all_identical_codes_pick_lowest_positions():
    query, q_proj, keys, values, codes, _ = make_inputs(1, 1, 3, 3, 2, 16, 500, starts=False)
    codes[:] = codes[:, :, :1]
    for scorer in ("asymmetric", "hamming"):
        _, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=10, critical=20,
                                   scaling=0.25, scorer=scorer, return_indices=True)
        expect = torch.cat([torch.arange(4), torch.arange(4, 24), torch.arange(490, 500)])
        for h in range(3):
            assert torch.equal(idx[0, h], expect)


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
def test_full_budget_is_dense(grouping, scorer):
    query, q_proj, keys, values, codes, start = make_inputs(7, 3, 3, 2, 1, 32, 700)
    q_proj = torch.randn(q_proj.shape)  # any projection: selection cannot matter
    out = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=64, critical=700, scaling=0.2,
                            grouping=grouping, scorer=scorer, start=start)
    valid = torch.arange(700)[None, :] >= start[:, None]
    dense = masked_attention(query, keys, values, valid[:, None, :].expand(-1, 6, -1), 0.2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_selection_always_contains_sinks_and_window():
    query, q_proj, keys, values, codes, start = make_inputs(3, 3, 7, 1, 2, 8, 2000)
    q_proj = torch.randn(q_proj.shape)
    for grouping in ("kv_head", "query_head"):
        _, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=64, critical=50,
                                   scaling=0.3, grouping=grouping, start=start, return_indices=True)
        for b in range(3):
            s0 = int(start[b])
            for h in range(idx.shape[1]):
                row = set(idx[b, h].tolist())
                assert set(range(s0, s0 + 4)) <= row and set(range(2000 - 64, 2000)) <= row
                assert min(row - {-1}) >= s0 and len(row - {-1}) == 4 + 64 + 50


def test_selected_are_the_top_scores_for_real_valued_projections():
    """With arbitrary float projections no selected candidate scores below an unselected one."""
    query, q_proj, keys, values, codes, _ = make_inputs(5, 1, 3, 3, 2, 16, 3000, starts=False)
    q_proj = torch.randn(q_proj.shape)
    _, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=64, critical=180,
                               scaling=0.25, return_indices=True)
    scores = reference_scores(q_proj, codes, "kv_head", "asymmetric")
    cand = torch.zeros(3000, dtype=torch.bool)
    cand[4:3000 - 64] = True
    for h in range(3):
        sel = torch.zeros(3000, dtype=torch.bool)
        sel[idx[0, h]] = True
        s_in = scores[0, h][sel & cand]
        s_out = scores[0, h][~sel & cand]
        assert s_in.numel() == 180
        assert s_in.min() >= s_out.max() - 1e-4


def test_views_of_a_larger_buffer_match_contiguous():
    query, q_proj, keys, values, codes, start = make_inputs(11, 3, 3, 3, 2, 16, 900)
    cap = 1500
    kb = torch.randn(3, 3, cap, 16)
    vb = torch.randn(3, 3, cap, 16)
    cb = torch.randint(-2**63, 2**63 - 1, (3, 3, cap, 2))
    kb[:, :, :900] = keys
    vb[:, :, :900] = values
    cb[:, :, :900] = codes
    for grouping in ("kv_head", "query_head"):
        for scorer in ("asymmetric", "hamming"):
            kw = dict(sink=4, window=64, critical=100, scaling=0.25, grouping=grouping, scorer=scorer, start=start)
            a, ia = dashkv_decode_cpu(query, q_proj, keys, values, codes, return_indices=True, **kw)
            b, ib = dashkv_decode_cpu(query, q_proj, kb[:, :, :900], vb[:, :, :900], cb[:, :, :900],
                                      return_indices=True, **kw)
            assert torch.equal(ia, ib)
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # views that start inside their buffer (batch rows 2..4 of 5, one head of a bigger head dimension)
    kb5, vb5, cb5 = torch.randn(5, 4, cap, 16), torch.randn(5, 4, cap, 16), torch.randint(-2**63, 2**63 - 1, (5, 4, cap, 2))
    kb5[2:, 1:, :900], vb5[2:, 1:, :900], cb5[2:, 1:, :900] = keys, values, codes
    for scorer in ("asymmetric", "hamming"):
        kw = dict(sink=4, window=64, critical=100, scaling=0.25, scorer=scorer, start=start)
        a, ia = dashkv_decode_cpu(query, q_proj, keys, values, codes, return_indices=True, **kw)
        b, ib = dashkv_decode_cpu(query, q_proj, kb5[2:, 1:, :900], vb5[2:, 1:, :900], cb5[2:, 1:, :900],
                                  return_indices=True, **kw)
        assert torch.equal(ia, ib)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(dense_decode_cpu(query, kb5[2:, 1:, :900], vb5[2:, 1:, :900], 0.3, start),
                               dense_decode_cpu(query, keys, values, 0.3, start), atol=0, rtol=0)
    # a non-contiguous query and a transposed-storage key tensor are accepted (copied)
    qt = query.transpose(0, 1).contiguous().transpose(0, 1)
    kt = keys.transpose(2, 3).contiguous().transpose(2, 3)
    a = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=64, critical=100, scaling=0.25)
    b = dashkv_decode_cpu(qt, q_proj, kt, values, codes, sink=4, window=64, critical=100, scaling=0.25)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_empty_context_and_degenerate_start():
    query, q_proj, keys, values, codes, _ = make_inputs(2, 2, 3, 1, 1, 8, 10, starts=False)
    out = dashkv_decode_cpu(query, q_proj, keys[:, :, :0], values[:, :, :0], codes[:, :, :0], sink=4, window=4,
                            critical=4, scaling=0.3)
    assert out.shape == (2, 3, 8) and not out.any()
    out = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=4, critical=4, scaling=0.3,
                            start=torch.tensor([0, 10]))
    assert not out[1].any() and out[0].abs().sum() > 0


def test_rejects_bad_inputs():
    query, q_proj, keys, values, codes, _ = make_inputs(2, 1, 3, 1, 1, 8, 10, starts=False)
    with pytest.raises(TypeError):
        dashkv_decode_cpu(query, q_proj, keys.double(), values.double(), codes, sink=1, window=1, critical=1,
                          scaling=1.0)
    with pytest.raises(TypeError):
        dashkv_decode_cpu(query, q_proj, keys, values.bfloat16(), codes, sink=1, window=1, critical=1, scaling=1.0)
    with pytest.raises(ValueError):
        dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=1, window=1, critical=1, scaling=1.0,
                          grouping="nope")
    with pytest.raises(ValueError):
        dashkv_decode_cpu(query, q_proj[..., :32], keys, values, codes, sink=1, window=1, critical=1, scaling=1.0)


# ---------------------------------------------------------------------------------------------
# dense decode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 257, 3000])
@pytest.mark.parametrize("g,hkv", [(1, 2), (3, 3), (7, 1)])
def test_dense_decode(n, g, hkv):
    query, _, keys, values, _, start = make_inputs(n, 3, g, hkv, 1, 32, n)
    valid = torch.arange(n)[None, :] >= start[:, None]
    ref = masked_attention(query, keys, values, valid[:, None, :].expand(-1, g * hkv, -1), 0.17)
    torch.testing.assert_close(dense_decode_cpu(query, keys, values, 0.17, start), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_decode_cpu(query, keys, values, 0.17, start, parallel=False), ref,
                               atol=1e-5, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        k, v = keys.to(dtype), values.to(dtype)
        ref16 = masked_attention(query, k, v, valid[:, None, :].expand(-1, g * hkv, -1), 0.17)
        torch.testing.assert_close(dense_decode_cpu(query, k, v, 0.17, start, parallel=False), ref16,
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_decode_torch(query, keys, values, 0.17, start), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# against the lead's torch path (dashkv.selection / dashkv.attention)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
@pytest.mark.parametrize("scorer", ["asymmetric", "hamming"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_torch_selection_path(grouping, scorer, batch):
    selection = pytest.importorskip("dashkv.selection")
    attention = pytest.importorskip("dashkv.attention")
    from dashkv.codes import asymmetric_scores, hamming_similarity
    from dashkv.config import DashKVConfig

    n, g, hkv, d = 1800, 3, 3, 32
    query, q_proj, keys, values, codes, start = make_inputs(batch * 100 + 1, batch, g, hkv, 1, d, n)
    # integer projections: exact float32 scores on both paths, few ties (the lead's top-k is not stable)
    q_proj = torch.randint(-2**15, 2**15, q_proj.shape, generator=torch.Generator().manual_seed(batch)).float()
    cfg = DashKVConfig(min_context=0, bits=64, budget=1 / 16, sink=4, window=64, grouping=grouping, scorer=scorer)
    plan = cfg.plan(n)
    proj = q_proj.reshape(batch, hkv, g, -1)
    if scorer == "hamming":
        per_head = hamming_similarity(pack_bits(proj > 0), codes[:, :, None]).float().reshape(batch, -1, n)
    else:
        per_head = asymmetric_scores(proj, codes[:, :, None]).reshape(batch, -1, n)
    scores = per_head if grouping == "query_head" else per_head.reshape(batch, hkv, g, n).sum(2)
    out, idx = dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=plan.sink, window=plan.window,
                                 critical=plan.critical, scaling=d ** -0.5, grouping=grouping, scorer=scorer,
                                 start=start, return_indices=True)
    mine = indices_to_mask(idx, n)
    sel = selection.build_selection(scores, plan, start)
    lead_mask = torch.zeros(batch, sel.heads, n, dtype=torch.bool)
    lead_mask.scatter_(-1, sel.indices, sel.exact)
    # same fixed part, same counts, and no selected candidate scores below an unselected one
    assert torch.equal(mine.sum(-1), lead_mask.sum(-1))
    for b in range(batch):
        s0 = 0 if start is None else int(start[b])
        cand = torch.zeros(n, dtype=torch.bool)
        cand[s0 + plan.sink:n - plan.window] = True
        assert torch.equal(mine[b][:, ~cand], lead_mask[b][:, ~cand])
        for h in range(sel.heads):
            sc = scores[b, h]
            assert sc[mine[b, h] & cand].min() >= sc[~mine[b, h] & cand].max()
    if scorer == "asymmetric":  # integer scores, ties at the threshold are unlikely: same sets
        assert torch.equal(mine, lead_mask)
        ref = attention.sparse_decode_attention(query[:, :, None], keys, values, sel, d ** -0.5)[:, :, 0]
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # the lead's attention over *our* selection gives our output
    ours = selection.Selection(indices=idx.clamp(min=0), exact=idx >= 0)
    ref = attention.sparse_decode_attention(query[:, :, None], keys, values, ours, d ** -0.5)[:, :, 0]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the compiled linear encoders of a decode step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [64, 128])
def test_linear_encoders_match_torch(dtype, bits):
    from dashkv.kernels.cpu import encode_linear_cpu, linear_heads_cpu

    gen = torch.Generator().manual_seed(bits)
    b, h, t, d = 2, 3, 4, 16
    x = torch.randn(b, t, h, d, generator=gen).transpose(1, 2).to(dtype)  # non-contiguous, as the model's
    w = torch.randn(h, d, bits, generator=gen)
    bias = torch.randn(h, bits, generator=gen)
    ref = torch.einsum("bhtd,hdk->bhtk", x.double(), w.double()) + bias.double()[None, :, None]
    got = linear_heads_cpu(x, w.numpy(), bias.numpy())
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    codes = encode_linear_cpu(x, w.numpy(), bias.numpy())
    sure = ref.abs() > 1e-3  # signs a float32 rounding cannot flip
    assert torch.equal((unpack_codes(codes) == (ref > 0))[sure], torch.ones_like(ref, dtype=torch.bool)[sure])
    assert torch.equal(codes, pack_bits(got > 0))


def unpack_codes(codes):
    from dashkv.codes import unpack_bits

    return unpack_bits(codes)


def test_parallel_kernels_parallelise_only_their_pranges():
    """`parallel=True` would also turn every `np.zeros`/`.copy()` of the kernel into a parallel launch of
    its own (each waking the thread pool: 1.3 ms per call at 64K, measured); only prange may be."""
    query, q_proj, keys, values, codes = _bench_inputs(9, 3, 64, 512, 64, dtype=torch.float16)
    dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=8, critical=32, scaling=0.125,
                      parallel=True)  # a compile (or cache load) of one more signature consumes nothing
    for kernel in (cpu._dashkv_kernel, cpu._dense_kernel):
        opts = kernel.targetoptions["parallel"]._get_values()
        assert opts.pop("enabled") and opts.pop("prange"), opts
        assert not any(opts.values()), opts
