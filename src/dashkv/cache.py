"""The KV cache that DASH-KV decodes from: K, V and packed key codes, nothing ever evicted.

Each key is encoded once, when it enters the cache (`DashKVLayer.update`), and its b-bit code is kept
beside K and V for every later step. Buffers are preallocated and grown geometrically, so a decode step
appends in place instead of re-concatenating the whole cache (what transformers' DynamicLayer does).

Ownership (docs/DECISIONS.md, "One owner per decode step"): the policy owns the configuration; each
cache owns everything per call -- its layers' buffers and `LayerState`, and a `DecodeContext` with the
path choice and statistics. Nothing here refers back to the integration (`dashkv.hf`), and the
integration keeps no reference to a cache, so a cache lives exactly as long as the caller holds it.
The attention function reaches a layer through transformers' own call arguments: models call
`cache.update(k, v, layer_idx, kwargs=attention_kwargs)` and then `attention(..., **attention_kwargs)`
with the same dict, so `update` publishes the layer in it under `LAYER_KWARG`.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .attention import QuantizedRows
from .decode import StepStats
from .errors import UnsupportedCacheError
from .selection import DashKVPolicy, LayerState, SelectionPolicy, TemporalCarry

_MIN_CAPACITY = 256
_ENCODER_KEYS = DashKVPolicy.encode_keys  # policies whose codes are exactly their encoders' (fast append)
LAYER_KWARG = "dashkv_layer"  # key under which a DashKVLayer rides in the attention kwargs


class StatsTotal:
    """Statistics summed over every call of one enabled model; calls add to it under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stats = StepStats()

    def reset(self) -> None:
        with self.lock:
            self.stats = StepStats()


class CallStats(StepStats):
    """One cache's statistics (`cache.stats`); every record is also added to the shared total."""

    def __init__(self, total: StatsTotal | None = None):
        super().__init__()
        self._total = total

    def record(self, layer_idx: int, n: int, attended: torch.Tensor | int, keep: bool, rows: int = 1,
               extra: float = 0.0) -> None:
        a0, c0, k0 = self.attended, self.context, len(self.per_step)
        super().record(layer_idx, n, attended, keep, rows, extra)
        if self._total is not None:
            with self._total.lock:
                t = self._total.stats
                t.steps += 1
                t.attended += self.attended - a0
                t.context += self.context - c0
                t.per_step.extend(self.per_step[k0:])


class DecodeContext:
    """What one cache (one generate call, or one multi-turn conversation) decodes with.

    policy: the selection policy, and through `policy.config` the whole configuration (None = dense).
    fast: use the fused kernels where the configuration allows (False = torch reference path).
    stats: this cache's statistics (None = not tracked).
    calibrated_length: context length the encoders were calibrated for (None = unknown).
    """

    def __init__(self, policy: SelectionPolicy | None, *, fast: bool = True, stats: StepStats | None = None,
                 calibrated_length: int | None = None):
        self.policy = policy
        self.fast = fast
        self.stats = stats
        self.calibrated_length = calibrated_length
        self.carry = TemporalCarry()  # one step's layer-to-layer momentum (DashKVConfig.temporal)
        self._mask: Any = None  # the last decode mask seen, and what it says (one host sync per step)
        self._mask_n = -1
        self._mask_info: tuple[torch.Tensor | None, bool] = (None, True)

    def left_padding(self, mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, bool]:
        """Left-padding offsets (B,) and whether `mask` is plain left padding, computed once per mask:
        every managed layer of a step gets the same mask object, so the host sync happens once a step."""
        if mask is None:
            return None, True
        if mask is self._mask and n == self._mask_n:
            return self._mask_info
        info = start_from_mask(mask, n)
        self._mask, self._mask_n, self._mask_info = mask, n, info
        return info


def start_from_mask(mask: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, bool]:
    """Left-padding offsets (B,) from a decode step's mask, and whether the mask is plain left padding."""
    if mask is None:
        return None, True
    last = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
    last = last[:, -n:] if last.shape[-1] >= n else last
    start = (~last).int().cumprod(-1).sum(-1).long()  # leading masked positions
    ok = torch.stack([(last.sum(-1) == n - start).all(), start.any()]).tolist()  # one host sync
    return (start if ok[1] else None), bool(ok[0])


class DashKVLayer(DynamicLayer):
    """One full-attention layer's cache: K, V, key codes (and an 8-bit K/V copy if the tier is on).

    `keys`/`values` are views [:, :, :length] of capacity-sized buffers on the keys' device. `crop` only
    shortens `length`; beam reorder and batch selection copy the live part once (`index_select`).
    A layer DASH-KV does not manage (`managed=False`: `dense_layers`) keeps only K and V, in place,
    and attends densely through transformers' own attention: it never re-concatenates the cache.
    """

    def __init__(self, layer_idx: int, ctx: DecodeContext, managed: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.managed = managed
        self.ctx = ctx
        self.state = LayerState(layer_idx=layer_idx, carry=ctx.carry)
        self.length = 0
        self.coded = 0  # positions [0, coded) have key codes (encoding waits while steps are dense)
        self.lowprec: tuple[QuantizedRows, QuantizedRows] | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._views = None  # kernels.cpu.BufferViews of the current K/V/code buffers (CPU only)

    # ---- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _capacity(self) -> int:
        return next(iter(self._buffers.values())).shape[2] if self._buffers else 0

    def _grow(self, like: dict[str, torch.Tensor], need: int) -> None:
        cap = self._capacity()
        if need <= cap and all(k in self._buffers for k in like):
            return
        new_cap = max(need, cap + max(_MIN_CAPACITY, cap // 4)) if need > cap else cap
        new_cap = -(-new_cap // _MIN_CAPACITY) * _MIN_CAPACITY
        grown = {}
        for name, t in {**self._buffers, **like}.items():  # existing buffers keep growing with the rest
            b, h, _, tail = t.shape
            buf = t if name not in like and t.shape[2] == new_cap else torch.empty(
                b, h, new_cap, tail, dtype=t.dtype, device=t.device)
            if buf is not t and name in self._buffers and self.length:
                buf[:, :, : self.length] = self._buffers[name][:, :, : self.length]
            grown[name] = buf
        self._buffers = grown

    def _append(self, parts: dict[str, torch.Tensor]) -> None:
        new = next(iter(parts.values())).shape[2]
        self._grow(parts, self.length + new)
        s, e = self.length, self.length + new
        for name, t in parts.items():
            self._buffers[name][:, :, s:e] = t
        self.length = e
        self._publish()

    def _element_bytes(self) -> int:
        """The stored K/V element size (it picks the default `min_context`); float32 before any key."""
        k = self._buffers.get("k")
        return k.element_size() if k is not None else 4

    def _publish(self, views: Any = None) -> None:
        """Expose the live [:, :, :length] part of every buffer; `views`: the buffers' `BufferViews` when
        the caller has just checked them (the decode step's append), else they are re-checked here."""
        n = self.length
        view = {name: buf[:, :, :n] for name, buf in self._buffers.items()}
        self.keys, self.values = view.get("k"), view.get("v")
        self.state.codes = view.get("codes")
        self.lowprec = None
        self.state.keys8 = (QuantizedRows(view["k8"], view["k8s"]) if "k8" in view else
                            QuantizedRows(view["k4"], view["k4s"], bits=4) if "k4" in view else None)
        if "v8" in view:
            self.lowprec = (self.state.keys8, QuantizedRows(view["v8"], view["v8s"]))
        self.state.buffer_views = views if views is not None else self._buffer_views()

    def _buffer_views(self):
        """The fused kernels' numpy views of the K/V/code buffers, remade only when a buffer is replaced."""
        k, v, c = self._buffers.get("k"), self._buffers.get("v"), self._buffers.get("codes")
        if c is None or k.device.type != "cpu":
            return None
        int8 = {name: (self._buffers[name], self._buffers[name + "s"]) for name in ("k8", "v8", "k4")
                if name in self._buffers}
        if self._views is None or not self._views.matches(k, v, c, int8):
            try:
                from .kernels.cpu import BufferViews
            except ImportError:  # no numba: the torch paths need no views
                return None
            self._views = BufferViews(k, v, c, int8)
        return self._views

    def _append_fast(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """A decode step's few tokens, appended with their codes in one compiled call (`append_coded_cpu`)
        when the layer keeps exactly K, V and codes with room to spare; False = take the general path."""
        views, policy = self._buffer_views(), self.ctx.policy  # re-checked: a deep-copied cache has stale ones
        t = key_states.shape[2]
        extra = set(self._buffers) - {"k", "v", "codes"}  # the int8 / int4 copies (re-rank stage, 8-bit tier)
        if (views is None or t > 8 or self.coded != self.length or "codes" not in self._buffers
                or not extra <= {"k8", "k8s", "v8", "v8s", "k4", "k4s"}
                or self.length + t > self._capacity() or key_states.dtype != self._buffers["k"].dtype
                or value_states.dtype != key_states.dtype or key_states.device.type != "cpu"
                or key_states.shape[:2] != self._buffers["k"].shape[:2]
                or value_states.shape != key_states.shape):
            return False
        encoders = getattr(policy, "encoders", None)
        if encoders is None or type(policy).encode_keys is not _ENCODER_KEYS:
            return False
        if encoders.kind == "pq":  # PQ codes: the compiled nearest-centroid encoder
            from .kernels.cpu import append_pq_cpu

            append_pq_cpu(views, self.length, key_states, value_states, *encoders.pq_key_arrays(self.layer_idx))
        else:
            fast = encoders._fast_linear(self.layer_idx, "key", key_states)
            if fast is None:
                return False
            from .kernels.cpu import append_coded_cpu

            append_coded_cpu(views, self.length, key_states, value_states, *fast, levels=encoders.key_levels)
        if extra:
            from .kernels.cpu import append_int8_cpu

            for name, x in (("k8", key_states), ("v8", value_states), ("k4", key_states)):
                if name in self._buffers:
                    append_int8_cpu(views.int8[name], self.length, x, bits=4 if name == "k4" else 8)
        self.length += t
        self.coded = self.length
        self._publish(views)  # the append replaced no buffer: the views checked above still hold
        return True

    def _parts(self, key_states: torch.Tensor, value_states: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"k": key_states, "v": value_states}
        policy = self.ctx.policy if self.managed else None
        if policy is not None and policy.uses_codes and self.coded == self.length and \
                self.length + key_states.shape[2] > policy.config.dense_context(key_states.element_size()):
            parts["codes"] = policy.encode_keys(self.layer_idx, key_states)
        if policy is not None and (policy.config.lowprec_fraction > 0 or policy.config.rerank > 0):
            bits = 8 if policy.config.lowprec_fraction > 0 else policy.config.rerank_bits
            k8 = QuantizedRows.quantize(key_states, bits)  # the low-precision tier's keys, and the re-rank stage's
            if bits == 8:
                parts.update(k8=k8.q, k8s=k8.scale)
            else:
                parts.update(k4=k8.q, k4s=k8.scale)
        if policy is not None and policy.config.lowprec_fraction > 0:
            v8 = QuantizedRows.quantize(value_states)
            parts.update(v8=v8.q, v8s=v8.scale)
        return parts

    def _encode_backlog(self) -> None:
        """Encode the keys of the dense steps below `min_context` once the context passes it: short
        contexts decode densely and pay no encoding; the first sparse step encodes what it needs."""
        policy = self.ctx.policy if self.managed else None
        if policy is not None and self.length > policy.config.dense_context(self._element_bytes()):
            self.ensure_codes()

    def ensure_codes(self) -> None:
        """Encode every key that has no code yet (callers that copy the codes buffer need all of it)."""
        policy = self.ctx.policy if self.managed else None
        if policy is None or not policy.uses_codes or self.coded >= self.length:
            return
        codes = policy.encode_keys(self.layer_idx, self._buffers["k"][:, :, self.coded:self.length])
        if "codes" not in self._buffers:
            b, h, cap, _ = self._buffers["k"].shape
            self._buffers["codes"] = codes.new_empty(b, h, cap, codes.shape[-1])
        self._buffers["codes"][:, :, self.coded:self.length] = codes
        self.coded = self.length
        self._publish()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not (self.managed and self._append_fast(key_states, value_states)):
            parts = self._parts(key_states, value_states)
            self._append(parts)
            if "codes" in parts:
                self.coded = self.length
            else:
                self._encode_backlog()
        attn_kwargs = kwargs.get("kwargs")  # transformers: cache.update(k, v, layer_idx, kwargs=kwargs)
        if self.managed and isinstance(attn_kwargs, dict):
            attn_kwargs[LAYER_KWARG] = self
        return self.keys, self.values

    def _take(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam reorder, batch selection, repeat) of every buffer and statistic:
        one copy of the live part into a fresh buffer of the same capacity."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(device=self.device, dtype=torch.long)
        n = self.length
        for name, buf in self._buffers.items():
            new = buf.new_empty((index.numel(), *buf.shape[1:]))
            torch.index_select(buf[:, :, :n], 0, index, out=new[:, :, :n])
            self._buffers[name] = new
        for name, value in self.state.stats.items():
            self.state.stats[name] = _stat_tensor(name, value).index_select(0, index.to(value.device))
        self._publish()

    # ---- transformers cache protocol ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._buffers, self.length, self.coded, self._views = {}, 0, 0, None
        self.state = LayerState(layer_idx=self.layer_idx, carry=self.ctx.carry)
        self.keys = self.values = None
        self.lowprec = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens: O(1), the buffers keep their capacity."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if not tokens_to_remove or not self.length:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self.coded = min(self.coded, self.length)
        for name, value in self.state.stats.items():
            t = _stat_tensor(name, value)
            if t.dim() >= 3 and t.shape[2] > self.length:
                self.state.stats[name] = t[:, :, : self.length]
        self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            b = self.keys.shape[0]
            self._take(torch.arange(b, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._take(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._take(beam_idx)

    def offload(self) -> None:
        raise UnsupportedCacheError(
            "offloading a DASH-KV cache (cache_implementation='offloaded') is not supported: every decode "
            "step reads the key codes of the whole context. Drop cache_implementation, or dashkv.disable(model).")

    def prefetch(self) -> None:
        self.offload()


def _stat_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UnsupportedCacheError(
            f"policy statistic {name!r} is a {type(value).__name__}, not a (B, H, N) tensor: the cache cannot "
            "crop or reorder it (see LayerState)")
    return value


class DashKVCache(DynamicCache):
    """A transformers cache whose DASH-KV-managed layers keep key codes; other layers stay as usual
    (sliding-window layers, dense layers). `cache.stats` holds this cache's statistics (if tracked)."""

    def __init__(self, model_config: Any, ctx: DecodeContext, managed_layers: Iterable[int]):
        super().__init__(config=model_config)
        self.dashkv = ctx
        managed = set(managed_layers)
        for i, layer in enumerate(self.layers):
            if i in managed or type(layer) is DynamicLayer:  # dense full-attention layers: in place too
                self.layers[i] = DashKVLayer(i, ctx, managed=i in managed)

    @property
    def stats(self) -> StepStats | None:
        return self.dashkv.stats


def adopt(cache: DynamicCache, ctx: DecodeContext, managed_layers: Iterable[int], model_config: Any) -> None:
    """Make a plain DynamicCache (a user's, or generate's default) DASH-KV-managed, in place: its managed
    layers become DashKVLayers holding the same tokens (keys are encoded as they are copied in), so the
    caller's cache object is the one that fills up. Layers that already are DashKVLayers keep the policy
    they were created with (their codes were encoded by it). The object's class becomes DashKVCache (a
    DynamicCache subclass without state of its own), so `cache.stats` is there too."""
    managed = tuple(managed_layers)
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is not None:
        cache.layers = DynamicCache(config=model_config).layers  # DynamicCache() built without a config
        cache.layer_class_to_replicate = None
    if managed and max(managed) >= len(cache.layers):
        raise UnsupportedCacheError(
            f"the cache has {len(cache.layers)} layers but DASH-KV manages layer {max(managed)}: pass a cache "
            "built for this model (DynamicCache(config=model.config)) or none")
    for i in managed:
        layer = cache.layers[i]
        if isinstance(layer, DashKVLayer):
            continue
        if type(layer) is not DynamicLayer:
            raise UnsupportedCacheError(
                f"layer {i} of the cache is a {type(layer).__name__}; DASH-KV manages full-attention layers "
                "held in DynamicLayer only. Pass no cache (generate builds one) or a DynamicCache.")
        new = DashKVLayer(i, ctx)
        if layer.get_seq_length() > 0:
            new.update(layer.keys, layer.values)
        cache.layers[i] = new
    if type(cache) is DynamicCache:
        cache.__class__ = DashKVCache
        cache.dashkv = ctx
