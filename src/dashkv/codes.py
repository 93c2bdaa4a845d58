"""Binary codes: packing, Hamming and asymmetric scans, top-k (plain-torch reference implementations).

Layout (shared with the fast kernels in `dashkv.kernels`): a b-bit code is b/64 little-endian words
stored as `torch.int64` (bit-identical to uint64; torch's uint64 lacks most ops). Bit i of the code is
bit (i % 64) of word i // 64, i.e. bit (i % 8) of byte i // 8 of the code's bytes. A set bit means +1,
a clear bit means -1.

Scores are *similarities* (larger = more relevant):
- Hamming:     b - 2 * popcount(c_q XOR c_k)  ==  <sign(q'), sign(k')>      (integer in [-b, b])
- asymmetric:  <f_q(q), c_k> with c_k in {-1, +1}^b                       (real query, binary key)

Multi-bit key levels (`key_levels` L > 1): a key encoder with m = b / L outputs z_j stores each as an
L-bit offset-binary level v_j = clamp(floor(z_j + 2^(L-1)), 0, 2^L - 1), its bit t at code bit j*L + t.
The level's value v_j - (2^L - 1)/2 equals sum_t 2^(t-1) * s_(j,t) with s = +-1 the code's signs, so
<g, levels> is the asymmetric score of the sign code against g expanded to b weights
(g_j * 2^(t-1) at bit j*L + t): every scan above serves level codes unchanged.
"""

from __future__ import annotations

import functools

import torch

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)  # 1, 2, 4, ..., 128
POPCOUNT_LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A module-level constant table on `device` (copied once per device, so CUDA codes never mix with
    CPU tables and never pay a host-to-device copy per call)."""
    if device.type == "cpu":
        return table
    key = (id(table), device)
    found = _ON_DEVICE.get(key)
    if found is None:
        found = _ON_DEVICE[key] = table.to(device)
    return found


def check_bits(bits: int) -> None:
    if bits < 64 or bits % 64:
        raise ValueError(f"bits must be a positive multiple of 64, got {bits}")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack (..., b) bits (bool, or {-1,+1}/real where > 0 means set) into (..., b/64) int64 words."""
    b = bits.shape[-1]
    check_bits(b)
    set_ = bits if bits.dtype == torch.bool else bits > 0
    by = set_.reshape(*set_.shape[:-1], b // 8, 8).to(torch.uint8)
    packed = (by * _on(_BIT_WEIGHTS, by.device)).sum(-1, dtype=torch.int32).to(torch.uint8)  # (..., b/8) bytes
    return packed.contiguous().view(torch.int64)


def key_code_bits(proj: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """A key encoder's outputs (..., m) -> the code's bits (..., m * levels) bool (see the module doc):
    levels 1 is the sign code (set iff > 0); levels L > 1 the offset-binary L-bit levels, bit t of
    output j at bit j*L + t."""
    if levels == 1:
        return proj > 0
    v = _level_index(proj.float(), levels).to(torch.int32)
    t = torch.arange(levels, dtype=torch.int32, device=proj.device)
    return ((v.unsqueeze(-1) >> t) & 1).bool().reshape(*proj.shape[:-1], proj.shape[-1] * levels)


def _level_index(proj: torch.Tensor, levels: int) -> torch.Tensor:
    """The offset-binary level v = clamp(floor(z + 2^(L-1)), 0, 2^L - 1) of each output z (as a float)."""
    return torch.floor(proj + (1 << (levels - 1))).clamp(0, (1 << levels) - 1)


def level_values(proj: torch.Tensor, levels: int) -> torch.Tensor:
    """The value each key output is stored as: v - (2^L - 1)/2 (the level the code's signs sum to)."""
    return _level_index(proj, levels) - ((1 << levels) - 1) / 2


def level_weights(levels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(levels,) the weight 2^(t-1) of bit t of a level in the asymmetric score (1 for a sign code)."""
    if levels == 1:
        return torch.ones(1, dtype=dtype)
    return 2.0 ** (torch.arange(levels, dtype=dtype) - 1)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., W) int64 words -> (..., 64*W) bool."""
    if words.dtype != torch.int64:
        raise TypeError(f"packed codes must be int64 words, got {words.dtype}")
    by = words.contiguous().view(torch.uint8)  # (..., 8W), little-endian
    bits = (by.unsqueeze(-1) & _on(_BIT_WEIGHTS, by.device)) != 0
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 64)


def to_signs(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes -> {-1, +1} vectors."""
    return unpack_bits(words).to(dtype) * 2 - 1


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits per code: (..., W) int64 -> (...) int32."""
    by = words.contiguous().view(torch.uint8).long()
    return _on(POPCOUNT_LUT, by.device)[by].sum(-1, dtype=torch.int32)


def hamming_similarity(q_words: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """b - 2*popcount(q XOR k): q (..., W) against k (..., N, W) -> (..., N) int32."""
    bits = 64 * k_words.shape[-1]
    x = torch.bitwise_xor(q_words.unsqueeze(-2), k_words)
    return bits - 2 * popcount(x)


def hamming_similarity_reference(q_words: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """Bit-by-bit reference of `hamming_similarity` (slow, obviously correct)."""
    qb = unpack_bits(q_words).unsqueeze(-2)
    kb = unpack_bits(k_words)
    differ = (qb != kb).sum(-1, dtype=torch.int32)
    return kb.shape[-1] - 2 * differ


def asymmetric_scores_reference(q_proj: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """<q_proj, c_k> for q_proj (..., b) float against k (..., N, W): unpack and multiply."""
    signs = to_signs(k_words, q_proj.dtype)  # (..., N, b)
    return (signs * q_proj.unsqueeze(-2)).sum(-1)


def byte_tables(q_proj: torch.Tensor) -> torch.Tensor:
    """Per-byte look-up tables of the asymmetric score: (..., b) -> (..., b/8, 256).

    table[p, v] = sum_t q[8p+t] * (+1 if bit t of v else -1); the score of a key is then the sum of
    b/8 table entries, one per code byte: b/8 look-ups instead of b multiply-adds.
    """
    b = q_proj.shape[-1]
    q = q_proj.reshape(*q_proj.shape[:-1], b // 8, 8)
    v = torch.arange(256, device=q_proj.device)
    signs = ((v.unsqueeze(-1) >> torch.arange(8, device=q_proj.device)) & 1).to(q_proj.dtype) * 2 - 1  # (256, 8)
    return torch.einsum("...pt,vt->...pv", q, signs)


def asymmetric_scores(q_proj: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """Asymmetric scores through byte look-up tables (what the fast kernels do), in torch."""
    tables = byte_tables(q_proj)  # (..., P, 256)
    by = k_words.contiguous().view(torch.uint8).long()  # (..., N, P)
    n, p = by.shape[-2:]
    batch = torch.broadcast_shapes(tables.shape[:-2], by.shape[:-2])
    t = tables.expand(*batch, p, 256).unsqueeze(-3).expand(*batch, n, p, 256)
    return t.gather(-1, by.expand(*batch, n, p).unsqueeze(-1)).squeeze(-1).sum(-1)


def quantise_query(proj: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels of a query projection for the bit-plane scan: (..., b) float -> (..., b) int64.

    Symmetric, one scale per vector: v -> floor(v / delta + 0.5) with delta = max|v| / (2^(bits-1) - 1),
    in float64 (levels in [-(2^(bits-1)-1), 2^(bits-1)-1]; an all-zero vector gives zeros). The fused
    CPU kernel computes the same levels from the same float32 projection, bit for bit.
    """
    levels = (1 << (bits - 1)) - 1
    v = proj.double()
    delta = v.abs().amax(-1, keepdim=True) / levels
    x = torch.where(delta > 0, v / torch.where(delta > 0, delta, torch.ones_like(delta)), torch.zeros_like(v))
    return torch.floor(x + 0.5).clamp(-levels, levels).long()


PROB_FIELD_BITS = 21  # bits per query head in the fused kernel's packed probability tables (3 per int64)


@functools.lru_cache(maxsize=None)  # asked at every fused decode call
def probability_level_bits(words: int) -> int:
    """Bits L of the probability group score's integer query levels for codes of `words` 64-bit words.

    The fused CPU kernel scores three query heads with one table look-up: each int64 table entry packs
    three heads' byte sums offset to be non-negative (at most 16 (2^(L-1) - 1) each), and 8 * words
    entries are summed per code, so L is the largest with 128 * words * (2^(L-1) - 1) < 2^21: 15 bits
    for 64-bit codes (relative rounding of the projection 3e-5 of its largest component), 13 for 256.
    """
    lev = ((1 << PROB_FIELD_BITS) - 1) // (128 * words)
    bits = 1
    while (1 << bits) - 1 <= lev:  # 2^((bits+1)-1) - 1 still fits
        bits += 1
    return bits


def probability_logits(proj: torch.Tensor, temps: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """Estimated attention logits of the probability group score: (B, Hq, b) projection, (Hq,) float32
    temperatures, (B, Hkv, N, W) codes -> (B, Hq, N) float32.

    Each query head's projection is rounded to integer levels (`quantise_query` with
    `probability_level_bits`, step delta = max|v| / (2^(L-1) - 1)), its score s against each code is an
    exact integer, and the logit is float32(s) * float32(t * delta): what the fused kernel computes, bit
    for bit (float32 sums of integers below 2^24 are exact in any order)."""
    b, hq, bits = proj.shape
    hkv, n, w = k_words.shape[1:]
    lbits = probability_level_bits(w)
    p64 = proj.float().double()
    levels = quantise_query(proj.float(), lbits)
    delta = p64.abs().amax(-1) / ((1 << (lbits - 1)) - 1)  # (B, Hq) float64
    teff = (temps.double().to(delta.device)[None, :] * delta).float()
    # float64 tables: exact whatever the matmul precision (TF32 would round the 15-bit levels on CUDA)
    s = asymmetric_scores(levels.double().reshape(b, hkv, hq // hkv, bits), k_words[:, :, None]).float()
    return s.reshape(b, hq, n) * teff[..., None]


def quantised_scores(levels: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """Asymmetric score of integer query levels: sum_j levels_j * sign_j, (..., b) against (..., N, W)
    -> (..., N) int64. Exact (float64 sums of integers far below 2^53); the reference of the bit-plane
    scan, which computes sum_j levels_j * bit_j = (score + sum_j levels_j) / 2 and ranks by it."""
    signs = to_signs(k_words, torch.float64)  # (..., N, b)
    return (signs * levels.double().unsqueeze(-2)).sum(-1).round().long()
