"""The memory a request's KV cache will take, so a batch (and a single request) can be bounded up front.

Per token the cache holds K and V of every layer (layers x kv_heads x head_dim x 2 x dtype bytes) and,
in DASH-KV-managed layers, one b-bit code per KV head (bits / 8 bytes). A left-padded batch stores every
row at the longest prompt plus the longest completion, so the batch estimate is rows x that length.
Sliding-window layers are counted at full length (transformers' cache keeps them that way on short
contexts; it over-estimates, which is the safe side). Buffer growth slack (DashKVLayer grows by 25%) is
not included: the bound is on the tokens requested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MB', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 4GiB, 512MB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class KVFootprint:
    """Bytes per cached token of one sequence, split in dense K/V and key codes."""

    kv_bytes_per_token: int
    code_bytes_per_token: int

    @classmethod
    def of(cls, shape, dtype_bytes: int, managed_layers: int, bits: int) -> "KVFootprint":
        kv = shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * dtype_bytes
        codes = managed_layers * shape.num_kv_heads * bits // 8
        return cls(kv, codes)

    def per_token(self, dashkv: bool) -> int:
        return self.kv_bytes_per_token + (self.code_bytes_per_token if dashkv else 0)

    def batch_bytes(self, rows: list[tuple[int, int]], dashkv: bool) -> int:
        """rows: (prompt tokens, max new tokens) of each request in one left-padded batch."""
        if not rows:
            return 0
        length = max(p for p, _ in rows) + max(n for _, n in rows)
        return len(rows) * length * self.per_token(dashkv)
