"""DASH-KV inside Hugging Face transformers: `enable(model, encoders, config)` / `disable(model)`.

How it plugs in, using only transformers' public extension points:
- an attention function registered as "dashkv" in `AttentionInterface` (with the sdpa mask builder);
  prefill, sliding-window layers, dense layers and training run transformers' own sdpa attention, and
  single-token decode steps on managed layers run `dashkv.decode.decode_step`. The function finds the
  layer's `DashKVLayer` in its own call arguments (see `dashkv.cache`), not in a table on the handle;
- a forward pre-hook on the decoder that gives a call without a cache a `DashKVCache`, makes a plain
  `DynamicCache` (the user's, or generate's default) DASH-KV-managed in place, and refuses by name any
  cache it cannot decode from (static, offloaded, quantized, ...);
- `model.generate` is wrapped to refuse, by name, the generation modes DASH-KV does not support;
- `disable` removes all three and restores the previous attention implementation, so logits are
  bit-identical to the unmodified model again.

The handle holds the configuration (through its policy) and no per-call state: each cache carries its
own `DecodeContext`, so concurrent generate calls on one model share nothing mutable, and a finished
call's cache is freed as soon as the caller drops it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ._logging import get_logger, warn_once
from .cache import (LAYER_KWARG, CallStats, DashKVCache, DashKVLayer, DecodeContext, StatsTotal, adopt,
                    start_from_mask)
from .config import DashKVConfig
from .decode import StepStats, decode_step, dense_decode, reference_path_reasons
from .encoders import HashEncoders
from .errors import UnsupportedCacheError, UnsupportedGenerationError
from .kernels import CPU_KV_DTYPES
from .models import check_context_length, check_supported, model_shape
from .selection import SelectionPolicy, make_policy

logger = get_logger(__name__)

ATTN_NAME = "dashkv"
_HANDLE_ATTR = "_dashkv_handle"
_DEFAULT_ENCODERS = Path(__file__).parent / "data" / "encoders"
_CODE_METHODS = ("dashkv", "dashkv_rerank", "simhash", "simhash_asym")
_LEARNED_METHODS = ("dashkv", "dashkv_rerank")  # methods that use the calibrated encoders


class DashKVHandle:
    """What `enable` returns: DASH-KV's configuration for one model; a context manager that disables.

    It holds no per-call state: `stats` is a total over all calls since enable (or `reset_stats`),
    added to under a lock; each call's own statistics are on its cache (`cache.stats`).
    """

    def __init__(self, model: Any, policy: SelectionPolicy | None, config: DashKVConfig, method: str,
                 managed_layers: tuple[int, ...], track: bool, encoders: HashEncoders | None = None):
        self.model = model
        self.policy = policy
        self._config = config
        self.method = method
        self.managed_layers = managed_layers
        self.encoders = encoders
        self.track = track
        self._totals = StatsTotal()
        self.fast = True  # fused kernels for the default configuration (tests flip it to compare paths)
        self.active = True
        self._previous_attn: str | None = None
        self._hook = None
        self.max_positions: int | None = None
        self.calibrated_length: int | None = None

    @property
    def config(self) -> DashKVConfig:
        """The configuration decode steps run with: the policy's own (its single owner)."""
        return self.policy.config if self.policy is not None else self._config

    @property
    def stats(self) -> StepStats | None:
        return self._totals.stats if self.track else None

    def new_context(self) -> DecodeContext:
        """Per-call state for one new cache."""
        return DecodeContext(self.policy, fast=self.fast, stats=CallStats(self._totals) if self.track else None,
                             calibrated_length=self.calibrated_length)

    def new_cache(self) -> DashKVCache:
        return DashKVCache(self.model.config, self.new_context(), self.managed_layers)

    def cache_from(self, source: Any) -> DashKVCache:
        """A DashKVCache holding the same tokens as `source` (any transformers cache, e.g. one prefilled
        by the unmodified model): keys are encoded with this handle's encoders as they are copied in.
        Lets several methods decode from one prefill (prefill is dense and identical for all of them)."""
        cache = self.new_cache()
        for i, layer in enumerate(source.layers):
            if not isinstance(cache.layers[i], DashKVLayer):
                cache.layers[i] = copy.deepcopy(layer)  # dense / sliding layers: exactly as they were
            elif getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
                cache.layers[i].update(layer.keys, layer.values)  # copied into our buffers, codes encoded
        return cache

    def reset_stats(self) -> None:
        """Start a new total (and track calls from now on)."""
        self.track = True
        self._totals.reset()

    def disable(self) -> None:
        disable(self.model)

    def __enter__(self) -> "DashKVHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.disable()

    def __repr__(self) -> str:
        return (f"DashKVHandle(method={self.method!r}, budget={self.config.budget!r}, bits={self.config.bits}, "
                f"layers={len(self.managed_layers)}, active={self.active})")


def default_encoders(shape: Any, bits: int = 64) -> HashEncoders | None:
    """The shipped encoders if `shape` is the default model's (SmolLM2-135M-Instruct), else None."""
    d = _DEFAULT_ENCODERS / f"smollm2-135m-b{bits}"
    if not d.is_dir():
        return None
    enc = HashEncoders.from_pretrained(d)
    theirs = {f: enc.shape[f] for f in enc.shape}
    ours = {f: getattr(shape, f) for f in theirs}
    return enc if theirs == ours else None


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def enable(model: Any, encoders: HashEncoders | None = None, config: DashKVConfig | None = None, *,
           method: str = "dashkv", track: bool = False, allow_mismatch: bool = False) -> DashKVHandle:
    """Switch `model` to DASH-KV decoding (or to another selection `method`, for comparisons).

    encoders: required for "dashkv" unless the model is the default model (its encoders ship with
    dashkv); "simhash" / "simhash_asym" build random hyperplanes of `config.bits`. Encoders are checked
    against the model's shape and, when they record one, the fingerprint of the attention weights they
    were calibrated on (`allow_mismatch=True` accepts other weights). They are moved to the model's
    device. Enabling an enabled model replaces its configuration. `track=True` counts the tokens every
    decode step reads (`handle.stats`, and per call `cache.stats`).
    """
    check_supported(model)
    config = config or DashKVConfig()
    shape = model_shape(model)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        disable(model)
    if getattr(model, "training", False):
        warn_once(logger, "training", "dashkv: the model is in training mode; attention stays dense until "
                  "model.eval()")

    candidates = [i for i in shape.full_attention_layers if i not in config.dense_layers]
    if method in _LEARNED_METHODS:
        if encoders is None:
            encoders = default_encoders(shape, config.bits)
            if encoders is None:
                raise ValueError(
                    f"no encoders given for this {shape.model_type} model ({shape.num_layers} layers); "
                    "calibrate them with `dashkv calibrate --model ... --out DIR` and pass "
                    "HashEncoders.from_pretrained(DIR)")
        encoders.check_compatible(model, bits=config.bits, allow_mismatch=allow_mismatch)
        managed = tuple(i for i in candidates if encoders.has_layer(i))
    elif method in ("simhash", "simhash_asym"):
        if encoders is None or encoders.kind != "simhash":
            encoders = HashEncoders.simhash(shape.to_dict(), config.bits, candidates, seed=0)
        managed = tuple(candidates)
    else:
        managed = tuple(candidates)
        encoders = None
    device = _model_device(model)
    if encoders is not None:
        encoders.to(device)  # fp32 stays: projections run in fp32 whatever the model's dtype (signs of codes)
    policy = make_policy(method, config, encoders)
    _warn_fallbacks(model, shape, policy, managed, device)

    if policy is not None and policy.uses_codes and device.type == "cpu":
        _warm_cpu_kernels(model.dtype)
    handle = DashKVHandle(model, policy, config, method, managed, track, encoders)
    handle.max_positions = shape.max_position_embeddings
    if encoders is not None and method in _LEARNED_METHODS:
        handle.calibrated_length = encoders.calibrated_length
    _register_attention()
    handle._previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    for module in model.modules():
        if getattr(module, "layer_idx", None) in managed and hasattr(module, "o_proj"):
            setattr(module, _HANDLE_ATTR, handle)
    setattr(model, _HANDLE_ATTR, handle)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handle._hook = decoder.register_forward_pre_hook(_inject_cache(handle), with_kwargs=True)
    _wrap_generate(model, handle)
    return handle


def disable(model: Any) -> None:
    """Restore the unmodified model (no-op if DASH-KV is not enabled)."""
    handle: DashKVHandle | None = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return
    if handle._hook is not None:
        handle._hook.remove()
    _unwrap_generate(model, handle)
    model.set_attn_implementation(handle._previous_attn or "sdpa")
    for module in model.modules():
        if hasattr(module, _HANDLE_ATTR):
            delattr(module, _HANDLE_ATTR)
    handle.active = False


def is_enabled(model: Any) -> bool:
    return getattr(model, _HANDLE_ATTR, None) is not None


def _warn_fallbacks(model: Any, shape: Any, policy: SelectionPolicy | None, managed: tuple[int, ...],
                    device: torch.device) -> None:
    """One warning per process for each configuration that silently runs denser or slower than asked."""
    if policy is None:
        return
    if not managed:
        why = ("every layer is sliding-window" if not shape.full_attention_layers
               else "every full-attention layer is in dense_layers or has no encoder")
        warn_once(logger, ("no-managed-layer", shape.model_type, why),
                  "dashkv: no layer of this %s model is managed (%s): generation stays dense",
                  shape.model_type, why)
        return
    if not policy.uses_codes:
        return
    reasons = reference_path_reasons(policy.config, device.type, getattr(model, "dtype", torch.float32),
                                     getattr(policy, "pq", False))
    if reasons:
        warn_once(logger, ("reference-path", tuple(reasons)),
                  "dashkv: decode steps run the torch reference path, not the fused kernels (%s): correct but "
                  "slower", "; ".join(reasons))


_KERNELS_WARM: set = set()


def _warm_cpu_kernels(dtype: torch.dtype) -> None:
    """Compile (first run ever) or load (later processes, ~1 s) the fused CPU kernels for this K/V dtype
    once per process, at enable time, so the cost never lands inside the first decode step a user or a
    benchmark times."""
    if dtype in _KERNELS_WARM:
        return
    try:
        from .kernels.cpu import warmup
    except ImportError:  # numba missing: the torch reference path serves
        return
    if dtype in CPU_KV_DTYPES:
        warmup((dtype,))
    _KERNELS_WARM.add(dtype)


# ---- generate modes ---------------------------------------------------------------------------------
_REFUSED_MODES = {
    "contrastive_search": "contrastive search (penalty_alpha > 0 with top_k > 1)",
    "dola_generation": "DoLa decoding (dola_layers)",
    "group_beam_search": "group beam search (num_beam_groups > 1)",
    "constrained_beam_search": "constrained beam search (constraints / force_words_ids)",
}
_CACHE_IMPLEMENTATIONS = {
    "static": "DASH-KV keeps its own cache (K, V and key codes, grown in place); a StaticCache's fixed "
              "shapes (for torch.compile) cannot hold the codes",
    "offloaded": "every decode step reads the key codes of the whole context, so offloading the cache "
                 "between layers would move it back at every step",
    "quantized": "DASH-KV reads full-precision keys for its exact tier (use DashKVConfig.lowprec_fraction "
                 "for an 8-bit tier)",
}


def _check_generate_call(model: Any, kwargs: dict) -> None:
    """Refuse, by name, a generate call whose mode or cache DASH-KV does not support."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if gc is None:
        return
    gc = copy.deepcopy(gc)
    gc.update(**{k: v for k, v in kwargs.items() if hasattr(gc, k) and k != "generation_config"})
    impl = gc.cache_implementation
    if impl not in (None, "dynamic"):
        why = _CACHE_IMPLEMENTATIONS.get(impl, "DASH-KV decodes from its own dynamic cache only")
        raise UnsupportedCacheError(
            f"cache_implementation={impl!r} is not supported with DASH-KV enabled: {why}. Drop "
            "cache_implementation (DASH-KV builds its cache), or call dashkv.disable(model) first.")
    for flag in ("assistant_early_exit", "use_mtp"):
        if getattr(gc, flag, None):
            raise UnsupportedGenerationError(
                f"generate({flag}=...) is not supported with DASH-KV enabled (self-speculative decoding "
                "shares one cache between the early-exit draft and the model; untested). Use assisted "
                "generation with a separate draft model or prompt_lookup_num_tokens, or dashkv.disable(model).")
    try:
        mode = gc.get_generation_mode(kwargs.get("assistant_model"))
    except Exception:  # an invalid combination: let generate itself report it
        return
    mode = getattr(mode, "value", str(mode))
    if mode in _REFUSED_MODES:
        raise UnsupportedGenerationError(
            f"{_REFUSED_MODES[mode]} is not supported with DASH-KV enabled: transformers runs it from a "
            "`custom_generate` repository that dashkv is not tested with. Use greedy decoding, sampling, "
            "beam search or assisted generation, or call dashkv.disable(model) first.")


def _wrap_generate(model: Any, handle: DashKVHandle) -> None:
    if not hasattr(model, "generate"):
        return
    original = model.generate
    handle._own_generate = model.__dict__.get("generate")  # an instance attribute we must restore

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        if handle.active:
            _check_generate_call(model, kwargs)
        return original(*args, **kwargs)

    generate._dashkv_handle = handle  # type: ignore[attr-defined]
    model.__dict__["generate"] = generate


def _unwrap_generate(model: Any, handle: DashKVHandle) -> None:
    current = model.__dict__.get("generate")
    if getattr(current, "_dashkv_handle", None) is not handle:
        return
    previous = getattr(handle, "_own_generate", None)
    if previous is None:
        del model.__dict__["generate"]
    else:
        model.__dict__["generate"] = previous


# ---- transformers plumbing ----------------------------------------------------------------------------
def _register_attention() -> None:
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, dashkv_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def _refuse_cache(cache: Any) -> None:
    """Raise UnsupportedCacheError naming `cache`'s kind, unless DASH-KV can decode from it."""
    if isinstance(cache, DynamicCache) and type(cache) in (DynamicCache, DashKVCache):
        if getattr(cache, "offloading", False):
            raise UnsupportedCacheError(
                "an offloaded DynamicCache (cache_implementation='offloaded') is not supported with DASH-KV "
                f"enabled: {_CACHE_IMPLEMENTATIONS['offloaded']}. Pass no cache, or dashkv.disable(model).")
        return
    if isinstance(cache, StaticCache):
        kind = "a StaticCache (cache_implementation='static')"
        why = _CACHE_IMPLEMENTATIONS["static"]
    elif isinstance(cache, QuantizedCache):
        kind = "a QuantizedCache (cache_implementation='quantized')"
        why = _CACHE_IMPLEMENTATIONS["quantized"]
    elif isinstance(cache, Cache):
        kind, why = f"a {type(cache).__name__}", "DASH-KV decodes from a DynamicCache or its own DashKVCache only"
    else:
        kind, why = f"a {type(cache).__name__} as cache", "caches must be transformers Cache objects"
    raise UnsupportedCacheError(
        f"{kind} is not supported with DASH-KV enabled: {why}. Pass no cache (DASH-KV builds one), a "
        "DynamicCache, or a cache returned by an earlier DASH-KV generate; or call dashkv.disable(model).")


def _inject_cache(handle: DashKVHandle):
    def hook(module: Any, args: tuple, kwargs: dict):
        if not handle.active:
            return None
        key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if tokens is not None:
            seen = 0 if cache is None else cache.get_seq_length()
            if handle.max_positions and seen + tokens.shape[1] > handle.max_positions:
                check_context_length(module.config, seen + tokens.shape[1])  # raises, naming the limit
        if cache is None:
            if use_cache:
                kwargs[key] = handle.new_cache()
                return args, kwargs
            return None
        _refuse_cache(cache)
        managed = handle.managed_layers
        if managed and (len(cache.layers) <= max(managed)
                        or not all(isinstance(cache.layers[i], DashKVLayer) for i in managed)):
            adopt(cache, handle.new_context(), managed, handle.model.config)
        return None

    return hook


def dashkv_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any):
    """transformers attention function: DASH-KV on decode steps of managed layers, sdpa elsewhere.

    The layer's cache arrives in the call's own kwargs (`LAYER_KWARG`, set by `DashKVLayer.update`);
    it carries the policy (hence the configuration) and the per-call state."""
    layer: DashKVLayer | None = kwargs.pop(LAYER_KWARG, None)
    if layer is None or module.training or kwargs.get("sliding_window") is not None:
        decoding = layer is None and query.shape[2] == 1 and key.shape[2] > 1 and not module.training
        if decoding and getattr(module, _HANDLE_ATTR, None) is not None:
            warn_once(logger, "no-layer-in-kwargs",
                      "dashkv: a managed layer's decode step got no DashKVLayer in its attention kwargs (the "
                      "model does not pass kwargs= to cache.update?); decoding densely")
        elif (decoding and kwargs.get("sliding_window") is None and key.device.type == "cpu"
              and query.shape[1] % key.shape[1] == 0 and not kwargs.get("output_attentions")):
            # a decode step of a layer DASH-KV leaves dense (the first layers): the same fast exact decode
            # as its own dense steps; transformers' SDPA call here takes enable_gqa without a mask, 8x
            # slower in bf16 on a CPU without AMX (4.3 ms per layer at 6K, docs/RESULTS.md §1)
            start, plain = start_from_mask(attention_mask, key.shape[2])
            if plain:
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                return dense_decode(query, key, value, scale, start).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    ctx = layer.ctx
    policy = ctx.policy
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n, q_len = key.shape[2], query.shape[2]

    chunk = 1 < q_len <= MAX_SPARSE_CHUNK and policy is not None and not policy.config.plan(
        n - q_len + 1, element_bytes=key.element_size()).dense
    if q_len > 1 and not chunk:  # prefill: exact dense attention (and the policy's prefill statistics)
        if policy is not None:
            start, _ = start_from_mask(attention_mask, n)
            policy.on_prefill(layer.state, query, key, scaling, start)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    start, plain = ctx.left_padding(attention_mask, n)
    if not plain:  # an unusual mask (not plain left padding): exact dense attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if ctx.calibrated_length and n > ctx.calibrated_length:
        warn_once(logger, ("past-calibrated-length", ctx.calibrated_length),
                  "dashkv: decoding at %d tokens, past the %d-token context the encoders were calibrated on; "
                  "selection quality there is unmeasured", n, ctx.calibrated_length)
    if q_len == 1:
        out = decode_step(policy, layer.state, query, key, value, scaling, start=start, lowprec=layer.lowprec,
                          fast=ctx.fast, stats=ctx.stats)
    else:
        out = _decode_rows(layer, query, key, value, scaling, start)
    return out.transpose(1, 2).contiguous(), None


#: Multi-token forwards of at most this many tokens on a long cache (the draft model's steps and the
#: main model's verification in assisted generation, prompt lookup) run as that many causal decode
#: steps over views of the cache, so they are as sparse as single-token steps; longer ones are prefill.
MAX_SPARSE_CHUNK = 16


def _decode_rows(layer: DashKVLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                 start: torch.Tensor | None) -> torch.Tensor:
    """Row i of a q-token chunk attends to the first n - q + 1 + i cached tokens (causal)."""
    from .selection import LayerState

    ctx, state = layer.ctx, layer.state
    n, q_len = key.shape[2], query.shape[2]
    outs = []
    for i in range(q_len):
        m = n - q_len + 1 + i
        view = LayerState(layer_idx=state.layer_idx, stats=state.stats,  # the same statistics, updated in place
                          codes=None if state.codes is None else state.codes[:, :, :m],
                          keys8=None if state.keys8 is None else state.keys8.prefix(m))
        low = None
        if layer.lowprec is not None:
            low = tuple(r.prefix(m) for r in layer.lowprec)
        outs.append(decode_step(ctx.policy, view, query[:, :, i:i + 1], key[:, :, :m], value[:, :, :m], scaling,
                                start=start, lowprec=low, fast=ctx.fast, stats=ctx.stats))
    return torch.cat(outs, dim=2)
