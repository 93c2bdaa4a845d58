"""The KV cache that DASH-KV decodes from: K, V and packed key codes, nothing ever evicted.

Each key is encoded once, when it enters the cache (`DashKVLayer.update`), and its b-bit code is kept
beside K and V for every later step. Buffers are preallocated and grown geometrically, so a decode step
appends in place instead of re-concatenating the whole cache (what transformers' DynamicLayer does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .attention import QuantizedRows
from .selection import LayerState

if TYPE_CHECKING:  # pragma: no cover
    from .hf import DashKVHandle

_MIN_CAPACITY = 256


class DashKVLayer(DynamicLayer):
    """One full-attention layer's cache: K, V, key codes (and an 8-bit K/V copy if the tier is on)."""

    def __init__(self, handle: "DashKVHandle", layer_idx: int):
        super().__init__()
        self.handle = handle
        self.layer_idx = layer_idx
        self.state = LayerState(layer_idx=layer_idx)
        self.length = 0
        self._buffers: dict[str, torch.Tensor] = {}

    # ---- storage ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _grow(self, like: dict[str, torch.Tensor], need: int) -> None:
        cap = next(iter(self._buffers.values())).shape[2] if self._buffers else 0
        if need <= cap and all(k in self._buffers for k in like):
            return
        new_cap = max(need, cap + max(_MIN_CAPACITY, cap // 4))
        new_cap = -(-new_cap // _MIN_CAPACITY) * _MIN_CAPACITY
        grown = {}
        for name, t in like.items():
            b, h, _, tail = t.shape
            buf = torch.empty(b, h, new_cap, tail, dtype=t.dtype, device=t.device)
            if name in self._buffers and self.length:
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

    def _publish(self) -> None:
        n = self.length
        view = {name: buf[:, :, :n] for name, buf in self._buffers.items()}
        self.keys, self.values = view["k"], view["v"]
        self.state.codes = view.get("codes")
        self.lowprec = None
        if "k8" in view:
            self.lowprec = (QuantizedRows(view["k8"], view["k8s"]), QuantizedRows(view["v8"], view["v8s"]))

    def _parts(self, key_states: torch.Tensor, value_states: torch.Tensor,
               codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = {"k": key_states, "v": value_states}
        policy = self.handle.policy
        if policy is not None and policy.uses_codes:
            parts["codes"] = codes if codes is not None else policy.encode_keys(self.layer_idx, key_states)
        if self.handle.config.lowprec_fraction > 0:
            k8, v8 = QuantizedRows.quantize(key_states), QuantizedRows.quantize(value_states)
            parts.update(k8=k8.q, k8s=k8.scale, v8=v8.q, v8s=v8.scale)
        return parts

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(self._parts(key_states, value_states))
        self.handle.live_layers[self.layer_idx] = self
        return self.keys, self.values

    def _rebuild(self, index: Any) -> None:
        """Keep `index` of every buffer (crop, beam reorder, batch selection); statistics restart."""
        if not self.length:
            return
        kept = {name: buf[:, :, : self.length][index].clone() for name, buf in self._buffers.items()}
        self._buffers, self.length = {}, 0
        self.state.stats.clear()
        if kept["k"].shape[2]:
            self._append(kept)
        else:
            self.keys = self.values = None

    # ---- transformers cache protocol ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._buffers, self.length = {}, 0
        self.state = LayerState(layer_idx=self.layer_idx)
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove:
            self._rebuild((slice(None), slice(None), slice(0, self.length + tokens_to_remove)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            b = self.keys.shape[0]
            self._rebuild(torch.arange(b).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(beam_idx.to(self.device))


class DashKVCache(DynamicCache):
    """A transformers cache whose DASH-KV-managed layers keep key codes; other layers stay as usual
    (sliding-window layers, dense layers)."""

    def __init__(self, handle: "DashKVHandle"):
        super().__init__(config=handle.model.config)
        for i in handle.managed_layers:
            self.layers[i] = DashKVLayer(handle, i)
