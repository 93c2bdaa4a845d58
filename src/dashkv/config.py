"""DashKVConfig: every knob of a DASH-KV decode step, validated in one place.

The budget is the number of cached tokens a query head (or KV head) may read per decode step, and it
counts *everything* read from K/V: sinks, the recent window, the exact (critical) candidates and the
low-precision tier. Reporting it that way keeps comparisons with baselines at equal budget honest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any, Literal

Scorer = Literal["asymmetric", "hamming"]
Grouping = Literal["kv_head", "query_head"]
HeadBudget = Literal["fixed", "pooled"]
GroupScore = Literal["sum", "probability"]


def parse_budget(value: str | float | int) -> float | int:
    """Parse a budget given as a fraction ("1/16", "0.0625") or a token count ("512").

    Integers (and integer strings) are token counts; anything else is a fraction of the context.
    """
    if isinstance(value, bool):
        raise ValueError(f"budget must be a fraction in (0, 1] or a token count >= 1, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    text = str(value).strip()
    try:
        if "/" in text:
            return float(Fraction(text))
        if text.isdigit():
            return int(text)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"budget must be a fraction like 1/16 or 0.0625, or a token count like 512; got {value!r}"
        ) from None


# Measured crossovers (docs/RESULTS.md §1, `scripts/bench_speed.sh`): the context from which DASH-KV's
# selecting step beats dense decoding on its own cache, by K/V element size (float32: 4, bf16/fp16: 2)
# and what a KV head's set ranks by (`DashKVConfig.effective_group_score`: the probability score's G
# scans cost more). bf16: 5120 for both scores since stop 23 (the packed probability scan costs about
# what the summed scan did; on a CPU without AMX dense bf16 decoding was far slower than selecting).
MIN_CONTEXT_DEFAULTS: dict[tuple[int, str], int] = {(4, "sum"): 1536, (4, "probability"): 2560,
                                                    (2, "sum"): 5120, (2, "probability"): 5120}


def resolve_bits(bits: int | None, encoders: str | None) -> int:
    """A command's code length: --bits if given, else its --encoders directory's own (`HashEncoders.
    stored_bits`), else DashKVConfig's default (64). One rule for generate, demo, bench, eval and serve."""
    if bits is not None:
        return bits
    if encoders:
        from .encoders import HashEncoders

        stored = HashEncoders.stored_bits(encoders)
        if stored is not None:
            return stored
    return DashKVConfig.__dataclass_fields__["bits"].default


#: Query precisions the bit-plane scan takes (`DashKVConfig.query_bits`): 4 or 8 bits per projection value.
QUERY_BITS: tuple[int, ...] = (4, 8)


@dataclass
class DashKVConfig:
    """Configuration of DASH-KV decoding.

    bits:            code length b of the key codes (multiple of 64).
    budget:          tokens read per step: a fraction of the context in (0, 1] or a count >= 1.
    sink:            first tokens always attended exactly (attention sinks).
    window:          most recent tokens always attended exactly.
    adaptive:        size the critical candidate set per head and step from the estimated attention mass.
    mass_target:     with `adaptive`, stop adding candidates once this share of the estimated mass is in.
    k_min, k_max:    bounds of the critical candidate count (k_max None = what the budget leaves).
    lowprec_fraction: share of the candidate budget, in bytes, spent on the 8-bit tier: rows read from int8
                     copies of K and V, each charged at its bytes ((d + 4) / (d * element bytes) of a full
                     K+V row: 0.27 for float32, d = 64), so the tier serves ~3.8x as many candidates as the
                     exact rows it replaces (0 disables it).
    scorer:          "asymmetric" (real-valued query projection against binary keys) or "hamming".
    grouping:        one candidate set per "kv_head" (G query heads summed) or per "query_head".
    dense_layers:    layers kept dense (diffuse early layers).
    min_context:     contexts up to this many tokens are decoded densely: below it selection costs more
                     than it saves. None (default): measured per K/V dtype and group score
                     (`MIN_CONTEXT_DEFAULTS`): float32 2560 (1536 with group_score="sum"), bfloat16/float16
                     5120 (docs/RESULTS.md §1: where selection overtakes dense decoding on the model's own
                     cache, default model, batch 1).
    rerank:          re-rank stage: the code scan keeps `rerank` x the exact tier's size of candidates, which
                     are re-scored from an int8 copy of the keys (q·k, softmax per query head, summed over
                     the group) and the best of them form the exact tier (0 = off). Each re-scored key is
                     charged to the budget at its bytes: an int8 key row (d + 4 bytes) against a full K+V
                     row (2·d·element bytes), so the exact tier shrinks to keep the budget.
    rerank_bits:     precision of the re-rank stage's key copy: 8 (int8, d + 4 bytes per key) or 4 (two levels
                     per byte, d/2 + 4 bytes: half the bytes, so the exact tier gives up less; measured in
                     docs/RESULTS.md §3). Not with the 8-bit tier, which reads int8 keys.
    head_budget:     "fixed": every selecting head gets the same exact tier; "pooled": a layer's exact
                     tokens are shared by its heads at the same mean, by estimated attention probability
                     (concentrated heads give their tail to diffuse ones; DASH-KV and oracle top-k).
    spatial_vote:    λ of the cross-head vote (distance calibration Δ_spatial): each query head's score
                     gains λ·σ_h·(mean over the layer's query heads of the standardised score), so keys
                     many heads rank highly move up (0 = off; torch reference path only).
    temporal:        μ of the cross-layer momentum (distance calibration Δ_temporal): a layer's selection
                     ranks by z(score) + μ·z(log a), a the previous DASH-KV layer's attention in the same
                     step (mean over its query heads, known on the tokens it read; the floor elsewhere).
                     Keys the layer below attended to move up (0 = off; torch reference path only).
    query_bits:      precision of the query projection in the code scan. None: float32 (byte look-up
                     tables, the scorer the encoders were calibrated with); 4 or 8: each selecting head's
                     projection rounded to symmetric integer levels (+-7 or +-127, one scale per head) and
                     scored by AND + popcount over its bit planes, which vectorises (docs/DECISIONS.md).
                     Asymmetric scorer with a fixed-size exact tier only (optionally re-ranked).
    group_score:     what one candidate set per KV head ranks by: "sum" of its query heads' scores (one scan
                     of the summed projection) or "probability": each query head's estimated attention
                     probability (softmax of its score at the calibrated temperature) summed, what oracle
                     top-k ranks by; a sharp (retrieval) head is then not drowned by diffuse ones. G scans;
                     fused in the CPU kernel (asymmetric scorer), torch reference path elsewhere (CUDA
                     too: "sum" runs the Triton kernel). None (default): "probability" wherever it
                     combines (asymmetric scorer, no query_bits, none of adaptive / spatial_vote /
                     temporal / successors, which were measured with the sum; with pooled head budgets
                     no rerank or 8-bit tier), else "sum" (`effective_group_score`); measured in
                     docs/DECISIONS.md. With head_budget="pooled" the heads of a layer share the exact
                     tier by these same probabilities (fused on the CPU).
    successors:      successor pooling: each candidate's score is the best of its own and its `successors`
                     predecessors', so a selected token brings the next ones with it (copying a span:
                     the token after the one attended to is what the next step reads). 0 = off; torch
                     reference path.
    """

    bits: int = 64
    budget: float | int = 1 / 16
    sink: int = 4
    window: int = 64
    adaptive: bool = False
    mass_target: float = 0.95
    k_min: int = 16
    k_max: int | None = None
    lowprec_fraction: float = 0.0
    scorer: Scorer = "asymmetric"
    grouping: Grouping = "kv_head"
    dense_layers: tuple[int, ...] = (0, 1)
    min_context: int | None = None
    spatial_vote: float = 0.0
    temporal: float = 0.0
    rerank: int = 0
    rerank_bits: int = 8
    head_budget: HeadBudget = "fixed"
    query_bits: int | None = None
    successors: int = 0
    group_score: GroupScore | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.budget = parse_budget(self.budget)
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"DashKVConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.bits, int) or self.bits < 64 or self.bits % 64:
            raise bad("bits", "must be a positive multiple of 64 (64, 128, 192, ...)")
        b = self.budget
        if isinstance(b, int):
            if b < 1:
                raise bad("budget", "a token count must be >= 1 (or give a fraction in (0, 1])")
        elif not (isinstance(b, float) and math.isfinite(b) and 0.0 < b <= 1.0):
            raise bad("budget", "a fraction must be in (0, 1] (or give a token count >= 1)")
        for name in ("sink", "window", "k_min", "min_context"):
            value = getattr(self, name)
            if name == "min_context" and value is None:
                continue  # the measured default for the K/V dtype (`dense_context`)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be an integer >= 0" + (" (or None: the measured default per K/V dtype)"
                                                             if name == "min_context" else ""))
        if self.k_max is not None and (not isinstance(self.k_max, int) or self.k_max < max(1, self.k_min)):
            raise bad("k_max", f"must be None or an integer >= k_min ({self.k_min}) and >= 1")
        if not (0.0 < self.mass_target <= 1.0):
            raise bad("mass_target", "must be in (0, 1]")
        if not (0.0 <= self.lowprec_fraction < 1.0):
            raise bad("lowprec_fraction", "must be in [0, 1)")
        if self.scorer not in ("asymmetric", "hamming"):
            raise bad("scorer", "must be 'asymmetric' or 'hamming'")
        if self.grouping not in ("kv_head", "query_head"):
            raise bad("grouping", "must be 'kv_head' or 'query_head'")
        if not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or not 0 <= self.rerank <= 64:
            raise bad("rerank", "must be an integer in [0, 64] (0 disables the re-rank stage)")
        if self.rerank_bits not in (4, 8) or isinstance(self.rerank_bits, bool):
            raise bad("rerank_bits", "must be 8 (int8 keys) or 4 (two levels per byte)")
        if self.rerank_bits == 4 and self.lowprec_fraction > 0:
            raise bad("rerank_bits", "4 does not combine with lowprec_fraction > 0 (the 8-bit tier reads int8 "
                                     "keys); use rerank_bits=8 or lowprec_fraction=0")
        if self.head_budget not in ("fixed", "pooled"):
            raise bad("head_budget", "must be 'fixed' or 'pooled'")
        if not (isinstance(self.spatial_vote, (int, float)) and math.isfinite(self.spatial_vote)):
            raise bad("spatial_vote", "must be a finite number (0 disables the cross-head vote)")
        if not (isinstance(self.temporal, (int, float)) and math.isfinite(self.temporal) and self.temporal >= 0):
            raise bad("temporal", "must be a finite number >= 0 (0 disables the cross-layer momentum)")
        if self.query_bits is not None:
            if self.query_bits not in QUERY_BITS or isinstance(self.query_bits, bool):
                raise bad("query_bits", f"must be None (float32 query) or one of {QUERY_BITS}")
            if self.scorer != "asymmetric":
                raise bad("query_bits", "quantises the asymmetric scorer's query; the hamming scorer has none")
            clash = [n for n, on in (("adaptive", self.adaptive), ("head_budget='pooled'", self.head_budget == "pooled"),
                                     ("spatial_vote", self.spatial_vote), ("temporal", self.temporal),
                                     ("lowprec_fraction", self.lowprec_fraction),
                                     ("successors", self.successors),
                                     ("group_score='probability'", self.group_score == "probability")) if on]
            if clash:
                raise bad("query_bits", f"combines only with a fixed-size exact tier (and rerank), not with {clash[0]}")
        if self.group_score not in (None, "sum", "probability"):
            raise bad("group_score", "must be None (the default: probability where it combines), 'sum' or "
                                     "'probability'")
        if self.head_budget == "pooled" and self.successors:
            raise bad("head_budget", "'pooled' does not combine with successors")
        if self.head_budget == "pooled" and self.group_score == "probability" and (
                self.rerank or self.adaptive or self.lowprec_fraction or self.spatial_vote or self.temporal):
            raise bad("head_budget", "'pooled' with group_score='probability' pools the probability estimates of "
                                     "the code scan; it does not combine with rerank, adaptive, lowprec_fraction, "
                                     "spatial_vote or temporal (use group_score='sum' for those)")
        if not isinstance(self.successors, int) or isinstance(self.successors, bool) or not 0 <= self.successors <= 16:
            raise bad("successors", "must be an integer in [0, 16] (0 disables successor pooling)")
        if any(i < 0 for i in self.dense_layers):
            raise bad("dense_layers", "layer indices must be >= 0")

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_plan_memo", None)  # a changed field invalidates the remembered plan
        self.__dict__.pop("_reasons_memo", None)  # and `decode._configuration_reasons`' answers
        object.__setattr__(self, name, value)

    # ---- budget arithmetic -------------------------------------------------------------------
    def budget_tokens(self, n: int) -> int:
        """Total tokens read per step at context length n (never more than n).

        A fractional budget never drops below sink + window + k_min: at short contexts a fraction would
        otherwise leave no room for candidates (reports use the measured fraction, not the nominal one).
        """
        if isinstance(self.budget, int):
            return min(n, self.budget)
        floor = self.sink + self.window + self.k_min
        return min(n, max(1, floor, math.ceil(self.budget * n)))

    def dense_context(self, element_bytes: int = 4) -> int:
        """Contexts up to this many tokens decode densely: `min_context`, or where it is None the default
        measured for K/V of this element size and this group score (`MIN_CONTEXT_DEFAULTS`: float32 2560 /
        1536 with the summed score, bfloat16/float16 5120). Half-precision dense decoding is cheaper, so
        selection pays later (docs/RESULTS.md §1, docs/DECISIONS.md)."""
        if self.min_context is not None:
            return self.min_context
        size = int(element_bytes) if int(element_bytes) in (2, 4) else 4
        return MIN_CONTEXT_DEFAULTS[(size, self.effective_group_score)]

    def plan(self, n: int, rerank_cost: float = 0.125, element_bytes: int = 4) -> "StepPlan":
        """Split the budget at context n into sinks, window, exact candidates and low-precision tier.

        rerank_cost: what re-scoring one key from its int8 copy costs, in full K+V rows read (0.125 for
        float32 K/V of head dim 64: (64 + 4) / (2 * 64 * 4) rounded; `rerank_read_cost` computes it).
        Every managed layer of a decode step asks for the same n: the last answer is kept (one entry,
        replaced whole, so concurrent callers at other lengths only miss it; setting any field drops it).
        element_bytes: the K/V element size, which picks the default `min_context` (`dense_context`).
        """
        memo = self.__dict__.get("_plan_memo")
        if memo is not None and memo[0] == n and memo[1] == rerank_cost and memo[2] == element_bytes:
            return memo[3]
        plan = self._plan(n, rerank_cost, element_bytes)
        self.__dict__["_plan_memo"] = (n, rerank_cost, element_bytes, plan)  # not a field: eq, repr, asdict ignore it
        return plan

    def _plan(self, n: int, rerank_cost: float, element_bytes: int) -> "StepPlan":
        total = self.budget_tokens(n)
        if total >= n or n <= self.dense_context(element_bytes):
            return StepPlan(n=n, dense=True, sink=0, window=0, critical=0, lowprec=0)
        sink = min(self.sink, total)
        window = min(self.window, total - sink)
        free = total - sink - window
        lowprec_cost = 2.0 * rerank_cost  # an int8 K row and an int8 V row, with their scales
        low_share = int(math.floor(free * self.lowprec_fraction))
        critical = free - low_share
        lowprec = int(math.floor(low_share / lowprec_cost)) if low_share else 0
        rerank = 0
        if self.rerank:  # exact + re-scored keys at their cost fill what the low-precision tier leaves
            critical = max(1, int(math.floor(critical / (1.0 + rerank_cost * self.rerank))))
        if self.k_max is not None:
            critical = min(critical, self.k_max)
        if self.rerank:
            rerank = self.rerank * critical
        return StepPlan(n=n, dense=False, sink=sink, window=window, critical=critical, lowprec=lowprec,
                        rerank=rerank, rerank_cost=rerank_cost if rerank else 0.0,
                        lowprec_cost=lowprec_cost if lowprec else 0.0)

    @property
    def effective_group_score(self) -> str:
        """What a KV head's candidate set ranks by in this configuration: "probability" or "sum" (`group_score`
        None resolves to probability with the asymmetric scorer, no query_bits, none of the reference-path
        options measured with the sum (adaptive, spatial_vote, temporal, successors) and, with pooled head
        budgets, neither rerank nor the 8-bit tier (pooled by the re-scored probabilities instead);
        per-query-head sets have no group to combine, "sum" is then the plain score)."""
        if self.grouping != "kv_head":
            return "sum"
        if self.group_score is not None:
            return self.group_score
        combines = (self.scorer == "asymmetric" and self.query_bits is None
                    and not (self.adaptive or self.spatial_vote or self.temporal or self.successors)
                    and (self.head_budget == "fixed" or not (self.rerank or self.lowprec_fraction)))
        return "probability" if combines else "sum"

    @property
    def scores_by_probability(self) -> bool:
        """True where one set per KV head ranks by summed per-head probabilities (`effective_group_score`)."""
        return self.effective_group_score == "probability"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_args(cls, args: Any, **extra: Any) -> "DashKVConfig":
        """The configuration of a command line (`dashkv demo/generate/bench decode`): the options
        `_add_dashkv_args` defines, each falling back to the field's default when a command lacks it; --bits
        not given: the code length of the --encoders directory, if any (`HashEncoders.stored_bits`)."""
        names = ("bits", "budget", "sink", "window", "min_context", "rerank", "rerank_bits", "head_budget", "temporal",
                 "query_bits", "lowprec_fraction", "successors", "group_score")
        values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        if "bits" not in extra:
            values["bits"] = resolve_bits(getattr(args, "bits", None), getattr(args, "encoders", None))
        return cls(**values, **extra)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DashKVConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DashKVConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class StepPlan:
    """How one decode step at context n spends its budget (counts per selecting head)."""

    n: int
    dense: bool
    sink: int
    window: int
    critical: int
    lowprec: int
    rerank: int = 0  # candidates of the code scan re-scored from int8 keys (0: no re-rank stage)
    rerank_cost: float = 0.0  # full K+V rows one re-scored key costs
    lowprec_cost: float = 0.0  # full K+V rows one row of the 8-bit tier costs

    @property
    def total(self) -> int:
        """Positions attended per selecting head (both tiers)."""
        return self.n if self.dense else self.sink + self.window + self.critical + self.lowprec

    @property
    def reads(self) -> float:
        """Full K+V rows read per selecting head: the exact tokens, the 8-bit tier's rows at their cost and
        the re-scored int8 keys -- what the budget bounds."""
        if self.dense:
            return float(self.n)
        return (self.sink + self.window + self.critical + self.lowprec * self.lowprec_cost
                + self.rerank * self.rerank_cost)


def rerank_read_cost(head_dim: int, element_bytes: int, bits: int = 8) -> float:
    """Cost of re-scoring one key from its int8 / int4 copy (d·bits/8 bytes + a float32 scale), in full
    K+V rows."""
    return (head_dim * bits / 8 + 4) / (2 * head_dim * element_bytes)
