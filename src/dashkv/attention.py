"""Decode attention over a selection, with an exact tier and an optional 8-bit tier (reference, torch).

Both tiers enter one softmax: the logits of exact rows and of dequantised 8-bit rows are concatenated,
which is the same as merging the two partial attentions through their log-sum-exp. Skipped tokens
stay in the cache; they are only not read this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import Selection

NEG_INF = float("-inf")


@dataclass
class QuantizedRows:
    """Symmetric per-token copy of K or V at 8 or 4 bits: x ≈ q * scale, |x - q*scale| <= scale/2.

    8 bits: q (B, H, N, d) int8 in +-127, scale = max|x| / 127. 4 bits (the re-rank stage's keys, half
    the bytes): levels in +-7, scale = max|x| / 7, packed two per byte into q (B, H, N, d/2) int8:
    element 2i in the low nibble, 2i+1 in the high one, each stored as level + 8 (1..15).
    """

    q: torch.Tensor  # (B, H, N, d) int8, or (B, H, N, d/2) packed nibbles with bits=4
    scale: torch.Tensor  # (B, H, N, 1) float32
    bits: int = 8

    @classmethod
    def quantize(cls, x: torch.Tensor, bits: int = 8) -> "QuantizedRows":
        if bits not in (4, 8):
            raise ValueError(f"QuantizedRows: bits={bits!r} is invalid: must be 8 or 4")
        top = 127.0 if bits == 8 else 7.0
        scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
        q = torch.round(x.float() / scale).clamp(-top, top)
        if bits == 8:
            return cls(q=q.to(torch.int8), scale=scale)
        if x.shape[-1] % 2:
            raise ValueError(f"QuantizedRows: 4-bit rows need an even row length, got {x.shape[-1]}")
        nib = (q + 8).to(torch.uint8)
        packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
        return cls(q=packed.view(torch.int8), scale=scale, bits=4)

    def levels(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """The integer levels (float32) of q (default: all rows), unpacked for 4 bits."""
        q = self.q if q is None else q
        if self.bits == 8:
            return q.float()
        u = q.view(torch.uint8)
        lo, hi = (u & 15).float() - 8.0, (u >> 4).float() - 8.0
        return torch.stack((lo, hi), -1).flatten(-2)

    def prefix(self, n: int) -> "QuantizedRows":
        """The first n tokens' rows (a view)."""
        return QuantizedRows(self.q[:, :, :n], self.scale[:, :, :n], self.bits)

    def dequantize(self) -> torch.Tensor:
        return self.levels() * self.scale

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantised rows at idx (shaped as `gather_rows` takes): only the read rows are converted."""
        return self.levels(gather_rows(self.q, idx)) * gather_rows(self.scale, idx)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, Hkv, N, d) at idx (B, Hs, K) -> (B, Hkv, Hs/Hkv, K, d).

    Hs == Hkv: one row set per KV head (shared by its query heads); Hs == Hq: one per query head.
    """
    b, hkv, n, d = x.shape
    hs, k = idx.shape[1], idx.shape[2]
    g = hs // hkv
    idx = idx.reshape(b, hkv, g, k, 1).expand(-1, -1, -1, -1, d)
    return x[:, :, None].expand(-1, -1, g, -1, -1).gather(3, idx)


def dense_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention of (B, Hq, Q, d) queries over (B, Hkv, N, d) keys/values (GQA), for the last Q
    positions (causal among them). valid: (B, N) bool, False for left padding."""
    b, hq, lq, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = query.float().reshape(b, hkv, g * lq, d)
    logits = (q @ keys.float().transpose(-1, -2)) * scaling  # (B, Hkv, G*Q, N)
    logits = logits.reshape(b, hkv, g, lq, n)
    mask = torch.arange(n)[None, :] <= (torch.arange(lq) + n - lq)[:, None]  # causal (Q, N)
    mask = mask[None, None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, None, :]
    logits = logits.masked_fill(~mask, NEG_INF)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    out = probs.reshape(b, hkv, g * lq, n) @ values.float()
    return out.reshape(b, hq, lq, d).to(query.dtype)


def sparse_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: Selection,
                            scaling: float, lowprec: tuple[QuantizedRows, QuantizedRows] | None = None,
                            return_probs: bool = False):
    """Attention of one decode query (B, Hq, 1, d) restricted to `selection`.

    Exact slots read K/V in full precision; low-precision slots read the 8-bit copies `lowprec` = (K8, V8).
    Returns out (B, Hq, 1, d) [, probs (B, Hs, K): attention mass per slot summed over the query heads
    that share the slot, for policies that learn from it (H2O)].
    """
    b, hq, lq, d = query.shape
    if lq != 1:
        raise ValueError(f"sparse decode attention takes one query per sequence, got {lq}")
    hkv = keys.shape[1]
    hs = selection.heads
    g_sel = hs // hkv  # 1 (per KV head) or G (per query head)
    g = hq // hkv
    q = query.float().reshape(b, hkv, g, d)
    k_rows = gather_rows(keys, selection.indices).float()  # (B, Hkv, g_sel, K, d)
    v_rows = gather_rows(values, selection.indices).float()
    use = selection.exact
    if selection.lowprec is not None:
        if lowprec is None:
            raise ValueError("the selection has a low-precision tier but no 8-bit K/V copy was given")
        k8, v8 = lowprec
        lp = selection.lowprec.reshape(b, hkv, g_sel, -1, 1)
        k_rows = torch.where(lp, k8.gather(selection.indices), k_rows)
        v_rows = torch.where(lp, v8.gather(selection.indices), v_rows)
        use = use | selection.lowprec
    # (B, Hkv, G, K): each query head against its row set (shared: g_sel == 1, own: g_sel == G)
    logits = torch.einsum("bhgd,bhgkd->bhgk", q, k_rows.expand(-1, -1, g, -1, -1)) * scaling
    mask = use.reshape(b, hkv, g_sel, -1).expand(-1, -1, g, -1)
    logits = logits.masked_fill(~mask, NEG_INF)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    out = torch.einsum("bhgk,bhgkd->bhgd", probs, v_rows.expand(-1, -1, g, -1, -1))
    out = out.reshape(b, hq, 1, d).to(query.dtype)
    if not return_probs:
        return out
    slot_mass = probs.reshape(b, hkv, g_sel, g // g_sel, -1).sum(3).reshape(b, hs, -1)
    return out, slot_mass


def restricted_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                   allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Masked dense reference: softmax attention of (B, Hq, 1, d) restricted to allowed (B, Hq, N) bool."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    k = keys.float().repeat_interleave(hq // hkv, dim=1)
    v = values.float().repeat_interleave(hq // hkv, dim=1)
    logits = (query.float() @ k.transpose(-1, -2))[:, :, 0] * scaling
    logits = logits.masked_fill(~allowed, NEG_INF)
    return (torch.softmax(logits, -1).nan_to_num(0.0)[:, :, None, :] @ v).to(query.dtype)
