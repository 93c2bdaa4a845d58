"""Slow, obviously-correct references shared by the CPU and Triton kernel tests."""

import torch

from dashkv.codes import asymmetric_scores_reference, hamming_similarity_reference, pack_bits


def reference_scores(q_proj, codes, grouping, scorer, dtype=torch.float32):
    """(B, Hs, N) scores per selecting head, from the bit-by-bit references."""
    b, hq, _ = q_proj.shape
    hkv, n = codes.shape[1], codes.shape[2]
    g = hq // hkv
    c = codes.repeat_interleave(g, dim=1)
    if scorer == "asymmetric":
        s = asymmetric_scores_reference(q_proj.to(dtype), c)
    else:
        s = hamming_similarity_reference(pack_bits(q_proj > 0), c).to(dtype)
    return s.reshape(b, hkv, g, n).sum(2) if grouping == "kv_head" else s
