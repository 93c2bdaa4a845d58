"""DASH-KV inside Hugging Face transformers: `enable(model, encoders, config)` / `disable(model)`.

How it plugs in, using only transformers' public extension points:
- an attention function registered as "dashkv" in `AttentionInterface` (with the sdpa mask builder);
  prefill, sliding-window layers, dense layers and training run transformers' own sdpa attention, and
  single-token decode steps on managed layers run `dashkv.decode.decode_step`;
- a forward pre-hook on the decoder that swaps an empty default cache for a `DashKVCache`, so
  `model.generate(...)`, pipelines and plain forward calls get key codes without any change;
- `disable` removes both and restores the previous attention implementation, so logits are
  bit-identical to the unmodified model again.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .cache import DashKVCache, DashKVLayer
from .config import DashKVConfig
from .decode import StepStats, decode_step
from .encoders import HashEncoders
from .models import check_context_length, check_supported, model_shape
from .selection import LayerState, SelectionPolicy, make_policy

ATTN_NAME = "dashkv"
_HANDLE_ATTR = "_dashkv_handle"
_DEFAULT_ENCODERS = Path(__file__).parent / "data" / "encoders"


class DashKVHandle:
    """What `enable` returns: the live DASH-KV state of one model; a context manager that disables."""

    def __init__(self, model: Any, policy: SelectionPolicy | None, config: DashKVConfig, method: str,
                 managed_layers: tuple[int, ...], track: bool):
        self.model = model
        self.policy = policy
        self.config = config
        self.method = method
        self.managed_layers = managed_layers
        self.live_layers: dict[int, DashKVLayer] = {}
        self.stats = StepStats() if track else None
        self.fast = True  # fused CPU kernel for the default configuration (tests flip it to compare paths)
        self.active = True
        self._previous_attn: str | None = None
        self._hook = None
        self._warned_foreign_cache = False
        self.max_positions: int | None = None

    def new_cache(self) -> DashKVCache:
        return DashKVCache(self)

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
        self.stats = StepStats()

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


def enable(model: Any, encoders: HashEncoders | None = None, config: DashKVConfig | None = None, *,
           method: str = "dashkv", track: bool = False) -> DashKVHandle:
    """Switch `model` to DASH-KV decoding (or to another selection `method`, for comparisons).

    encoders: required for "dashkv" unless the model is the default model (its encoders ship with
    dashkv); "simhash" builds random hyperplanes of `config.bits`. Enabling an enabled model replaces
    its configuration. `track=True` counts the tokens every decode step reads (`handle.stats`).
    """
    check_supported(model)
    config = config or DashKVConfig()
    shape = model_shape(model)
    if getattr(model, _HANDLE_ATTR, None) is not None:
        disable(model)
    if getattr(model, "training", False):
        warnings.warn("dashkv: the model is in training mode; attention stays dense until model.eval()",
                      stacklevel=2)

    candidates = [i for i in shape.full_attention_layers if i not in config.dense_layers]
    if method in ("dashkv",):
        if encoders is None:
            encoders = default_encoders(shape, config.bits)
            if encoders is None:
                raise ValueError(
                    f"no encoders given for this {shape.model_type} model ({shape.num_layers} layers); "
                    "calibrate them with `dashkv calibrate --model ... --out DIR` and pass "
                    "HashEncoders.from_pretrained(DIR)")
        encoders.check_compatible(shape, bits=config.bits)
        managed = tuple(i for i in candidates if encoders.has_layer(i))
    elif method == "simhash":
        if encoders is None or encoders.kind != "simhash":
            encoders = HashEncoders.simhash(shape.to_dict(), config.bits, candidates, seed=0)
        managed = tuple(candidates)
    else:
        managed = tuple(candidates)
    policy = make_policy(method, config, encoders)

    if policy is not None and policy.uses_codes:
        _warm_cpu_kernels(model.dtype)
    handle = DashKVHandle(model, policy, config, method, managed, track)
    handle.max_positions = shape.max_position_embeddings
    _register_attention()
    handle._previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):
            setattr(module, _HANDLE_ATTR, handle)
    setattr(model, _HANDLE_ATTR, handle)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    handle._hook = decoder.register_forward_pre_hook(_inject_cache(handle), with_kwargs=True)
    return handle


def disable(model: Any) -> None:
    """Restore the unmodified model (no-op if DASH-KV is not enabled)."""
    handle: DashKVHandle | None = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return
    if handle._hook is not None:
        handle._hook.remove()
    model.set_attn_implementation(handle._previous_attn or "sdpa")
    for module in model.modules():
        if hasattr(module, _HANDLE_ATTR):
            delattr(module, _HANDLE_ATTR)
    handle.active = False


def is_enabled(model: Any) -> bool:
    return getattr(model, _HANDLE_ATTR, None) is not None


_KERNELS_WARM: set = set()


def _warm_cpu_kernels(dtype: torch.dtype) -> None:
    """Compile (first run ever) or load (later processes, ~1 s) the fused CPU kernels for this K/V dtype
    once per process, at enable time, so the cost never lands inside the first decode step a user or a
    benchmark times."""
    if dtype in _KERNELS_WARM:
        return
    try:
        from .kernels.cpu import KV_DTYPES, warmup
    except ImportError:  # numba missing: the torch reference path serves
        return
    if dtype in KV_DTYPES:
        warmup((dtype,))
    _KERNELS_WARM.add(dtype)


# ---- transformers plumbing ----------------------------------------------------------------------------
def _register_attention() -> None:
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, dashkv_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def _inject_cache(handle: DashKVHandle):
    def hook(module: Any, args: tuple, kwargs: dict):
        if not handle.active:
            return None
        key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if tokens is not None:
            seen = 0 if cache is None else cache.get_seq_length()
            if handle.max_positions and seen + tokens.shape[1] > handle.max_positions:
                check_context_length(module.config, seen + tokens.shape[1])  # raises, naming the limit
        if use_cache and fresh:
            kwargs[key] = handle.new_cache()
            return args, kwargs
        return None

    return hook


def _start_from_mask(mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, bool]:
    """Left-padding offsets (B,) from the decode step's mask, and whether the mask is plain left padding."""
    if mask is None:
        return None, True
    last = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
    last = last[:, -n:] if last.shape[-1] >= n else last
    start = (~last).int().cumprod(-1).sum(-1).long()  # leading masked positions
    plain = bool((last.sum(-1) == n - start).all())
    return (start if bool(start.any()) else None), plain


def dashkv_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any):
    """transformers attention function: DASH-KV on decode steps of managed layers, sdpa elsewhere."""
    handle: DashKVHandle | None = getattr(module, _HANDLE_ATTR, None)
    layer_idx = getattr(module, "layer_idx", None)
    if (handle is None or not handle.active or module.training or layer_idx not in handle.managed_layers
            or kwargs.get("sliding_window") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n = key.shape[2]
    layer = handle.live_layers.get(layer_idx)
    if layer is None or layer.keys is not key:
        layer = None  # not our cache (a cache the caller built): compute codes on the fly
    start, plain = _start_from_mask(attention_mask, n)

    if query.shape[2] > 1 or not plain:  # prefill (or an unusual mask): exact dense attention
        if query.shape[2] > 1 and layer is not None and handle.policy is not None:
            valid_start = start
            handle.policy.on_prefill(layer.state, query, key, scaling, valid_start)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    if layer is not None:
        state, lowprec = layer.state, layer.lowprec
    else:
        if not handle._warned_foreign_cache:
            warnings.warn("dashkv: the cache is not a DashKVCache; key codes are recomputed every step "
                          "(correct but slow). Let generate() create the cache.", stacklevel=2)
            handle._warned_foreign_cache = True
        state, lowprec = LayerState(layer_idx=layer_idx), None
        if handle.policy is not None and handle.policy.uses_codes:
            state.codes = handle.policy.encode_keys(layer_idx, key)
        if handle.config.lowprec_fraction > 0:
            from .attention import QuantizedRows

            lowprec = (QuantizedRows.quantize(key), QuantizedRows.quantize(value))
    out = decode_step(handle.policy, handle.config, state, query, key, value, scaling, start=start,
                      lowprec=lowprec, fast=handle.fast, stats=handle.stats)
    return out.transpose(1, 2).contiguous(), None
