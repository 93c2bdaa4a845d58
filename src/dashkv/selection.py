"""Selection policies: which cached tokens one decode step reads, for DASH-KV and every baseline.

Every policy answers the same question over the same attention path (`dashkv.attention`): given the
query of this step and what the cache holds for a layer, return a `Selection` of at most the budget's
tokens per selecting head. So DASH-KV, StreamingLLM, H2O, SnapKV, Quest, SimHash and oracle top-k are
compared at equal budget by construction; sinks and the recent window count inside that budget.

Most policies only differ in `score`: a relevance per cached token, from which `build_selection` takes
sinks, window and the top candidates. Policies that need statistics (H2O, SnapKV) or per-token
metadata (DASH-KV's key codes, Quest's page bounds) keep them in the per-layer `LayerState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .codes import (asymmetric_scores, hamming_similarity, pack_bits, probability_logits, quantise_query,
                    quantised_scores)
from .config import DashKVConfig, StepPlan
from .pq import pq_probability_logits
from .encoders import HashEncoders

NEG_INF = float("-inf")


@dataclass
class Selection:
    """Tokens read by one decode step: one row of indices per selecting head.

    indices: (B, Hs, K) int64 positions in [0, N); Hs is the KV-head count (one set shared by a group of
             query heads) or the query-head count (one set per query head).
    exact:   (B, Hs, K) bool, served from full-precision K/V.
    lowprec: (B, Hs, K) bool or None, served from the 8-bit copy. A slot in neither is unused.
    """

    indices: torch.Tensor
    exact: torch.Tensor
    lowprec: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.indices.shape[1]

    def used(self) -> torch.Tensor:
        """(B, Hs, K) bool: the slots read, from either tier."""
        return self.exact if self.lowprec is None else (self.exact | self.lowprec)

    def attended(self) -> torch.Tensor:
        """Tokens read per (batch, selecting head): (B, Hs) int64."""
        return self.used().sum(-1)


@dataclass
class LayerState:
    """Per-layer, per-sequence state a policy keeps beside the cache (codes, statistics).

    Owned by the cache layer (one per sequence batch and layer), never by the policy, so concurrent
    `generate` calls on one model share nothing mutable. Contract for `stats`: every value is a tensor
    laid out (B, H, N_seen, ...) -- batch first, one entry per cached token on dim 2 -- so the cache can
    crop (dim 2) and reorder beams / select batch rows (dim 0) without knowing the policy.
    """

    layer_idx: int
    codes: torch.Tensor | None = None  # (B, Hkv, N, W) packed key codes, kept by the cache
    keys8: Any = None  # QuantizedRows (B, Hkv, N, d) int8 (or packed int4) keys for the re-rank stage, kept by the cache
    buffer_views: Any = None  # the cache's kernels.cpu.BufferViews of its K/V/code buffers (CPU), or None
    carry: Any = None  # the cache's TemporalCarry, shared by its layers (cross-layer momentum), or None
    stats: dict[str, Any] = field(default_factory=dict)


def valid_positions(n: int, start: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """(B, N) bool: True where a cached position holds a real token (left padding excluded)."""
    pos = torch.arange(n, device=device)
    if start is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return pos[None, :] >= start[:, None]


def build_selection(scores: torch.Tensor, plan: StepPlan, start: torch.Tensor | None,
                    mass_logits: torch.Tensor | None = None, config: DashKVConfig | None = None,
                    stable: bool = False) -> Selection:
    """Sinks ∪ window ∪ top-scoring candidates, within the plan's budget.

    scores: (B, Hs, N) relevance (larger = better). `mass_logits`, if given with `config.adaptive`,
    are per-token logits whose softmax estimates attention mass: the exact tier then stops at the
    smallest candidate count whose estimated mass (with sinks and window) reaches `config.mass_target`,
    bounded by [k_min, plan.critical]; the rest of the candidate budget goes to the low-precision tier
    if it is enabled, and is skipped otherwise.
    """
    bsz, hs, n = scores.shape
    device = scores.device
    pos = torch.arange(n, device=device)
    st = torch.zeros(bsz, dtype=torch.long, device=device) if start is None else start.to(device)
    valid = pos[None, :] >= st[:, None]  # (B, N)
    window_start = n - plan.window
    fixed = valid & ((pos[None, :] < st[:, None] + plan.sink) | (pos[None, :] >= window_start))  # (B, N)
    candidate = valid & ~fixed
    pooled = config is not None and config.head_budget == "pooled" and hs > 1 and plan.critical > 0
    k = min(plan.critical + plan.lowprec, n)
    if pooled:  # a head may take up to POOL_CAP x the mean exact tier
        k = min(POOL_CAP * plan.critical + plan.lowprec, n)
    cand_scores = (scores if scores.dtype == torch.float64 else scores.float()).masked_fill(
        ~candidate[:, None, :], NEG_INF)
    if stable and k > 0:  # exact ties go to the lower position, as in the fused kernel
        top_vals, top_idx = torch.sort(cand_scores, dim=-1, descending=True, stable=True)
        top_vals, top_idx = top_vals[..., :k], top_idx[..., :k]
    else:
        top_vals, top_idx = cand_scores.topk(k, dim=-1, sorted=True) if k > 0 else (
            cand_scores[..., :0], torch.zeros(bsz, hs, 0, dtype=torch.long, device=device))
    top_ok = top_vals > NEG_INF
    slot = torch.arange(k, device=device)
    n_exact = torch.full((bsz, hs, 1), plan.critical, dtype=torch.long, device=device)
    if config is not None and config.adaptive and mass_logits is not None and k > 0:
        logits = mass_logits.float().masked_fill(~valid[:, None, :], NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        fixed_mass = (probs * fixed[:, None, :]).sum(-1, keepdim=True)
        cum = fixed_mass + probs.gather(-1, top_idx).cumsum(-1)  # mass after taking 1..k candidates
        reached = (cum >= config.mass_target).float()
        first = torch.where(reached.any(-1, keepdim=True), reached.argmax(-1, keepdim=True) + 1,
                            torch.full_like(n_exact, k))
        n_exact = first.clamp(min=min(config.k_min, plan.critical), max=plan.critical)
    exact_c = top_ok & (slot < n_exact)
    if pooled:
        exact_c = top_ok & pooled_exact_slots(top_vals, top_ok, plan.critical, min(config.k_min, plan.critical))
    lowprec_c = top_ok & (slot >= n_exact) if plan.lowprec > 0 else None

    # fixed positions (sinks then window), one row per batch element, shared by all selecting heads
    sink_idx = st[:, None] + torch.arange(plan.sink, device=device)[None, :]
    win_idx = torch.arange(window_start, n, device=device)[None, :].expand(bsz, -1)
    fixed_idx = torch.cat([sink_idx, win_idx], dim=1).clamp(max=n - 1)
    fixed_ok = torch.cat([
        (sink_idx < window_start) & (sink_idx < n),
        win_idx >= st[:, None],
    ], dim=1)
    indices = torch.cat([fixed_idx[:, None, :].expand(-1, hs, -1), top_idx], dim=-1)
    exact = torch.cat([fixed_ok[:, None, :].expand(-1, hs, -1), exact_c], dim=-1)
    lowprec = None
    if lowprec_c is not None:
        lowprec = torch.cat([torch.zeros_like(fixed_ok)[:, None, :].expand(-1, hs, -1), lowprec_c], dim=-1)
    return Selection(indices=indices, exact=exact, lowprec=lowprec)


#: With `head_budget="pooled"`, no selecting head takes more than this many times the mean exact tier.
POOL_CAP = 4


def pooled_exact_slots(top_vals: torch.Tensor, top_ok: torch.Tensor, mean_k: int, k_min: int) -> torch.Tensor:
    """Per-head exact-tier sizes at an equal mean: (B, Hs, K) bool over each head's sorted candidates.

    top_vals are estimated attention probabilities, comparable across heads (each query head's sum to
    one), sorted descending per head. Every head keeps its first `k_min`; the rest of the row's
    Hs x mean_k slots go to the most probable candidates of *any* head, so a
    head whose attention is concentrated gives its tail to a diffuse one. The total stays Hs x mean_k:
    the budget counts the same tokens as the fixed split, only spread by need. Ties: lower head, then
    lower slot (stable over the flattened row).
    """
    b, hs, k = top_vals.shape
    slot = torch.arange(k, device=top_vals.device)
    base = (slot < k_min)[None, None, :] & top_ok
    rest = top_vals.masked_fill(~top_ok | base, float("-inf")).reshape(b, hs * k)
    extra = hs * mean_k - base.reshape(b, -1).sum(-1)  # (B,): a head short of its floor leaves it to others
    take = torch.zeros(b, hs * k, dtype=torch.bool, device=top_vals.device)
    if int(extra.max()) > 0:
        order = torch.sort(rest, dim=-1, descending=True, stable=True).indices
        rank = torch.arange(hs * k, device=top_vals.device)[None, :]
        take.scatter_(-1, order, rank < extra[:, None])
        take &= rest > float("-inf")
    return base | take.reshape(b, hs, k)


def pooled_counts(buckets: torch.Tensor, candidate: torch.Tensor, mids: torch.Tensor | None, temps,
                  mean_k: int, k_min: int, cap: int, nbins: int | None = None) -> torch.Tensor:
    """Reference of the fused kernel's pooled budgets (`kernels.cpu._pool_counts`), in plain loops.

    buckets (B, Hs, N) int: each token's score bucket; candidate (B, N) bool; mids (B, Hs, nbins) float64:
    the score at each bucket's middle; temps (Hs,). Estimated log-probability of a token of head s in
    bucket t: temps[s] * mids[s, t] - log Z_s. Each head keeps its best min(k_min, cap) tokens; the rest of
    the row's Hs x mean_k go bucket by bucket to the highest estimate of any head (ties: lower head),
    at most `cap` per head. Returns (B, Hs) int64: tokens selected per head. mids None: the buckets of all
    heads share one map, monotone in the estimate, and the bucket index is the estimate (`nbins` buckets;
    the probability group score's pooled budgets, `_pool_greedy`).
    """
    b_, hs, _ = buckets.shape
    nbins = mids.shape[-1] if mids is not None else int(nbins)
    out = torch.zeros(b_, hs, dtype=torch.int64)
    for b in range(b_):
        cand = candidate[b]
        if not bool(cand.any()):
            continue
        hist = [torch.bincount(buckets[b, x][cand].long(), minlength=nbins).tolist() for x in range(hs)]
        if mids is None:
            mid, temps, logz = [list(range(nbins))] * hs, [1.0] * hs, [0.0] * hs
        else:
            mid = mids[b].tolist()
            logz = []
            for x in range(hs):
                vals = [temps[x] * mid[x][t] for t in range(nbins) if hist[x][t] > 0]
                m = max(vals)
                logz.append(m + math.log(sum(h * math.exp(temps[x] * mid[x][t] - m)
                                             for t, h in enumerate(hist[x]) if h > 0)))
        counts, extra, ptr = [], 0, []
        for x in range(hs):
            f = min(k_min, cap)
            counts.append(f)
            extra += mean_k - f
            order = [t for t in range(nbins - 1, -1, -1) if hist[x][t] > 0]
            remaining = [(t, hist[x][t]) for t in order]
            rem = f
            while remaining and rem > 0:  # the floor takes the best f
                t, h = remaining[0]
                if h > rem:
                    remaining[0] = (t, h - rem)
                    rem = 0
                else:
                    rem -= h
                    remaining.pop(0)
            ptr.append(remaining)
        while extra > 0:
            best, bu = -1, -math.inf
            for x in range(hs):
                if ptr[x] and counts[x] < cap:
                    u = temps[x] * mid[x][ptr[x][0][0]] - logz[x]
                    if best < 0 or u > bu:
                        best, bu = x, u
            if best < 0:
                break
            t, h = ptr[best][0]
            take = min(h, extra, cap - counts[best])
            counts[best] += take
            extra -= take
            if take == h:
                ptr[best].pop(0)
            else:
                ptr[best][0] = (t, h - take)
        out[b] = torch.tensor(counts)
    return out


def selection_with_counts(scores: torch.Tensor, counts: torch.Tensor, plan: StepPlan,
                          start: torch.Tensor | None) -> Selection:
    """Sinks ∪ window ∪ each head's best counts[b, h] candidates by `scores` (stable: lower position first):
    the pooled budgets' selection once their per-head sizes are known."""
    kmax = max(1, int(counts.max()))
    first = build_selection(scores, replace(plan, critical=kmax, lowprec=0), start, stable=True)
    slot = torch.arange(kmax)
    fixed = plan.sink + plan.window
    exact = first.exact.clone()
    exact[..., fixed:] &= slot[None, None, :] < counts[..., None].to(exact.device)
    return Selection(indices=first.indices, exact=exact)


class TemporalCarry:
    """What one decode step's DASH-KV layer leaves for the next one (distance calibration Δ_temporal): the
    log of its attention, mean over its query heads, on the tokens it read (the floor elsewhere).

    One per cache (hence per call); the layers of a step run in order and share the context length n,
    so an entry is used only by a *higher* layer at the same n and batch size, i.e. a later layer of the
    same step (a step that starts again at the same n, after a crop or reset, starts at a lower layer).
    Multi-token chunks (assisted generation's verification, `hf._decode_rows`) rank without it.
    """

    def __init__(self) -> None:
        self.entry: tuple[int, int, torch.Tensor] | None = None  # (layer, n, log-attention (B, n))

    def get(self, layer_idx: int, n: int, batch: int) -> torch.Tensor | None:
        e = self.entry
        ok = e is not None and e[0] < layer_idx and e[1] == n and e[2].shape[0] == batch
        return e[2] if ok else None

    def put(self, layer_idx: int, n: int, selection: "Selection", probs: torch.Tensor, num_q_heads: int) -> None:
        """probs (B, Hs, K): attention per slot summed over the query heads sharing it (sparse attention)."""
        b = probs.shape[0]
        used = selection.used().reshape(b, -1)
        idx = selection.indices.reshape(b, -1)
        mass = torch.zeros(b, n, dtype=torch.float32, device=probs.device)
        mass.scatter_add_(1, idx, probs.float().reshape(b, -1) * used)
        reads = torch.zeros(b, n, dtype=torch.float32, device=probs.device)
        reads.scatter_add_(1, idx, used.float())  # a sum, so an unused slot never un-marks a read token
        seen = reads > 0
        logp = torch.log(mass / num_q_heads + 1e-9)
        floor = logp.masked_fill(~seen, float("inf")).amin(-1, keepdim=True)
        self.entry = (layer_idx, n, torch.where(seen, logp, floor))


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)


def temporal_momentum(scores: torch.Tensor, carried: torch.Tensor, mu: float) -> torch.Tensor:
    """scores + μ·σ·z(carried), σ each selecting head's score spread: it ranks as z(scores) + μ·z(carried)
    and keeps the scores' own scale, which pooled budgets and the re-rank stage's tie-break rely on.
    scores (B, Hs, N), carried (B, N) the previous layer's log-attention."""
    s = scores.float()
    return s + mu * s.std(-1, keepdim=True).clamp_min(1e-6) * _standardised(carried)[:, None, :]


def successor_pool(scores: torch.Tensor, span: int) -> torch.Tensor:
    """(B, Hs, N) -> each position's score the max of its own and its `span` predecessors' (positions
    before 0 count as -inf): a high-scoring token lifts the tokens right after it to its rank, so top-k
    takes them together (copying a span needs the successor of what was just read)."""
    out = scores.clone()
    for i in range(1, min(span, scores.shape[-1] - 1) + 1):
        out[..., i:] = torch.maximum(out[..., i:], scores[..., :-i])
    return out


def spatial_vote(scores: torch.Tensor, lam: float) -> torch.Tensor:
    """Distance calibration Δ_spatial: (B, Hq, N) per-query-head scores plus lam·σ_h·vote, where vote is
    the mean over the layer's query heads of each head's standardised score (a cross-head vote: a key
    that many heads rank highly gains; lam < 0 discounts it). Measured in docs/calibration.md."""
    s = scores.float()
    vote = _standardised(s).mean(1, keepdim=True)
    return s + lam * s.std(-1, keepdim=True).clamp_min(1e-6) * vote


def group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, d) -> (B, Hkv, G, d): the query heads that share each KV head."""
    b, hq, d = query.shape
    return query.reshape(b, num_kv_heads, hq // num_kv_heads, d)


class SelectionPolicy:
    """Base policy: subclasses define `score` (and optionally the hooks).

    The policy is the single owner of a decode step's configuration: `decode_step`, the fused kernels
    and the cache all read `policy.config` (and `policy.scorer`), never a copy held elsewhere. The
    policy keeps no per-sequence state (that lives in `LayerState`), so one policy serves concurrent
    generate calls.
    """

    name = "base"
    uses_codes = False  # True: the cache stores packed key codes from `encode_keys`

    def __init__(self, config: DashKVConfig):
        if not self.uses_codes and config.group_score is None:
            # a baseline scans no codes: the group score's default must not move its dense threshold
            # (`dense_context` is measured per group score for DASH-KV's kernel)
            config = DashKVConfig(**{**config.to_dict(), "group_score": "sum"})
        self.config = config

    @property
    def scorer(self) -> str:
        """How key codes are scored against the query: "asymmetric" or "hamming" (code-based policies)."""
        return self.config.scorer

    # hooks -------------------------------------------------------------------------------------
    def encode_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_prefill(self, state: LayerState, query: torch.Tensor, keys: torch.Tensor, scaling: float,
                   start: torch.Tensor | None) -> None:
        """Called once after prefill with all prompt queries (B, Hq, L, d) and keys (B, Hkv, N, d)."""

    def observe(self, state: LayerState, selection: Selection, probs: torch.Tensor) -> None:
        """Called after each sparse step with the attention probabilities over the selection."""

    # selection ---------------------------------------------------------------------------------
    def score(self, state: LayerState, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
        """(B, Hs, N) relevance of each cached token for this step's query (B, Hq, d)."""
        raise NotImplementedError

    def select(self, state: LayerState, query: torch.Tensor, keys: torch.Tensor, plan: StepPlan,
               scaling: float, start: torch.Tensor | None) -> Selection:
        return build_selection(self.score(state, query, keys, scaling), plan, start)

    def grouped(self, per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Combine (B, Hq, N) per-query-head scores into the policy's selecting heads."""
        if self.config.grouping == "query_head":
            return per_query_head
        b, hq, n = per_query_head.shape
        return per_query_head.reshape(b, num_kv_heads, hq // num_kv_heads, n).sum(2)


class DashKVPolicy(SelectionPolicy):
    """DASH-KV: learned asymmetric hashing. Keys -> b-bit codes once; queries -> real projections."""

    name = "dashkv"
    uses_codes = True
    pq = False  # PQ key codes (the encoders' kind), set by __init__

    def __init__(self, config: DashKVConfig, encoders: HashEncoders):
        super().__init__(config)
        if encoders.bits != config.bits:
            raise ValueError(f"encoders have {encoders.bits} bits but the config asks for {config.bits}")
        levels = encoders.key_levels
        if levels > 1 and config.scorer == "hamming":
            raise ValueError(f"these encoders store {levels}-bit key levels, which only the asymmetric "
                             "scorer reads; scorer='hamming' compares sign codes")
        if levels > 1 and config.query_bits:
            from ._logging import get_logger, warn_once

            warn_once(get_logger("dashkv.selection"), ("query_bits-levels", config.query_bits),
                      "query_bits=%d rounds the query side of %d-bit key levels, whose bit weights span %dx: "
                      "the scan's ranking with level codes is not measured", config.query_bits,
                      levels, 1 << (levels - 1))
        if encoders.kind == "pq" and (config.scorer == "hamming" or config.query_bits):
            raise ValueError("PQ key codes (encoders kind 'pq') are byte indices of centroids, read through the "
                             "query's score tables: scorer='hamming' and query_bits, which compare sign bits, "
                             "do not apply")
        self.encoders = encoders
        self.pq = encoders.kind == "pq"
        self._pool_temps: dict[tuple[int, int], torch.Tensor] = {}  # see pool_temperatures
        self._prob_temps: dict[int, tuple] = {}  # see probability_temperatures

    def encode_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        return self.encoders.encode_keys(layer_idx, keys)

    def query_projection(self, layer_idx: int, query: torch.Tensor) -> torch.Tensor:
        """(B, Hq, d) -> (B, Hq, b) real-valued projection."""
        return self.encoders.project_queries(layer_idx, query[:, :, None, :])[:, :, 0, :]

    def fused_query_encoder(self, layer_idx: int, query: torch.Tensor):
        """(weight, bias) float32 numpy arrays the fused CPU kernel applies to the (B, Hq, d) query itself,
        or None: the projection is then `query_projection`'s (MLP encoders, a subclass's own projection)."""
        if self.pq or type(self).query_projection is not DashKVPolicy.query_projection:
            return None
        return self.encoders._fast_linear(layer_idx, "query", query[:, :, None, :])

    def per_head_scores(self, state: LayerState, query: torch.Tensor) -> torch.Tensor:
        codes = state.codes  # (B, Hkv, N, W)
        b, hq, _ = query.shape
        hkv = codes.shape[1]
        if self.pq:  # the estimated q . k: the query's float tables read at each code's bytes
            from .pq import table_scores

            s = table_scores(self.encoders.query_tables(state.layer_idx, query), codes).float()
            return spatial_vote(s, self.config.spatial_vote) if self.config.spatial_vote else s
        proj = self.query_projection(state.layer_idx, query).reshape(b, hkv, hq // hkv, -1)
        if self.config.scorer == "hamming":
            s = hamming_similarity(pack_bits(proj > 0), codes[:, :, None]).float()
        else:
            s = asymmetric_scores(proj, codes[:, :, None])
        s = s.reshape(b, hq, -1)  # (B, Hq, N)
        lam = self.config.spatial_vote
        if lam:
            s = spatial_vote(s, lam)
        return s

    def score(self, state, query, keys, scaling):
        if self.config.query_bits:
            return self.quantised_scan_scores(state, query)
        return self.grouped(self.per_head_scores(state, query), keys.shape[1])

    def quantised_scan_scores(self, state: LayerState, query: torch.Tensor) -> torch.Tensor:
        """(B, Hs, N) float64 scores of the bit-plane scan (`config.query_bits`), the reference of the
        fused kernel's: each selecting head's projection (its query heads summed in order, float32, as the
        kernel sums them) rounded to integer levels, scored exactly against the codes; ties are broken
        towards the lower position (score - pos / (N + 1)), so top-k picks exactly the kernel's set."""
        codes = state.codes  # (B, Hkv, N, W)
        b, hq, _ = query.shape
        hkv, n = codes.shape[1], codes.shape[2]
        proj = self.query_projection(state.layer_idx, query).float()
        if self.config.grouping == "query_head":
            grouped = proj.reshape(b, hkv, hq // hkv, -1)
        else:
            parts = proj.reshape(b, hkv, hq // hkv, -1)
            grouped = parts[:, :, 0]
            for g in range(1, parts.shape[2]):  # sequential float32 sum, the kernel's order
                grouped = grouped + parts[:, :, g]
            grouped = grouped[:, :, None]
        levels = quantise_query(grouped, self.config.query_bits)  # (B, Hkv, S/Hkv, b)
        s = quantised_scores(levels, codes[:, :, None]).reshape(b, -1, n).double()
        return s - torch.arange(n, dtype=torch.float64, device=s.device) / (n + 1)

    def probability_estimate(self, state: LayerState, per_head: torch.Tensor, num_kv_heads: int,
                             start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hs, N) attention probability estimated from the codes: softmax over the valid positions of
        each query head's score at its calibrated temperature (`probability_temperatures`), summed over a
        selecting head: the adaptive tiers' masses and the pooled re-rank. The group score decoding ranks
        by is `probability_scores`, the same quantity from integer-rounded projections."""
        temps = self._probability_temperatures(state.layer_idx).to(per_head.device)  # no host round trip
        logits = per_head.float() * temps[None, :, None]
        return self.grouped(torch.softmax(self._mask_left_padding(logits, start), -1), num_kv_heads)

    def probability_scores(self, state: LayerState, query: torch.Tensor, num_kv_heads: int,
                           start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Hkv, N) the probability group score, the default ranking of a KV head's candidates: each
        query head's estimated logits from its projection rounded to integer levels
        (`dashkv.codes.probability_logits`, bit for bit the fused CPU kernel's), softmax over the valid
        positions, summed over the KV head's query heads."""
        logits = self.estimated_logits(state, query)
        return self.grouped(torch.softmax(self._mask_left_padding(logits, start), -1), num_kv_heads)

    def estimated_logits(self, state: LayerState, query: torch.Tensor) -> torch.Tensor:
        """(B, Hq, N) float32 logits the probability group score ranks by, bit for bit the fused CPU
        kernel's: sign codes, `probability_logits` of the query projection; PQ codes, the query's score
        tables rounded to the same integer levels (`pq_probability_logits`)."""
        temps = self._probability_temperatures(state.layer_idx)
        if self.pq:
            return pq_probability_logits(self.encoders.query_tables(state.layer_idx, query), temps, state.codes)
        return probability_logits(self.query_projection(state.layer_idx, query).float(), temps, state.codes)

    @staticmethod
    def _mask_left_padding(logits: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        if start is None:  # left padding takes no probability
            return logits
        pos = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill((pos[None, :] < start.to(logits.device)[:, None])[:, None, :], NEG_INF)

    def _probability_temperatures(self, layer_idx: int) -> torch.Tensor:
        """(Hq,) float32 on the encoders' device: the calibrated logit scale / b, one float32 rounding."""
        return self.encoders.logit_scale(layer_idx).float() / self.config.bits

    def probability_temperatures(self, layer_idx: int) -> np.ndarray:
        """(Hq,) float32: per query head, the factor turning its asymmetric score into an estimated logit
        (the calibrated logit scale / b); one array per layer, handed to the fused kernel as is."""
        hit = self._prob_temps.get(layer_idx)  # (parameter, its version, temperatures): retrained = recomputed
        if hit is not None and hit[1] == hit[0]._version and hit[3] is self.encoders.layers:
            return hit[2]  # the module dict lookup below costs ~10 µs per layer and step: only on a miss
        param = self.encoders.layers[str(layer_idx)].log_scale
        if hit is None or hit[0] is not param or hit[1] != param._version:
            temps = self._probability_temperatures(layer_idx).cpu().numpy()
            temps.flags.writeable = False  # handed to the kernel as is, which then checks it once
            hit = self._prob_temps[layer_idx] = (param, param._version, temps, self.encoders.layers)
        return hit[2]

    def pool_temperatures(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        """(Hs,) float64: per selecting head, the factor turning its (grouped) score into an estimated
        logit: the calibrated logit scale / b (the mean over a KV head's group, divided by its size)."""
        key = (layer_idx, num_kv_heads)
        temps = self._pool_temps.get(key)  # a per-layer constant, asked for at every decode step
        if temps is None:
            scale = self.encoders.logit_scale(layer_idx).double().cpu()
            if self.config.grouping == "query_head":
                temps = scale / self.config.bits
            else:
                temps = scale.reshape(num_kv_heads, -1).mean(-1) / (self.config.bits * (scale.numel() // num_kv_heads))
            self._pool_temps[key] = temps
        return temps

    def pooled_selection(self, state: LayerState, query: torch.Tensor, scores: torch.Tensor, plan: StepPlan,
                         start: torch.Tensor | None) -> Selection:
        """Pooled per-head budgets exactly as the fused kernel spends them: scores binned as its scan bins
        them, exact-tier sizes by `pooled_counts`, then each head's best (stable: lower position first)."""
        from .kernels import NBINS_ASYM

        b, hs, n = scores.shape
        hkv = state.codes.shape[1]
        gq = query.shape[1] // hs
        span = gq * self.config.bits
        st = torch.zeros(b, dtype=torch.long) if start is None else start.cpu().long()
        pos = torch.arange(n)
        candidate = (pos[None, :] >= st[:, None] + plan.sink) & (pos[None, :] < n - plan.window)
        if self.config.scorer == "hamming":
            buckets = ((scores.double() + span) / 2).round().long()
            mids = (2.0 * torch.arange(span + 1, dtype=torch.float64) - span).expand(b, hs, -1)
        else:  # the kernel's binning: float32 (s + sum|q|) * 2048 / (2 sum|q|), clamped, truncated
            proj = self.query_projection(state.layer_idx, query).reshape(b, hs, gq, -1).float().sum(2)
            a = proj.double().abs().sum(-1)  # (B, Hs) the score range
            af = a.float()
            sf = torch.where(a > 0, (NBINS_ASYM / (2.0 * a)).float(), torch.zeros_like(af))
            x = ((scores.float() + af[..., None]) * sf[..., None]).clamp(0, NBINS_ASYM - 1)
            buckets = x.long()
            t = torch.arange(NBINS_ASYM, dtype=torch.float64)
            mids = torch.where(sf[..., None] > 0, (t + 0.5) / sf.double()[..., None] - af.double()[..., None],
                               torch.zeros(()))
        temps = self.pool_temperatures(state.layer_idx, hkv)
        cap = torch.clamp(n - plan.window - st - plan.sink, min=0)
        counts = torch.stack([pooled_counts(buckets[i:i + 1], candidate[i:i + 1], mids[i:i + 1], temps.tolist(),
                                            plan.critical, min(self.config.k_min, plan.critical),
                                            int(min(POOL_CAP * plan.critical, int(cap[i]))))[0] for i in range(b)])
        return selection_with_counts(scores, counts, plan, start)

    def pooled_probability_selection(self, state: LayerState, query: torch.Tensor, plan: StepPlan,
                                     start: torch.Tensor | None) -> Selection:
        """Pooled per-head budgets by the probability group score, exactly as the fused kernel spends them:
        each KV head's p = sum_g exp(logit_g - log Z_g) (float32, as the kernel stores it), bucketed by
        its float32 bit pattern in one map per row (the bounds the kernel derives from each head's
        smallest and largest candidate logit, the widest of the row's heads), exact-tier sizes by
        `pooled_counts` over those buckets, then each head's best by p (stable: lower position first)."""
        from .kernels import NBINS_ASYM

        hkv = state.codes.shape[1]
        logits = self.estimated_logits(state, query)
        b, hq, n = logits.shape
        g = hq // hkv
        st = torch.zeros(b, dtype=torch.long) if start is None else start.cpu().long()
        pos = torch.arange(n)
        valid = pos[None, :] >= st[:, None]
        candidate = (pos[None, :] >= st[:, None] + plan.sink) & (pos[None, :] < n - plan.window)
        lg = logits.double().masked_fill(~valid[:, None, :], float("-inf"))
        logz = torch.logsumexp(lg, -1)  # (B, Hq) float64, as the kernel's normaliser
        logz32 = logz.float().double()  # what the kernel stores and forms p with
        # the kernel's exponential stops at e^-87 (`_exp_neg`): below it every estimate is the same tiny
        # constant, one bucket, never a spread of denormals
        terms = torch.exp((lg - logz32[..., None]).clamp_min(-87.0)).masked_fill(~valid[:, None, :], 0.0)
        p = terms.reshape(b, hkv, g, n).sum(2).float()  # (B, Hkv, N)
        top = NBINS_ASYM - 1
        buckets = torch.zeros(b, hkv, n, dtype=torch.long)
        for i in range(b):
            if not bool(candidate[i].any()):
                continue
            cl = logits[i][:, candidate[i]].double()  # (Hq, C)
            lo = (cl.amin(-1) - logz[i]).reshape(hkv, g).amax(-1)  # every candidate's p is at least this term
            hi = torch.exp(cl.amax(-1) - logz[i]).reshape(hkv, g).sum(-1)  # and at most this sum
            lo_bits = min(int(np.float32(math.exp(float(x)) * 0.5).view(np.int32)) for x in lo)
            hi_bits = max(int(np.float32(min(float(x) * 2.0, 1e30)).view(np.int32)) for x in hi)
            shift = 0
            while (hi_bits - lo_bits) >> shift > top:
                shift += 1
            bits = p[i].contiguous().view(torch.int32).long()
            buckets[i] = ((bits - lo_bits) >> shift).clamp(0, top)
        cap = torch.clamp(n - plan.window - st - plan.sink, min=0)
        counts = torch.stack([pooled_counts(buckets[i:i + 1], candidate[i:i + 1], None, None, plan.critical,
                                            min(self.config.k_min, plan.critical),
                                            int(min(POOL_CAP * plan.critical, int(cap[i]))), nbins=NBINS_ASYM)[0]
                              for i in range(b)])
        return selection_with_counts(p.double(), counts, plan, start)

    def select(self, state, query, keys, plan, scaling, start):
        if self.config.query_bits:  # the config admits only the fixed exact tier (+ re-rank) here
            scores = self.quantised_scan_scores(state, query)
            if plan.rerank > 0:
                scores = self.rerank_scores(state, query, scores, plan, scaling, start)
            return build_selection(scores, plan, start, None, self.config)
        integer_levels = (self.config.scores_by_probability and self.config.scorer == "asymmetric"
                          and not self.config.spatial_vote)
        # the float per-head scores, unless only the integer-level probability score needs the codes
        # (pooled budgets do not combine with it; the adaptive tiers' masses do need them)
        per_head = None if integer_levels and not self.config.adaptive else self.per_head_scores(state, query)
        if integer_levels and self.config.head_budget == "pooled":  # the config admits nothing else with it
            return self.pooled_probability_selection(state, query, plan, start)
        if integer_levels:
            scores = self.probability_scores(state, query, keys.shape[1], start)
        elif self.config.scores_by_probability:  # Hamming scores, or voted ones (reference path only)
            scores = self.probability_estimate(state, per_head, keys.shape[1], start)
        else:
            scores = self.grouped(per_head, keys.shape[1])
        if self.config.temporal and state.carry is not None:
            carried = state.carry.get(state.layer_idx, keys.shape[2], keys.shape[0])
            if carried is not None:
                scores = temporal_momentum(scores, carried, self.config.temporal)
        if self.config.head_budget == "pooled" and plan.rerank == 0 and not self.config.adaptive:
            return self.pooled_selection(state, query, scores, plan, start)
        if self.config.head_budget == "pooled":  # after re-rank: by the re-scored probabilities
            scores = self.probability_estimate(state, per_head, keys.shape[1], start)
        mass_logits = None
        if self.config.adaptive:
            mass_logits = self.probability_estimate(state, per_head, keys.shape[1], start).clamp_min(1e-30).log()
        if plan.rerank > 0:
            scores = self.rerank_scores(state, query, scores, plan, scaling, start)
        if self.config.successors:
            scores = successor_pool(scores, self.config.successors)
        return build_selection(scores, plan, start, mass_logits, self.config)

    def rerank_scores(self, state: LayerState, query: torch.Tensor, scores: torch.Tensor, plan: StepPlan,
                      scaling: float, start: torch.Tensor | None) -> torch.Tensor:
        """The re-rank stage: scores (B, Hs, N) where only the code scan's top `plan.rerank` candidates
        are finite, each re-scored from the int8 keys as the attention probability it would get among
        those candidates (softmax per query head), summed over the query heads of a selecting head --
        the same quantity oracle top-k ranks by, restricted to the candidates."""
        if state.keys8 is None:
            raise ValueError("DashKVConfig.rerank needs the cache's int8 key copy (LayerState.keys8)")
        if state.keys8.bits != self.config.rerank_bits:
            raise ValueError(f"DashKVConfig.rerank_bits={self.config.rerank_bits} but the cache keeps "
                             f"{state.keys8.bits}-bit keys (LayerState.keys8): a cache serves one configuration")
        if self.config.scorer == "hamming":  # integer scores tie often: lower position first, as the kernel
            n = scores.shape[-1]
            scores = scores.double() - torch.arange(n, dtype=torch.float64, device=scores.device) / (n + 1)
        first = build_selection(scores, replace(plan, critical=plan.rerank, lowprec=0, rerank=0), start)
        fixed = plan.sink + plan.window
        idx, ok = first.indices[..., fixed:], first.exact[..., fixed:]  # (B, Hs, R), distinct per row
        b, hq, d = query.shape
        hkv = state.keys8.q.shape[1]
        rows = state.keys8.gather(idx)  # (B, Hkv, Hs/Hkv, R, d)
        q = group_queries(query, hkv).float()  # (B, Hkv, G, d)
        g, g_sel = hq // hkv, idx.shape[1] // hkv
        logits = torch.einsum("bhgd,bhgrd->bhgr", q, rows.expand(-1, -1, g, -1, -1) if g_sel == 1 else rows)
        logits = (logits * scaling).masked_fill(~ok.reshape(b, hkv, g_sel, -1).expand(-1, -1, g, -1), NEG_INF)
        probs = torch.softmax(logits, -1).nan_to_num(0.0)
        rescored = probs.sum(2) if g_sel == 1 else probs.reshape(b, hq, -1)
        rescored = rescored.reshape(b, -1, idx.shape[-1]).masked_fill(~ok, NEG_INF)
        return torch.full_like(scores, NEG_INF, dtype=torch.float32).scatter_(-1, idx, rescored)


class SimHashPolicy(DashKVPolicy):
    """Random-hyperplane LSH with the same bits, symmetric Hamming scan (the classic baseline).

    The scorer is forced into the policy's own config, so the fused kernels and the reference path
    both run the Hamming scan (they read `policy.config`)."""

    name = "simhash"
    forced_scorer = "hamming"

    def __init__(self, config: DashKVConfig, encoders: HashEncoders):
        forced = {"scorer": self.forced_scorer, "adaptive": False}
        if self.forced_scorer == "hamming":
            forced["query_bits"] = None  # integer query levels belong to the asymmetric scorer
        cfg = DashKVConfig(**{**config.to_dict(), **forced})
        super().__init__(cfg, encoders)


class SimHashAsymPolicy(SimHashPolicy):
    """Random hyperplanes (SimHash codes for keys) scored asymmetrically against the real-valued query
    projection: isolates what the learned encoders add over random ones at the same scorer."""

    name = "simhash_asym"
    forced_scorer = "asymmetric"


class DashKVRerankPolicy(DashKVPolicy):
    """DASH-KV with the re-rank stage on (`rerank` = 4 unless the config sets it): a named method so the
    evaluation can put both side by side on the same prefills."""

    name = "dashkv_rerank"
    default_rerank = 4

    def __init__(self, config: DashKVConfig, encoders: HashEncoders):
        cfg = config if config.rerank else DashKVConfig(**{**config.to_dict(), "rerank": self.default_rerank})
        super().__init__(cfg, encoders)


class OraclePolicy(SelectionPolicy):
    """Exact top-k by true attention probability: the upper bound of any top-k selection."""

    name = "oracle"

    def score(self, state, query, keys, scaling):
        b, hq, d = query.shape
        hkv = keys.shape[1]
        q = group_queries(query, hkv)
        logits = torch.einsum("bhgd,bhnd->bhgn", q.float(), keys.float()) * scaling
        return self.grouped(torch.softmax(logits, -1).reshape(b, hq, -1), hkv)


    def select(self, state, query, keys, plan, scaling, start):
        return build_selection(self.score(state, query, keys, scaling), plan, start, config=self.config)


class StreamingPolicy(SelectionPolicy):
    """StreamingLLM: sinks plus the most recent tokens; the whole budget goes to recency."""

    name = "streaming"

    def score(self, state, query, keys, scaling):
        n = keys.shape[2]
        recency = torch.arange(n, dtype=torch.float32, device=keys.device)
        hs = query.shape[1] if self.config.grouping == "query_head" else keys.shape[1]
        return recency.expand(keys.shape[0], hs, n)


#: Score given to tokens a baseline always keeps (SnapKV's observation window and generated tokens,
#: H2O's recent half): above any attention statistic, ordered by recency among themselves.
PINNED = 1e6


def _pin_recent(scores: torch.Tensor, first: int) -> torch.Tensor:
    """Scores with positions >= `first` pinned (kept before any scored token, newest first)."""
    n = scores.shape[-1]
    if first >= n:
        return scores
    first = max(0, first)
    out = scores.clone()
    out[..., first:] = PINNED + torch.arange(first, n, dtype=out.dtype, device=out.device)
    return out


class H2OPolicy(SelectionPolicy):
    """H2O (Zhang et al. 2023; FMInference/H2O `H2OKVCache_LayerWise`): heavy hitters by attention
    accumulated over every query so far (all prompt queries, then every decode step's attention over
    what was kept), plus the most recent tokens; the budget is split half heavy, half recent as in H2O's
    experiments (heavy_ratio = recent_ratio).

    Re-selecting the top accumulated scores at every step is the same set as H2O's permanent eviction:
    tokens not kept stop accumulating while kept ones only grow, so an evicted token never outranks a
    kept one again. GQA: scores are summed over the query heads of a KV head (H2O is MHA; the group sum
    ranks like the group mean of later GQA ports). Shared with every method: the 4 sink tokens.
    """

    name = "h2o"
    recent_share = 0.5

    def on_prefill(self, state, query, keys, scaling, start):
        state.stats["acc"] = _accumulated_prefill_attention(query, keys, scaling, start, last=None)

    def observe(self, state, selection, probs):
        acc = state.stats.get("acc")
        if acc is None:
            return
        # probs: (B, Hs, K) attention mass per selected slot, summed over the head's queries
        if selection.heads == acc.shape[1]:
            acc.scatter_add_(-1, selection.indices, probs.to(acc.dtype))
        else:  # one set per query head: accumulate per query head, then per KV head
            b, hkv, n = acc.shape
            tmp = acc.new_zeros(b, selection.heads, n).scatter_add_(-1, selection.indices, probs.to(acc.dtype))
            acc += tmp.reshape(b, hkv, -1, n).sum(2)

    def score(self, state, query, keys, scaling):
        n = keys.shape[2]
        acc = state.stats.get("acc")
        b, hkv = keys.shape[:2]
        if acc is None:
            acc = torch.zeros(b, hkv, n)
        if acc.shape[-1] < n:  # new tokens arrived since the last step
            acc = torch.cat([acc, acc.new_zeros(b, hkv, n - acc.shape[-1])], -1)
        state.stats["acc"] = acc
        return self._to_heads(acc, query.shape[1])

    def select(self, state, query, keys, plan, scaling, start):
        total = plan.sink + plan.window + plan.critical + plan.lowprec
        recent = max(plan.window, int(round(total * self.recent_share)))
        scores = _pin_recent(self.score(state, query, keys, scaling), keys.shape[2] - recent)
        return build_selection(scores, plan, start)

    def _to_heads(self, acc, hq):
        if self.config.grouping == "query_head":
            return acc.repeat_interleave(hq // acc.shape[1], dim=1)
        return acc


class SnapKVPolicy(SelectionPolicy):
    """SnapKV (Li et al. 2024; FasterDecoding/SnapKV `SnapKVCluster.update_kv`, defaults of its
    `init_snapkv`): the prompt's last `observe_window` (32) queries attend over the prompt (softmax over
    all keys, causal inside the window); their attention to each earlier key, summed over the window,
    is average-pooled along the keys (kernel 5, zero padding, stride 1) and the top keys are kept; the
    observation window itself and every generated token are always kept (here: pinned above any vote,
    newest first, inside the budget). GQA: per query head, then averaged over the query heads of a KV
    head, as kvpress does (SnapKV issue #22); averaging is linear, so pooling the group sum ranks the same.
    """

    name = "snapkv"
    observe_window = 32
    pool = 5
    pooling = "avgpool"

    def on_prefill(self, state, query, keys, scaling, start):
        tail = _accumulated_prefill_attention(query, keys, scaling, start, last=self.observe_window)
        state.stats["votes"] = self.pool_votes(tail, min(self.observe_window, query.shape[2]))

    @classmethod
    def pool_votes(cls, tail: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """(B, Hkv, N) window attention summed per key -> votes: pooled over the keys before the window
        (as the reference pools `attn_weights[..., :-window]`); the window's own keys are pinned."""
        w = cls.observe_window if window is None else window
        b, hkv, n = tail.shape
        past = tail[..., : n - w].flatten(0, 1)[:, None, :]
        if past.shape[-1] > 0:
            fn = torch.nn.functional.avg_pool1d if cls.pooling == "avgpool" else torch.nn.functional.max_pool1d
            pooled = fn(past, cls.pool, 1, cls.pool // 2)[:, 0].reshape(b, hkv, -1)
        else:
            pooled = tail.new_zeros(b, hkv, 0)
        return _pin_recent(torch.cat([pooled, tail.new_zeros(b, hkv, n - pooled.shape[-1])], -1), n - w)

    def score(self, state, query, keys, scaling):
        n = keys.shape[2]
        votes = state.stats.get("votes")
        b, hkv = keys.shape[:2]
        if votes is None:
            votes = torch.zeros(b, hkv, 0)
        prompt = votes.shape[-1]
        if prompt < n:  # generated tokens are always kept (SnapKV compresses the prompt only)
            votes = _pin_recent(torch.cat([votes, votes.new_zeros(b, hkv, n - prompt)], -1), prompt)
        if self.config.grouping == "query_head":
            return votes.repeat_interleave(query.shape[1] // hkv, dim=1)
        return votes


class QuestPolicy(SelectionPolicy):
    """Quest (Tang et al. 2024, mit-han-lab/Quest): keys are cut into pages of 16 tokens; each page keeps
    the per-channel min and max of its keys; a query's upper bound on q·k over the page is
    sum_d max(q_d * min_d, q_d * max_d); the top pages are read in full.

    Selection is per **query head**, as in the paper (Llama-2 is MHA, every head picks its own pages),
    whatever `config.grouping` says. GQA adaptation: each query head bounds its pages against the keys of
    its KV head and reads its own pages, so a KV head's group may read up to G x budget distinct tokens
    (the budget counts tokens per selecting head, as for every per-query-head selection).
    """

    name = "quest"
    page = 16

    def page_bounds(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, Hq, pages) upper bound of q·k per page (the last page may be partial)."""
        b, hkv, n, d = keys.shape
        pages = math.ceil(n / self.page)
        pad = pages * self.page - n
        kf = keys.float()
        kmax = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=-torch.inf).reshape(b, hkv, pages, self.page, d).amax(3)
        kmin = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=torch.inf).reshape(b, hkv, pages, self.page, d).amin(3)
        q = group_queries(query, hkv).float()[:, :, :, None, :]  # (B, Hkv, G, 1, d)
        bound = torch.maximum(q * kmax[:, :, None], q * kmin[:, :, None]).sum(-1)
        return bound.reshape(b, -1, pages)

    def score(self, state, query, keys, scaling):
        """Per token: its page's rank (better pages first, exactly), then position inside the page, so
        the top-k takes whole pages in bound order."""
        n = keys.shape[2]
        bound = self.page_bounds(query, keys)
        pages = bound.shape[-1]
        rank = torch.empty_like(bound, dtype=torch.long)
        order = torch.sort(bound, dim=-1, descending=True, stable=True).indices
        rank.scatter_(-1, order, torch.arange(pages).expand_as(order).contiguous())
        pos = torch.arange(n, device=keys.device)
        per_token = (pages - rank).repeat_interleave(self.page, dim=-1)[..., :n] * self.page + pos % self.page
        return per_token.float()


def _accumulated_prefill_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                                   start: torch.Tensor | None, last: int | None, chunk: int = 256) -> torch.Tensor:
    """Causal attention probabilities of the prompt's queries, summed per key: (B, Hkv, N).

    `last` limits the sum to the last queries (SnapKV's observation window). Chunked over queries so
    an 8K prompt never materialises an N x N matrix.
    """
    b, hq, lq, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    first = 0 if last is None else max(0, lq - last)
    acc = torch.zeros(b, hkv, n)
    kf = keys.float()
    valid = valid_positions(n, start, b)
    for s in range(first, lq, chunk):
        e = min(lq, s + chunk)
        q = query[:, :, s:e].float().reshape(b, hkv, g, e - s, d)
        logits = torch.einsum("bhgqd,bhnd->bhgqn", q, kf) * scaling
        qpos = torch.arange(s, e) + (n - lq)
        causal = torch.arange(n)[None, :] <= qpos[:, None]  # (q, N)
        mask = causal[None] & valid[:, None, :]  # (B, q, N)
        logits = logits.masked_fill(~mask[:, None, None], NEG_INF)
        acc += torch.softmax(logits, -1).nan_to_num(0.0).sum((2, 3))
    return acc


POLICIES = {
    "dashkv": DashKVPolicy, "dashkv_rerank": DashKVRerankPolicy, "simhash": SimHashPolicy, "simhash_asym": SimHashAsymPolicy, "oracle": OraclePolicy, "streaming": StreamingPolicy,
    "h2o": H2OPolicy, "snapkv": SnapKVPolicy, "quest": QuestPolicy,
}
METHODS = ("dense",) + tuple(POLICIES)


def make_policy(name: str, config: DashKVConfig, encoders: HashEncoders | None = None) -> SelectionPolicy | None:
    """The policy called `name`; None for "dense" (full attention, no selection)."""
    if name == "dense":
        return None
    if name not in POLICIES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = POLICIES[name]
    if issubclass(cls, DashKVPolicy):
        if encoders is None:
            raise ValueError(f"method {name!r} needs hash encoders")
        return cls(config, encoders)
    return cls(config)
