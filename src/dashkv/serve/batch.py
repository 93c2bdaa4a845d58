"""A batch decoded one step at a time, which requests join (after their own prefill) and leave at step
boundaries: continuous batching without touching `generate`.

The batch keeps one cache for all rows, left-padded to a common length T, a 2-D attention mask (B, T)
and each row's next position. A joining group is prefilled on its own (left-padded among itself), then
both caches are left-padded to the longer length and concatenated along the batch; rows that finished
are dropped with the cache's `batch_select_indices`, and columns that became padding in every row are
cropped. The mask is always plain left padding, which is what DASH-KV's decode path expects, and
positions are computed from the mask exactly as `generate` does, so a row decodes the same tokens
whoever it shares the batch with (up to float rounding of the padded kernels).

Supported caches: transformers' DynamicLayer (dense, and DASH-KV's dense layers) and DASH-KV's
DashKVLayer. Sliding-window layers are not: models with them use batching at admission.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..cache import DashKVLayer


def supports_continuous(model: Any) -> bool:
    from ..models import model_shape

    return not model_shape(model).sliding_layers


def _left_pad(t: torch.Tensor, to: int) -> torch.Tensor:
    """Pad dim 2 (the sequence) of a (B, H, N, x) tensor on the left with zeros up to `to`."""
    extra = to - t.shape[2]
    return F.pad(t, (0, 0, extra, 0)) if extra > 0 else t


def _layer_parts(layer: Any) -> dict[str, torch.Tensor]:
    if isinstance(layer, DashKVLayer):
        layer.ensure_codes()  # short contexts defer encoding; a merged buffer must be complete
        return {name: buf[:, :, : layer.length] for name, buf in layer._buffers.items()}
    if type(layer) is DynamicLayer:
        return {"k": layer.keys, "v": layer.values}
    raise TypeError(f"continuous batching cannot merge a {type(layer).__name__}")


def _set_parts(layer: Any, parts: dict[str, torch.Tensor]) -> None:
    if isinstance(layer, DashKVLayer):
        layer._buffers, layer.length = {}, 0
        layer.state.stats.clear()
        layer._append(parts)
        layer.coded = layer.length if "codes" in parts else 0
    else:
        layer.keys, layer.values = parts["k"], parts["v"]


def merge_caches(a: Any, b: Any, length: int) -> None:
    """Append the rows of cache `b` to cache `a` (in place), both left-padded to `length` tokens."""
    for la, lb in zip(a.layers, b.layers):
        pa, pb = _layer_parts(la), _layer_parts(lb)
        _set_parts(la, {k: torch.cat([_left_pad(pa[k], length), _left_pad(pb[k], length)]) for k in pa})


def crop_left(cache: Any, k: int) -> None:
    """Drop the first k positions of every layer (padding in every row)."""
    for layer in cache.layers:
        parts = _layer_parts(layer)
        _set_parts(layer, {name: t[:, :, k:].clone() for name, t in parts.items()})


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask, as `generate` computes them (padding gets 1)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


class RunningBatch:
    """Cache, mask and last tokens of the rows decoding together; `rows` is any per-row payload."""

    def __init__(self, model: Any, pad_id: int, dashkv: bool, new_cache: Callable[[bool], Any] | None = None):
        """new_cache(first): an empty cache for a prefill (first: the one the batch keeps); None -> DynamicCache."""
        self.model, self.pad_id, self.dashkv = model, pad_id, dashkv
        self.new_cache = new_cache or (lambda first: DynamicCache(config=model.config))
        # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) long
        self.last: torch.Tensor | None = None  # (B,) the token each row feeds next
        self.rows: list[Any] = []

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def pads(self) -> list[int]:
        return (self.mask == 0).sum(-1).tolist() if self.mask is not None else []

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.new_cache(self.cache is None)})
        return _cache_of(out), mask, out.logits[:, -1].float()

    def join(self, prompts: list[list[int]], rows: list[Any]) -> torch.Tensor:
        """Prefill `prompts` and add them as new rows; returns their next-token logits (n, V)."""
        cache, mask, logits = self._prefill(prompts)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            length = max(self.length, mask.shape[1])
            merge_caches(self.cache, cache, length)
            self.mask = torch.cat([F.pad(self.mask, (length - self.length, 0)), F.pad(mask, (length - mask.shape[1], 0))])
        placeholder = torch.full((len(prompts),), self.pad_id, dtype=torch.long)
        self.last = placeholder if self.last is None else torch.cat([self.last, placeholder])
        self.rows.extend(rows)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's token (B,), return next-token logits (B, V)."""
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=torch.long)], dim=1)
        pos = _positions(self.mask)[:, -1:]
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=pos, use_cache=True,
                         **{self._cache_kw: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1].float()

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (in this order); crop columns that are padding in every remaining row."""
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not index:
            self.cache = self.mask = self.last = None
            return
        idx = torch.tensor(index, dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.last = self.last[idx]
        common = int((self.mask == 0).sum(-1).min())
        if common > 0:
            crop_left(self.cache, common)
            self.mask = self.mask[:, common:]
