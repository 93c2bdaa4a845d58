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

FULL = DashKVConfig(min_context=0, budget=1.0, dense_layers=())
SPARSE = DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, dense_layers=())  # 40 of 640 tokens: really sparse


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
    cfg = DashKVConfig(min_context=0, budget=48, sink=4, window=8, scorer="asymmetric")  # the user's scorer is overridden
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
    with hf.enable(model, enc, DashKVConfig(min_context=0, budget=40, dense_layers=(), scorer="asymmetric"), method=method) as h:
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


# ---- item 3: in-place crop / reorder ---------------------------------------------------------------
def _filled_layer(method="h2o", b=3, n=50):
    from dashkv.cache import DecodeContext

    shape = dict(model_type="llama", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8)
    policy = make_policy(method, DashKVConfig(min_context=0, budget=16), HashEncoders.simhash(shape, 64, [0], seed=0))
    layer = DashKVLayer(0, DecodeContext(policy))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, 2, n, 8, generator=g), torch.randn(b, 2, n, 8, generator=g)
    layer.update(k, v)
    layer.state.stats["acc"] = torch.arange(b * 2 * n, dtype=torch.float32).reshape(b, 2, n)
    return layer, k, v


def test_crop_is_constant_time_and_crops_policy_statistics():
    layer, k, v = _filled_layer()
    ptr = layer._buffers["k"].data_ptr()
    layer.crop(-7)
    assert layer.get_seq_length() == 43 and layer._buffers["k"].data_ptr() == ptr  # no copy
    assert torch.equal(layer.keys, k[:, :, :43]) and torch.equal(layer.values, v[:, :, :43])
    assert layer.state.stats["acc"].shape == (3, 2, 43)
    layer.update(k[:, :, :2], v[:, :, :2])  # appends over the cropped tail, in place
    assert layer._buffers["k"].data_ptr() == ptr and torch.equal(layer.keys[:, :, 43:], k[:, :, :2])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)


@pytest.mark.parametrize("op", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_reorder_and_batch_selection_keep_codes_and_statistics_aligned(op):
    from transformers.cache_utils import DynamicLayer

    layer, k, v = _filled_layer("simhash")
    acc = layer.state.stats["acc"].clone()
    ref = DynamicLayer()
    ref.update(k, v)
    arg = {"reorder_cache": torch.tensor([2, 0, 0]), "batch_select_indices": torch.tensor([1, 2]),
           "batch_repeat_interleave": 2}[op]
    getattr(layer, op)(arg)
    getattr(ref, op)(arg)
    rows = torch.arange(3).repeat_interleave(2) if op == "batch_repeat_interleave" else arg
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert torch.equal(layer.state.codes, layer.ctx.policy.encode_keys(0, ref.keys))
    assert torch.equal(layer.state.stats["acc"], acc[rows])
    layer.update(k[:1].expand(len(rows), -1, -1, -1)[:, :, :1], v[:1].expand(len(rows), -1, -1, -1)[:, :, :1])
    assert layer.get_seq_length() == 51


def test_a_statistic_the_cache_cannot_reorder_is_refused():
    layer, _, _ = _filled_layer()
    layer.state.stats["note"] = "not a tensor"
    with pytest.raises(UnsupportedCacheError, match="'note'"):
        layer.reorder_cache(torch.tensor([0, 1, 2]))


# ---- item 4: generate modes ------------------------------------------------------------------------
def _run(model, ids, handles_cfg, fast=True, seed=None, attention_mask=None, fractions=None, **kw):
    """generate with DASH-KV enabled on each (model, encoders, config) of `handles_cfg`, then disabled;
    `fractions` receives the share of the context each enabled model's decode steps read."""
    handles = [hf.enable(m, enc, cfg, track=True) for m, enc, cfg in handles_cfg]
    for h in handles:
        h.fast = fast
    try:
        if seed is not None:
            torch.manual_seed(seed)
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        return model.generate(ids, attention_mask=mask, **kw)
    finally:
        for h in handles:
            h.disable()
            if fractions is not None:
                fractions.append(h.stats.fraction if h.stats.steps else None)


def _check_mode(model, ids, enabled, **kw):
    """Full budget: token-identical to the unmodified model; 1/16: fused and reference paths agree."""
    ref = _run(model, ids, [], **kw)
    full = _run(model, ids, [(m, _simhash(m), FULL) for m in enabled], **kw)
    assert torch.equal(full, ref)
    sparse = [(m, _learned(m), SPARSE) for m in enabled]
    fractions = []
    fused = _run(model, ids, sparse, fast=True, fractions=fractions, **kw)
    reference = _run(model, ids, sparse, fast=False, **kw)
    assert torch.equal(fused, reference)
    assert all(f is not None and f < 0.1 for f in fractions), fractions  # every enabled model decoded sparsely
    return ref, fused


@pytest.fixture(scope="module")
def pair():
    main = tiny_model("llama", seed=0)
    draft = tiny_model("llama", seed=1, num_layers=2)
    return main, draft


@pytest.mark.parametrize("where", ["main", "draft", "both"])
def test_assisted_generation_with_a_draft_model(pair, where):
    main, draft = pair
    enabled = {"main": [main], "draft": [draft], "both": [main, draft]}[where]
    _check_mode(main, _prompt(), enabled, assistant_model=draft, max_new_tokens=10, **_greedy())


def test_prompt_lookup_decoding(pair):
    main, _ = pair
    ids = _prompt(80, seed=4).repeat(1, 8)  # 640 tokens of a repeated phrase: lookups find candidates
    _check_mode(main, ids, [main], prompt_lookup_num_tokens=4, max_new_tokens=12, **_greedy())


def test_beam_search(pair):
    main, _ = pair
    _check_mode(main, _prompt(seed=5), [main], num_beams=3, max_new_tokens=6, **_greedy())


def test_left_padded_batch_with_sampling_under_a_fixed_seed(pair):
    main, _ = pair
    ids = _prompt(batch=3, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :90] = 0
    mask[2, :13] = 0
    ids = ids.masked_fill(mask == 0, 0)
    _check_mode(main, ids, [main], attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=8,
                pad_token_id=0, seed=11)


def _two_turns(model, ids, more, **kw):
    first = model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **kw)
    ids2 = torch.cat([first.sequences, more], 1)
    second = model.generate(ids2, attention_mask=torch.ones_like(ids2), cache=first.cache, **kw)
    return first.cache, second


def test_multi_turn_reuse_of_the_returned_cache(pair):
    main, _ = pair
    ids, more = _prompt(seed=7), _prompt(30, seed=8)
    kw = dict(max_new_tokens=6, **_greedy())
    _, ref = _two_turns(main, ids, more, **kw)
    with hf.enable(main, _simhash(main), FULL):
        cache, full = _two_turns(main, ids, more, **kw)
        assert isinstance(cache, DashKVCache)
    assert torch.equal(full, ref)
    outs = []
    for fast in (True, False):
        with hf.enable(main, _learned(main), SPARSE) as h:
            h.fast = fast
            outs.append(_two_turns(main, ids, more, **kw)[1])
    assert torch.equal(outs[0], outs[1])


def test_a_users_dynamic_cache_is_filled_in_place_empty_or_prefilled(pair):
    from transformers.cache_utils import DynamicCache

    main, _ = pair
    ids = _prompt(seed=9)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, **_greedy())
    ref_cache = DynamicCache(config=main.config)
    ref = main.generate(ids, cache=ref_cache, **kw)
    with hf.enable(main, _simhash(main), FULL) as h:
        mine = DynamicCache(config=main.config)
        out = main.generate(ids, cache=mine, **kw)
        assert all(isinstance(mine.layers[i], DashKVLayer) for i in h.managed_layers)  # the user's object
        assert mine.get_seq_length() == ref_cache.get_seq_length()
    assert torch.equal(out, ref)
    # a cache prefilled by the unmodified model: DASH-KV takes it over and continues from it
    prefill = DynamicCache(config=main.config)
    with torch.no_grad():
        main(ids[:, :-1], cache=prefill, use_cache=True)
    dense_copy = DynamicCache(config=main.config)
    with torch.no_grad():
        main(ids[:, :-1], cache=dense_copy, use_cache=True)
    ref2 = main.generate(ids, cache=dense_copy, **kw)
    with hf.enable(main, _learned(main), SPARSE, track=True) as h:
        out2 = main.generate(ids, cache=prefill, **kw)
        assert h.stats.per_step and all(read < 100 for _, _, read in h.stats.per_step)  # it is sparse
    assert out2.shape == ref2.shape and torch.equal(out2[:, :640], ref2[:, :640])


@pytest.mark.parametrize("kw,name", [
    (dict(cache_implementation="static"), "cache_implementation='static'"),
    (dict(cache_implementation="offloaded"), "cache_implementation='offloaded'"),
    (dict(cache_implementation="quantized"), "cache_implementation='quantized'"),
    (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
    (dict(dola_layers="high"), "DoLa"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "group beam search"),
    (dict(num_beams=2, force_words_ids=[[5]]), "constrained beam search"),
    (dict(assistant_early_exit=1), "assistant_early_exit"),
])
def test_unsupported_generate_modes_are_refused_by_name(pair, kw, name):
    main, _ = pair
    with hf.enable(main, _simhash(main), SPARSE):
        with pytest.raises(DashKVError, match=name.replace("(", r"\(").replace(")", r"\)")):
            main.generate(_prompt(40), max_new_tokens=2, pad_token_id=0, **kw)
    assert main.generate(_prompt(40), max_new_tokens=2, pad_token_id=0).shape == (1, 42)  # disabled again


def test_cache_objects_dashkv_cannot_decode_from_are_refused_by_name(pair):
    from transformers.cache_utils import DynamicCache, StaticCache

    main, _ = pair
    ids = _prompt(40)
    with hf.enable(main, _simhash(main), SPARSE):
        with pytest.raises(UnsupportedCacheError, match="StaticCache"):
            main.generate(ids, cache=StaticCache(config=main.config, max_cache_len=64), max_new_tokens=2,
                          pad_token_id=0)
        with pytest.raises(UnsupportedCacheError, match="StaticCache"):
            main(ids, cache=StaticCache(config=main.config, max_cache_len=64), use_cache=True)  # plain forward
        with pytest.raises(UnsupportedCacheError, match="offloaded"):
            main(ids, cache=DynamicCache(config=main.config, offloading=True), use_cache=True)

        class MyCache(DynamicCache):
            pass

        with pytest.raises(UnsupportedCacheError, match="MyCache"):
            main(ids, cache=MyCache(config=main.config), use_cache=True)
        with pytest.raises(UnsupportedGenerationError):
            main.generate(ids, max_new_tokens=2, penalty_alpha=0.5, top_k=3)
