"""Product-quantised key codes (`HashEncoders(kind="pq")`): b bits per key as b/8 one-byte centroid indices.

Why: at 64 bits the learned sign codes stayed 2-3 points of attention recall below exact top-k on the
default model (docs/RESULTS.md §3). The asymmetric scan already reads a code as b/8 byte look-ups into
tables made from the query; a sign code's 256-entry byte table is a sum of 8 +-q_t terms, a PQ code's is
any 256 centroids of an 8-dimensional sub-space. With the same code size, the same scan and the same
tables-per-step, each byte can spend its 256 values where this layer's keys actually are.

Per layer and KV head:
- `key_map` T (d, d): keys are compared as T k. T = diag(sqrt(ev)) V^T from the eigen-decomposition
  C = V diag(ev) V^T of the KV head's query covariance C = E[q q^T], with `query_map` T^-T on the query
  side, so that (T^-T q) . (T k) = q . k and k-means in the mapped space minimises the expected squared
  error of q . k over the model's queries rather than the error of k. The eigen-directions are dealt
  round-robin to the b/8 sub-spaces (so each holds a share of the variance) and T's rows are permuted so
  that sub-space p is rows [p s, (p + 1) s), s = d / (b / 8).
- `books` (b/8, 256, s): each sub-space's centroids, from k-means over the calibration keys.
- A key's code byte p is the index of the centroid nearest to (T k)[p s : (p + 1) s]; byte p is bits
  8 (p mod 8) .. of code word p // 8, the byte order the scan's tables use.
- A query's table entry (p, c) is (T^-T q)[p s : (p + 1) s] . books[p, c]: the score sum_p table[p, code_p]
  estimates q . k, and times the attention scale estimates the logit (`log_scale` = log(scale x b), so the
  probability group score's temperature, logit scale / b, is the model's own softmax scale).
"""

from __future__ import annotations

import torch
from torch import nn

CENTROIDS = 256  # one byte per sub-space


class PQLayer(nn.Module):
    """One layer's PQ key codes: per KV head a key map, a query map and the sub-spaces' centroids."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, bits: int):
        super().__init__()
        subspaces = bits // 8
        if head_dim % subspaces:
            raise ValueError(f"PQ codes cut the head dimension into bits / 8 = {subspaces} sub-spaces: "
                             f"{head_dim} is not a multiple of {subspaces}")
        sub = head_dim // subspaces
        eye = torch.eye(head_dim).expand(num_kv_heads, head_dim, head_dim).clone()
        self.key_map = nn.Parameter(eye.clone())
        self.query_map = nn.Parameter(eye)
        self.books = nn.Parameter(torch.zeros(num_kv_heads, subspaces, CENTROIDS, sub))
        self.log_scale = nn.Parameter(torch.zeros(num_q_heads))


def expected_shapes(num_q_heads: int, num_kv_heads: int, head_dim: int, bits: int) -> dict[str, tuple[int, ...]]:
    """State-dict names (within one layer) and shapes of a `PQLayer`, without allocating it."""
    p = bits // 8
    return {"key_map": (num_kv_heads, head_dim, head_dim), "query_map": (num_kv_heads, head_dim, head_dim),
            "books": (num_kv_heads, p, CENTROIDS, head_dim // max(p, 1)), "log_scale": (num_q_heads,)}


def encode_keys(layer: PQLayer, keys: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Keys (B, Hkv, N, d) -> packed codes (B, Hkv, N, b/64) int64: each sub-space's nearest centroid.

    One batched matmul per block of `chunk` tokens (|c|^2 - 2 x.c for every sub-space and centroid, then
    argmin; ties to the lower index): a block's (Hkv P, chunk, 256) distances stay in cache. Measured at
    8K tokens, one layer, 2 threads: 0.06 s, against 0.37 s for one (N, P, 256) einsum (10 s of an 8K
    prefill over 28 layers)."""
    b, hkv, n, d = keys.shape
    books = layer.books.detach().float()  # (Hkv, P, C, s)
    p, s = books.shape[1], books.shape[3]
    minus_two_books = books.transpose(-1, -2).reshape(hkv * p, s, CENTROIDS) * -2  # exact: a power of 2
    norms = (books * books).sum(-1).reshape(hkv * p, 1, CENTROIDS)
    mapped = torch.einsum("bhnd,hed->bhne", keys.float(), layer.key_map.detach().float())  # T k
    sub = mapped.reshape(b, hkv, n, p, s).permute(1, 3, 0, 2, 4).reshape(hkv * p, b * n, s)
    idx = torch.empty(hkv * p, b * n, dtype=torch.long, device=keys.device)
    for i in range(0, b * n, chunk):
        idx[:, i:i + chunk] = torch.baddbmm(norms, sub[:, i:i + chunk], minus_two_books).argmin(-1)
    words = idx.reshape(hkv, p, b, n).permute(2, 0, 3, 1).reshape(b, hkv, n, p // 8, 8)
    shifts = torch.arange(0, 64, 8, dtype=torch.long, device=keys.device)
    return (words << shifts).sum(-1)  # bytes in distinct bit ranges: the sum is their OR (wraps as int64)


def query_tables(layer: PQLayer, queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Queries (B, Hq, d) -> (B, Hq, b/8 * 256) float32 tables: entry (p, c) estimates the part of q . k
    held by a key whose byte p is c. float64 arithmetic, rounded to float32 once (the fused kernel's)."""
    b, hq, d = queries.shape
    g = hq // num_kv_heads
    qm = layer.query_map.detach().double()  # (Hkv, d, d)
    books = layer.books.detach().double()  # (Hkv, P, C, s)
    p, s = books.shape[1], books.shape[3]
    mapped = torch.einsum("bhgd,hed->bhge", queries.double().reshape(b, num_kv_heads, g, d), qm)
    tab = torch.einsum("bhgps,hpcs->bhgpc", mapped.reshape(b, num_kv_heads, g, p, s), books)
    return tab.reshape(b, hq, p * CENTROIDS).float()


def table_scores(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, Hq, P*256) tables (float or integer levels), (B, Hkv, N, W) codes -> (B, Hq, N) scores
    sum_p table[p, byte_p], summed in float64 (exact for integer levels)."""
    b, hq, width = tables.shape
    hkv, n, w = codes.shape[1:]
    g = hq // hkv
    shifts = torch.arange(0, 64, 8, dtype=torch.long, device=codes.device)
    idx = ((codes[..., None] >> shifts) & 255).reshape(b, hkv, n, w * 8)  # (B, Hkv, N, P) byte values
    idx = idx + torch.arange(w * 8, device=codes.device) * CENTROIDS  # flat table index
    tab = tables.double().reshape(b, hkv, g, width)
    flat = idx.reshape(b, hkv, 1, n * w * 8).expand(b, hkv, g, n * w * 8)
    return torch.gather(tab, 3, flat).reshape(b, hkv, g, n, w * 8).sum(-1).reshape(b, hq, n)


# ---- calibration --------------------------------------------------------------------------------

MAX_TRAIN_KEYS = 16384  # k-means points per sub-space: 64 per centroid (more cost time, not recall)
_CHUNK = 4096  # rows per assignment block (a 4096 x 256 distance block stays in cache)


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (rows of c) for each row of x, by |c|^2 - 2 x.c, block by block."""
    cc = (c * c).sum(1)[None]
    return torch.cat([(cc - 2 * x[i:i + _CHUNK] @ c.T).argmin(1) for i in range(0, x.shape[0], _CHUNK)])


def _kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """(k, m) centroids of the rows of x (n, m): a random-row start and `iters` Lloyd iterations; an
    emptied cluster restarts at a random row. Deterministic for the generator's seed."""
    n = x.shape[0]
    if n < k:  # fewer keys than centroids: every key is a centroid, the rest repeat the first
        return torch.cat([x, x[:1].expand(k - n, -1)]) if n else torch.zeros(k, x.shape[1])
    c = x[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(iters):
        a = _assign(x, c)
        total = torch.zeros_like(c).index_add_(0, a, x)
        count = torch.bincount(a, minlength=k).to(x.dtype)[:, None]
        empty = count[:, 0] == 0
        c = torch.where(empty[:, None], x[torch.randint(0, n, (k,), generator=g)], total / count.clamp_min(1))
    return c


def fit_layer(layer: PQLayer, keys: torch.Tensor, queries: torch.Tensor, scaling: float, bits: int,
              iters: int = 20, seed: int = 0) -> dict[str, float]:
    """Fit one layer's maps and centroids from captured keys (S, Hkv, L, d) and queries (S, Hq, P, d).

    Returns the mean relative error of q . k over the captured queries and keys (a calibration log)."""
    s_, hkv, _, d = keys.shape
    hq = queries.shape[1]
    g = torch.Generator().manual_seed(seed)
    p = bits // 8
    sub = d // p
    errs = []
    for h in range(hkv):
        k = keys[:, h].reshape(-1, d).double()
        q = queries[:, h * (hq // hkv):(h + 1) * (hq // hkv)].reshape(-1, d).double()
        ev, vec = torch.linalg.eigh(q.T @ q / max(q.shape[0], 1))
        ev = ev.clamp_min(float(ev.max().clamp_min(1e-30)) * 1e-6)
        order = torch.argsort(ev, descending=True)
        rows = torch.cat([order[j::p] for j in range(p)])  # sub-space j: eigen-directions j, j + p, ...
        t = (vec * ev.sqrt()).T[rows]  # (d, d): row r = sqrt(ev_r) v_r^T, permuted
        tq = (vec / ev.sqrt()).T[rows]  # T^-T, the same permutation: (tq q) . (t k) = q . k
        mapped = (k @ t.T).float()
        train = mapped[torch.randperm(mapped.shape[0], generator=g)[:MAX_TRAIN_KEYS]]  # a seeded sample
        books = torch.stack([_kmeans(train[:, j * sub:(j + 1) * sub].contiguous(), CENTROIDS, iters, g)
                             for j in range(p)])
        layer.key_map.data[h] = t.float()
        layer.query_map.data[h] = tq.float()
        layer.books.data[h] = books
        # quality: relative error of q . k_hat over a sample of the captured pairs
        recon = _reconstruct(mapped[:4096], books)
        qm = (q[:256] @ tq.T).float()
        exact, approx = qm @ mapped[:4096].T, qm @ recon.T
        errs.append(float((approx - exact).norm() / exact.norm().clamp_min(1e-12)))
    layer.log_scale.data.fill_(float(torch.log(torch.tensor(scaling * bits, dtype=torch.float64))))
    return {"qk_rel_error": sum(errs) / len(errs)}


def _reconstruct(mapped: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Mapped keys (n, d) -> their nearest centroids per sub-space, concatenated (n, d)."""
    p, _, s = books.shape
    out = torch.empty_like(mapped)
    for j in range(p):
        out[:, j * s:(j + 1) * s] = books[j][_assign(mapped[:, j * s:(j + 1) * s], books[j])]
    return out


def pq_probability_logits(tables: torch.Tensor, temps: torch.Tensor, k_words: torch.Tensor) -> torch.Tensor:
    """Estimated attention logits of PQ codes for the probability group score: (B, Hq, P*256) float32
    tables, (Hq,) temperatures, (B, Hkv, N, W) codes -> (B, Hq, N) float32.

    Each query head's table is rounded to integer levels, as `probability_logits` rounds a projection
    (`probability_level_bits`, step delta = max|table| / (2^(L-1) - 1), level floor(x (1 / delta) + 0.5):
    a multiply, which vectorises in the kernel, where the projection's levels divide); the score is
    the exact integer sum of a code's P entries and the logit float32(score) * float32(t * delta): what the
    fused CPU kernel computes, bit for bit."""
    from .codes import probability_level_bits

    lbits = probability_level_bits(k_words.shape[-1])
    lev = (1 << (lbits - 1)) - 1
    t64 = tables.float().double()
    delta = t64.abs().amax(-1) / lev  # (B, Hq)
    inv = torch.where(delta > 0, 1.0 / torch.where(delta > 0, delta, torch.ones_like(delta)), torch.zeros_like(delta))
    levels = torch.floor(t64 * inv[..., None] + 0.5).clamp(-lev, lev)  # x * (1 / delta): the kernel's rounding
    teff = (temps.double().to(delta.device)[None, :] * delta).float()
    return table_scores(levels, k_words).float() * teff[..., None]
