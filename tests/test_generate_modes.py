"""Every way people call generate on an enabled model: works (token-identical at full budget, fused and
reference paths agreeing at 1/16) or is refused by name. Tiny random fp32 models, no download."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from dashkv import hf
from dashkv.cache import DashKVCache, DashKVLayer
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.errors import DashKVError, UnsupportedCacheError, UnsupportedGenerationError
from dashkv.models import model_shape, tiny_model
from dashkv.selection import LayerState, make_policy

FULL = DashKVConfig(budget=1.0, dense_layers=())
SPARSE = DashKVConfig(budget=1 / 16, sink=4, window=8, dense_layers=())  # 40 of 640 tokens: really sparse


def _prompt(n=640, batch=1, seed=0):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _simhash(model, bits=64):
    s = model_shape(model)
    return HashEncoders.simhash(s.to_dict(), bits, s.full_attention_layers, seed=0)


def _learned(model, seed=0):
    """Random real-valued projections of the learned kind: asymmetric scores have no ties, so the fused
    kernel and the torch reference must pick the same tokens."""
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    enc = HashEncoders(s.to_dict(), 64, s.full_attention_layers)
    for p in enc.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return enc


def _greedy(**kw):
    return dict(do_sample=False, pad_token_id=0, **kw)


# ---- item 1: one owner of the configuration ---------------------------------------------------------
def test_simhash_scores_hamming_on_the_fused_and_the_reference_path():
    """The policy owns the scorer: the fused kernel run with `policy.scorer` selects tokens of exactly the
    Hamming scores the reference selection takes (compared as score multisets: Hamming ties are broken
    differently by the two paths), and the asymmetric scorer would select others."""
    from dashkv.kernels.cpu import dashkv_decode_cpu

    shape = dict(model_type="llama", num_layers=1, num_q_heads=6, num_kv_heads=2, head_dim=16)
    cfg = DashKVConfig(budget=48, sink=4, window=8, scorer="asymmetric")  # the user's scorer is overridden
    policy = make_policy("simhash", cfg, HashEncoders.simhash(shape, 64, [0], seed=1))
    assert policy.scorer == "hamming" and policy.config.scorer == "hamming"
    assert make_policy("simhash_asym", cfg, HashEncoders.simhash(shape, 64, [0], seed=1)).scorer == "asymmetric"
    g = torch.Generator().manual_seed(0)
    b, n = 2, 700
    keys, values = torch.randn(b, 2, n, 16, generator=g), torch.randn(b, 2, n, 16, generator=g)
    q = torch.randn(b, 6, 16, generator=g)
    state = LayerState(layer_idx=0, codes=policy.encode_keys(0, keys))
    plan = policy.config.plan(n)
    ref = policy.select(state, q, keys, plan, 0.25, None)
    scores = policy.score(state, q, keys, 0.25)  # (B, Hkv, N) Hamming similarities

    def picked(indices, ok):
        return [sorted(scores[i, h][indices[i, h][ok[i, h]]].tolist()) for i in range(b) for h in range(2)]

    want = picked(ref.indices, ref.exact)
    for scorer, same in ((policy.scorer, True), ("asymmetric", False)):
        _, idx = dashkv_decode_cpu(q, policy.query_projection(0, q), keys, values, state.codes, sink=plan.sink,
                                   window=plan.window, critical=plan.critical, scaling=0.25,
                                   scorer=scorer, return_indices=True)
        assert (picked(idx.clamp(min=0), idx >= 0) == want) is same, scorer


@pytest.mark.parametrize("method,scorer", [("simhash", "hamming"), ("simhash_asym", "asymmetric"),
                                           ("dashkv", "asymmetric")])
def test_generate_runs_the_policys_scorer_in_the_fused_kernel(monkeypatch, method, scorer):
    import dashkv.kernels.cpu as cpu

    seen = []
    real = cpu.dashkv_decode_cpu

    def spy(*args, **kw):
        seen.append(kw["scorer"])
        return real(*args, **kw)

    monkeypatch.setattr(cpu, "dashkv_decode_cpu", spy)
    model = tiny_model("llama")
    enc = _learned(model) if method == "dashkv" else None
    with hf.enable(model, enc, DashKVConfig(budget=40, dense_layers=(), scorer="asymmetric"), method=method) as h:
        seen.clear()  # enable warms the kernels with both scorers
        model.generate(_prompt(300), max_new_tokens=3, **_greedy())
        assert h.config is h.policy.config
    assert seen and set(seen) == {scorer}


def test_the_attention_function_gets_its_layer_from_the_call_kwargs():
    model = tiny_model("llama")
    handle = hf.enable(model, _simhash(model), SPARSE)
    assert not hasattr(handle, "live_layers")
    got = []
    real = hf.decode_step

    def spy(policy, state, *a, **kw):
        got.append(state)
        return real(policy, state, *a, **kw)

    try:
        hf.decode_step = spy
        out = model.generate(_prompt(), max_new_tokens=2, return_dict_in_generate=True, **_greedy())
    finally:
        hf.decode_step = real
        hf.disable(model)
    layers = [out.cache.layers[i] for i in handle.managed_layers]
    assert all(isinstance(layer, DashKVLayer) for layer in layers)
    assert {id(s) for s in got} == {id(layer.state) for layer in layers}


# ---- item 2: memory ----------------------------------------------------------------------------------
def _held() -> tuple[int, int]:
    """(bytes of all live tensor storages, live DashKVLayer objects), after a full collection."""
    gc.collect()
    seen, total, layers = set(), 0, 0
    with warnings.catch_warnings():  # isinstance on some torch objects warns about deprecations
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, (DashKVLayer, torch.Tensor))]
    for obj in objects:
        if isinstance(obj, DashKVLayer):
            layers += 1
        elif isinstance(obj, torch.Tensor):
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total, layers


def test_memory_returns_to_baseline_after_generate_and_after_disable():
    model = tiny_model("llama")
    handle = hf.enable(model, _simhash(model), SPARSE, track=True)
    ids = _prompt()
    model.generate(ids, max_new_tokens=4, **_greedy())  # anything built lazily on first use exists now
    base = _held()
    assert base[1] == 0
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **_greedy())
    during = _held()
    assert during[1] == len(handle.managed_layers) and during[0] > base[0] + 640 * 2 * 16 * 4 * 2
    del out
    assert _held() == base
    model.generate(ids, max_new_tokens=4, **_greedy())  # the result is not even kept
    assert _held() == base
    hf.disable(model)
    assert _held()[1] == 0
