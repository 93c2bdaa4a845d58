"""The fused CPU decode path against the torch reference path inside real `generate` calls:
half-precision K/V, left-padded batches, and the one-time warning when a step leaves the fused path."""

import logging

import pytest
import torch

from dashkv import _logging, hf
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import model_shape, tiny_model

SPARSE = DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, k_min=4, dense_layers=())


def _simhash(model):
    s = model_shape(model)
    return HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=0)


def _generate(model, ids, fast, mask=None, config=SPARSE, **kw):
    with hf.enable(model, _simhash(model), config, track=True) as handle:
        handle.fast = fast
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kw)
        fraction = handle.stats.fraction
    return out, fraction


def _step_logits(model, ids, fast, mask=None):
    """Logits of the first decode step after a dense prefill (same cache contents on both paths)."""
    with hf.enable(model, _simhash(model), SPARSE) as handle, torch.no_grad():
        handle.fast = fast
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask2 = None if mask is None else torch.cat([mask, torch.ones_like(nxt)], 1)
        return model(input_ids=nxt, attention_mask=mask2, cache=out.cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fused_matches_reference(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(3, 500, (1, 700), generator=torch.Generator().manual_seed(1))
    fast_logits = _step_logits(model, ids, fast=True).float()
    ref_logits = _step_logits(model, ids, fast=False).float()
    torch.testing.assert_close(fast_logits, ref_logits, atol=0.05, rtol=0.02)  # a few bf16 ulps of the logits
    fast, frac = _generate(model, ids, fast=True)
    ref, _ = _generate(model, ids, fast=False)
    assert frac < 0.2  # it really was sparse
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_left_padded_batch_fused_matches_reference(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 500, (3, 800), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :150] = 0
    mask[2, :420] = 0
    ids = ids.masked_fill(mask == 0, 0)
    torch.testing.assert_close(_step_logits(model, ids, True, mask), _step_logits(model, ids, False, mask),
                               atol=1e-4, rtol=1e-4)
    fast, frac = _generate(model, ids, True, mask)
    ref, _ = _generate(model, ids, False, mask)
    assert frac < 0.2
    assert torch.equal(fast, ref)


def test_fallback_to_reference_path_warns_once(caplog):
    _logging.reset_warnings()
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 300), generator=torch.Generator().manual_seed(3))
    adaptive = DashKVConfig(min_context=0, budget=1 / 8, sink=4, window=8, adaptive=True, dense_layers=())
    with caplog.at_level(logging.WARNING, logger="dashkv"):
        _generate(model, ids, True, config=adaptive)
        _generate(model, ids, True, config=adaptive)
    hits = [r for r in caplog.records if "reference path" in r.getMessage()]
    assert len(hits) == 1 and "adaptive=True" in hits[0].getMessage()


@pytest.mark.parametrize("overrides, dtype, fused", [
    ({}, torch.float32, True),
    ({}, torch.bfloat16, True),
    ({}, torch.float64, False),
    ({"adaptive": True}, torch.float32, False),
    ({"temporal": 0.25}, torch.float32, False),
    ({"spatial_vote": 0.5}, torch.float32, False),
    ({"rerank": 4}, torch.float32, True),
    ({"head_budget": "pooled"}, torch.float32, True),
    ({"rerank": 4, "head_budget": "pooled"}, torch.float32, False),
    ({"lowprec_fraction": 0.5}, torch.float32, True),
    ({"lowprec_fraction": 0.5, "rerank": 4}, torch.float32, False),
    ({"lowprec_fraction": 0.5, "head_budget": "pooled"}, torch.float32, False),
    ({"query_bits": 4}, torch.float16, True),
])
def test_the_kernel_choice_and_the_warning_share_one_rule(overrides, dtype, fused):
    """`_fast_kernel` (every step) and `hf.enable`'s warning (once) read the same reasons: a fused
    configuration has none, a reference-path one names what sent it there."""
    from dashkv.decode import _fast_kernel, reference_path_reasons
    from dashkv.selection import DashKVPolicy

    model = tiny_model("llama")
    cfg = DashKVConfig(min_context=0, dense_layers=(), **overrides)
    policy = DashKVPolicy(cfg, _simhash(model))
    keys = torch.zeros(1, 2, 8, 16, dtype=dtype)
    reasons = reference_path_reasons(cfg, "cpu", dtype)
    assert (not reasons) == fused, reasons
    assert (_fast_kernel(policy, cfg, keys) is not None) == fused
    if not fused and overrides:  # the reasons name an option that was set
        assert any(key in r for key in overrides for r in reasons), reasons
    assert reference_path_reasons(DashKVConfig(), "mps", torch.float32)  # no fused kernel there


def test_codes_wait_for_min_context_then_cover_every_key():
    """Below min_context steps are dense and no key is encoded; the first step past it encodes the
    backlog, so the sparse steps after it see a code for every cached key."""
    model = tiny_model("llama")
    cfg = DashKVConfig(budget=1 / 8, sink=4, window=8, k_min=4, dense_layers=(), min_context=300)
    ids = torch.randint(3, 500, (1, 250), generator=torch.Generator().manual_seed(4))
    enc = _simhash(model)
    with hf.enable(model, enc, cfg, track=True) as handle, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        layer = cache.layers[handle.managed_layers[0]]
        assert layer.coded == 0 and layer.state.codes is None
        for _ in range(80):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        for i in handle.managed_layers:
            layer = cache.layers[i]
            assert layer.coded == layer.length == 330
            assert torch.equal(layer.state.codes, enc.encode_keys(i, layer.keys))
        assert handle.stats.fraction < 1.0  # the steps past min_context were sparse
    outs = []
    for fast in (True, False):  # the crossing inside generate: fused and reference paths agree
        with hf.enable(model, enc, cfg) as handle:
            handle.fast = fast
            outs.append(model.generate(ids, max_new_tokens=80, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype,dense", [(torch.bfloat16, True), (torch.float32, False)])
def test_default_min_context_follows_the_kv_dtype(dtype, dense):
    """With the default config a 3K context decodes densely from a bf16 cache (its measured crossover is
    5120) and selects from an fp32 one (2560): no key is encoded on the dense side."""
    model = tiny_model("llama", dtype=dtype)
    cfg = DashKVConfig(budget=1 / 16, sink=4, window=8, k_min=4, dense_layers=())
    ids = torch.randint(3, 500, (1, 3000), generator=torch.Generator().manual_seed(5))
    with hf.enable(model, _simhash(model), cfg, track=True) as handle, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        layer = out.cache.layers[handle.managed_layers[0]]
        assert (layer.state.codes is None) == dense
        assert (handle.stats.fraction == 1.0) == dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_append_writes_what_the_general_append_writes(dtype, monkeypatch):
    """The decode step's one-call append (K/V rows + codes, `append_coded_cpu`) leaves the cache exactly as
    the general path (slice copies + `encode_linear_cpu`) does, and is what decoding actually runs."""
    from dashkv import cache as cache_mod
    from dashkv.kernels import cpu

    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(4))
    calls = []
    real = cpu.append_coded_cpu
    monkeypatch.setattr(cpu, "append_coded_cpu", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))

    def run(fast_append):
        if not fast_append:
            monkeypatch.setattr(cache_mod.DashKVLayer, "_append_fast", lambda self, k, v: False)
        with hf.enable(model, _simhash(model), SPARSE) as handle, torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
            layers = [layer for layer in out.past_key_values.layers if getattr(layer, "managed", False)]
            return out.sequences, [(l.keys.clone(), l.values.clone(), l.state.codes.clone()) for l in layers], \
                handle.encoders

    seq_fast, fast, enc = run(True)
    assert len(calls) == 5 * len(fast)  # every decode token of every managed layer took the one-call append
    seq_ref, ref, _ = run(False)
    assert torch.equal(seq_fast, seq_ref)
    for i, ((kf, vf, cf), (kr, vr, cr)) in enumerate(zip(fast, ref)):
        assert torch.equal(kf, kr) and torch.equal(vf, vr) and torch.equal(cf, cr), i
    layer_ids = model_shape(model).full_attention_layers
    for li, (k, _, c) in zip(layer_ids, fast):  # and the codes are the encoders' codes of the cached keys
        assert torch.equal(c, enc.encode_keys(li, k))


def test_fused_append_on_a_deep_copied_cache_writes_the_copy():
    """Prefix reuse (`copy.deepcopy(prompt_cache)`, as transformers documents) must not append into the
    original's buffers or into orphaned copies of the kernel views."""
    import copy

    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 300), generator=torch.Generator().manual_seed(7))
    with hf.enable(model, _simhash(model), SPARSE), torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        original = out.past_key_values
        model(input_ids=nxt, cache=original, use_cache=True)  # one step: views now exist
        twin = copy.deepcopy(original)
        step = torch.tensor([[11]])
        a = model(input_ids=step, cache=original, use_cache=True).logits
        b = model(input_ids=step, cache=twin, use_cache=True).logits
    assert torch.equal(a, b)
    for la, lb in zip(original.layers, twin.layers):
        if getattr(la, "managed", False):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
            assert torch.equal(la.state.codes, lb.state.codes)
            assert la.keys.data_ptr() != lb.keys.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [dict(lowprec_fraction=0.5), dict(rerank=4), dict(rerank=2, rerank_bits=4)])
def test_fused_append_writes_the_int8_copies_as_quantize_does(dtype, extra, monkeypatch):
    """With the re-rank stage or the 8-bit tier the cache keeps int8 (or packed int4) copies of K (and V):
    the one-call append writes them value for value as `QuantizedRows.quantize` (the general path) does."""
    from dashkv import cache as cache_mod
    from dashkv.kernels import cpu

    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(5))
    cfg = DashKVConfig(**{**SPARSE.to_dict(), **extra})
    calls = []
    real = cpu.append_int8_cpu
    monkeypatch.setattr(cpu, "append_int8_cpu", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))

    def run(fast_append):
        if not fast_append:
            monkeypatch.setattr(cache_mod.DashKVLayer, "_append_fast", lambda self, k, v: False)
        with hf.enable(model, _simhash(model), cfg), torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
            layers = [layer for layer in out.past_key_values.layers if getattr(layer, "managed", False)]
            return out.sequences, [{n: b[:, :, :l.length].clone() for n, b in l._buffers.items()} for l in layers]

    seq_fast, fast = run(True)
    copies = 2 if "lowprec_fraction" in extra else 1
    assert len(calls) == 4 * len(fast) * copies  # every decode token after the first took it
    seq_ref, ref = run(False)
    assert torch.equal(seq_fast, seq_ref)
    for f, r in zip(fast, ref):
        assert set(f) == set(r) and ({"k4", "k4s"} if extra.get("rerank_bits") == 4 else {"k8", "k8s"}) <= set(f)
        for name in f:
            assert torch.equal(f[name], r[name]), name
