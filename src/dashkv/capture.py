"""Capture a frozen model's post-RoPE queries, keys (and values) per attention layer.

Calibration and its evaluation need what attention really compares: the queries and keys *after*
RoPE, exactly as the attention kernel receives them. We get them by registering a pass-through
attention function with transformers' `AttentionInterface` that records its inputs and delegates the
computation to the stock SDPA implementation, switching the model to it only for the capture
(`set_attn_implementation`) and restoring the previous implementation afterwards.

Memory stays bounded: sequences stream through the model one at a time; per layer we keep every
key (and value, if asked) of each sequence but only a sample of query positions (default: 32 per
sequence, drawn from the later half, where decode-like queries see a long prefix).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

CAPTURE_ATTN = "dashkv_capture"

# the recorder of the capture in progress (one at a time; capture is not re-entrant)
_ACTIVE: "_Recorder | None" = None


@dataclass
class LayerCapture:
    """What one layer's attention saw, over S sequences of length L.

    keys:      (S, Hkv, L, d) post-RoPE keys of every position
    values:    (S, Hkv, L, d) or None
    queries:   (S, Hq, P, d) post-RoPE queries at the sampled positions
    positions: (S, P) int64 sampled query positions (sorted), each query attends to keys [0, pos]
    scaling:   the softmax scale the model uses (1/sqrt(d) for most models)
    """

    keys: torch.Tensor
    values: torch.Tensor | None
    queries: torch.Tensor
    positions: torch.Tensor
    scaling: float

    @property
    def num_sequences(self) -> int:
        return self.keys.shape[0]


class _StopForward(Exception):
    """Raised after the last captured layer: later layers and the LM head are not needed."""


class _Recorder:
    def __init__(self, layers: set[int], positions: torch.Tensor | None, keep_values: bool, dtype: torch.dtype):
        self.layers = layers
        self.last = max(layers)
        self.positions = positions  # (P,) for the sequence being run
        self.keep_values = keep_values
        self.dtype = dtype
        self.out: dict[int, dict] = {}

    def record(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling) -> None:
        idx = getattr(module, "layer_idx", None)
        if idx is None or idx not in self.layers:
            return
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        # batch of one sequence: (1, H, L, d)
        entry = self.out.setdefault(idx, {"scaling": float(scaling)})
        entry["keys"] = key[0].detach().to(self.dtype).clone()
        entry["values"] = value[0].detach().to(self.dtype).clone() if self.keep_values else None
        entry["queries"] = query[0, :, self.positions].detach().to(self.dtype).clone()
        if idx == self.last and set(self.out) >= self.layers:
            raise _StopForward


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE is not None:
        _ACTIVE.record(module, query, key, value, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)  # the masks SDPA would get


@contextlib.contextmanager
def capturing(model, recorder: _Recorder) -> Iterator[None]:
    """Route the model's attention through the recorder; restore the previous implementation after."""
    global _ACTIVE
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTN)
    _ACTIVE = recorder
    try:
        yield
    finally:
        _ACTIVE = None
        model.set_attn_implementation(previous)


def sample_positions(seq_len: int, count: int, generator: torch.Generator, query_from: float = 0.5) -> torch.Tensor:
    """`count` distinct sorted positions in [query_from * seq_len, seq_len)."""
    lo = min(seq_len - 1, int(seq_len * query_from))
    span = seq_len - lo
    count = min(count, span)
    return (torch.randperm(span, generator=generator)[:count] + lo).sort().values


def capture_qkv(model, sequences: torch.Tensor | Sequence[torch.Tensor], layers: Iterable[int], *,
                queries_per_seq: int = 32, query_from: float = 0.5, positions: torch.Tensor | None = None,
                keep_values: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                progress: bool = True, desc: str = "capture") -> dict[int, LayerCapture]:
    """Run `model` over each sequence (S, L) of token ids and capture the given layers' Q/K(/V).

    Query positions are `positions` (P,) for every sequence if given, else `queries_per_seq` random
    positions per sequence from the later part (`query_from`), drawn from a generator seeded by `seed`.
    """
    from tqdm.auto import tqdm

    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if not seqs:
        raise ValueError("no sequences to capture")
    layer_set = {int(i) for i in layers}
    g = torch.Generator().manual_seed(seed)
    per_layer: dict[int, dict[str, list]] = {i: {"keys": [], "values": [], "queries": [], "positions": []}
                                             for i in layer_set}
    scalings: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(seqs, desc=desc, unit="seq", disable=not progress, leave=False):
            pos = positions if positions is not None else sample_positions(len(ids), queries_per_seq, g, query_from)
            rec = _Recorder(layer_set, pos, keep_values, dtype)
            with capturing(model, rec), torch.no_grad():
                try:
                    model(input_ids=ids[None], use_cache=False)
                except _StopForward:
                    pass
            missing = layer_set - set(rec.out)
            if missing:
                raise RuntimeError(f"capture saw no attention call for layers {sorted(missing)}")
            for i, e in rec.out.items():
                d = per_layer[i]
                d["keys"].append(e["keys"])
                d["values"].append(e["values"])
                d["queries"].append(e["queries"])
                d["positions"].append(pos.clone())
                scalings[i] = e["scaling"]
    finally:
        model.train(was_training)
    out: dict[int, LayerCapture] = {}
    for i, d in per_layer.items():
        out[i] = LayerCapture(
            keys=torch.stack(d["keys"]),
            values=torch.stack(d["values"]) if keep_values else None,
            queries=torch.stack(d["queries"]),
            positions=torch.stack(d["positions"]),
            scaling=scalings[i],
        )
    return out
