"""One decode step of one layer, top to bottom: plan -> codes/scores -> selection -> attention.

This is the whole DASH-KV data path; the transformers integration (`dashkv.hf`) calls it for every
full-attention layer at every decode step, and the evaluation harness calls it for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import QuantizedRows, dense_decode_attention, sparse_decode_attention
from .config import DashKVConfig, rerank_read_cost
from .kernels import CPU_KV_DTYPES
from .selection import POOL_CAP, H2OPolicy, LayerState, SelectionPolicy, valid_positions


@dataclass
class StepStats:
    """Tokens read per step, for tests and reports: sum over steps of tokens read per selecting head."""

    steps: int = 0
    attended: float = 0  # tokens read (full K+V rows), summed over steps, batch rows and selecting heads
    context: int = 0  # context length, summed the same way
    per_step: list[tuple[int, int, float]] = field(default_factory=list)  # (layer, N, mean tokens read)

    def record(self, layer_idx: int, n: int, attended: torch.Tensor | int, keep: bool, rows: int = 1,
               extra: float = 0.0) -> None:
        """attended: tokens read per (batch row, selecting head), or an int: every one of `rows` read it;
        extra: further full-row equivalents each selecting head read (the re-rank stage's int8 keys)."""
        self.steps += 1
        if isinstance(attended, int):  # a dense step: no tensor work on the hot path
            total, count = attended * rows, rows
        else:
            total, count = float(attended.sum()), attended.numel()
        total += extra * count
        self.attended += total
        self.context += n * count
        if keep:
            self.per_step.append((layer_idx, n, total / count))

    @property
    def fraction(self) -> float:
        return self.attended / self.context if self.context else 1.0


def dense_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                 start: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 fast: bool = True) -> torch.Tensor:
    """Exact attention (B, Hq, 1, d) of one decode query over the whole cache: every dense step, those of
    DASH-KV's own layers (context within the budget or below `min_context`) and, inside `generate`, those
    of the layers it leaves dense (`hf.dashkv_attention_forward`). `start` (B,) marks left padding
    (`valid`, its (B, N) mask, if already made). `fast` False: the plain torch reference."""
    b, hkv, n, _ = keys.shape
    if valid is None and start is not None:
        valid = valid_positions(n, start, b, device=keys.device)
    if fast and keys.dtype == torch.float32:  # matmul + softmax, no K/V copy: 1.7x faster than SDPA
        from .kernels.cpu import dense_decode_torch  # for this one-query shape on the CPU

        return dense_decode_torch(query[:, :, 0], keys, values, scaling, start)[:, :, None].to(query.dtype)
    if fast:  # half precision: SDPA with each KV head's query heads as its query rows (B, Hkv, G, d), the
        # layout transformers itself uses when a mask is given (StaticCache's path); without a mask it
        # calls enable_gqa, which on a CPU without AMX is 6-7x slower per layer in bf16 (3.9 ms against
        # 0.55 at 8K; docs/RESULTS.md §1) and may differ from this layout in the last bf16 bit
        hq = query.shape[1]
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, -1), keys, values, attn_mask=mask,
                                             scale=scaling)
        return out.reshape(b, hq, 1, -1)
    return dense_decode_attention(query, keys, values, scaling, valid)


def decode_step(policy: SelectionPolicy | None, state: LayerState, query: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, scaling: float, start: torch.Tensor | None = None,
                lowprec: tuple[QuantizedRows, QuantizedRows] | None = None, fast: bool = True,
                stats: StepStats | None = None) -> torch.Tensor:
    """Attention output (B, Hq, 1, d) of one decode query against the whole cache of one layer.

    policy None means dense. The step's configuration is the policy's own (`policy.config`, with
    `policy.scorer`): the fused and reference paths cannot disagree on it. `start` (B,) marks left
    padding. With `fast`, the default DASH-KV configuration (fixed-size exact tier) runs in the fused
    kernel; everything else runs the torch reference path, which the kernel is tested against.
    """
    b, hkv, n, _ = keys.shape
    config = policy.config if policy is not None else None
    plan = (config.plan(n, rerank_read_cost(keys.shape[-1], keys.element_size(), config.rerank_bits), keys.element_size())
            if config is not None else None)
    valid = None if start is None else valid_positions(n, start, b, device=keys.device)
    if policy is None or plan.dense:
        if stats is not None:
            stats.record(state.layer_idx, n, valid.sum(-1, keepdim=True) if valid is not None else n, keep=False,
                         rows=b)
        return dense_decode(query, keys, values, scaling, start, valid, fast)

    q = query[:, :, 0, :]
    kernel = _fast_kernel(policy, config, keys) if fast else None
    if kernel is not None:
        options = {}  # what this configuration adds to the kernel call
        if plan.rerank:  # the scan picks plan.rerank candidates, the int8 keys keep plan.critical of them
            if state.keys8 is None or state.keys8.bits != config.rerank_bits:
                raise ValueError(f"DashKVConfig.rerank_bits={config.rerank_bits} needs the cache's key copy at "
                                 f"those bits (LayerState.keys8: {None if state.keys8 is None else state.keys8.bits})")
            options = dict(critical=plan.rerank, keep=plan.critical, keys8=(state.keys8.q, state.keys8.scale))
        elif plan.lowprec:  # three tiers: exact, the 8-bit copies, skipped
            if lowprec is None:
                raise ValueError("the plan has a low-precision tier but no 8-bit K/V copy was given")
            options = dict(lowprec=plan.lowprec, keys8=(lowprec[0].q, lowprec[0].scale),
                           values8=(lowprec[1].q, lowprec[1].scale), return_lowprec_counts=stats is not None)
        elif config.head_budget == "pooled":  # the layer's exact tokens shared between its heads
            options = dict(pool_temps=policy.pool_temperatures(state.layer_idx, hkv).numpy(),
                           k_min=min(config.k_min, plan.critical), pool_cap=POOL_CAP)
        if config.query_bits:  # the bit-plane scan (CPU kernel only: `_fast_kernel`)
            options["query_bits"] = config.query_bits
        if config.scores_by_probability:  # one scan per query head
            options["prob_temps"] = policy.probability_temperatures(state.layer_idx)
        if state.buffer_views is not None and keys.device.type == "cpu":
            options["views"] = state.buffer_views  # the cache's numpy views: no per-call stride walk
        folded = None
        if getattr(policy, "pq", False):  # PQ codes: the CPU kernel builds the query's tables itself
            options["pq"] = policy.encoders.pq_arrays(state.layer_idx)
        elif keys.device.type == "cpu":
            folded = policy.fused_query_encoder(state.layer_idx, q)
            if folded is not None:  # the CPU kernel projects the query itself
                options["query_encoder"] = folded
        result = kernel(
            q, None if folded is not None or "pq" in options else policy.query_projection(state.layer_idx, q),
            keys, values,
            state.codes,
            **{"sink": plan.sink, "window": plan.window, "critical": plan.critical, **options}, scaling=scaling,
            grouping=config.grouping, scorer=policy.scorer, start=start, return_counts=stats is not None)
        if stats is None:  # the counts cost a copy and a tensor per call (~10 µs): only when tracked
            return result[:, :, None, :].to(query.dtype)
        out, idx_count, *low = result
        read = idx_count - low[0] * (1.0 - plan.lowprec_cost) if low else idx_count  # 8-bit rows at their bytes
        stats.record(state.layer_idx, n, read, keep=True, extra=plan.rerank * plan.rerank_cost)
        return out[:, :, None, :].to(query.dtype)

    selection = policy.select(state, q, keys, plan, scaling, start)
    carry = state.carry if config.temporal else None  # this layer's attention, for the next layer's ranking
    want_probs = isinstance(policy, H2OPolicy) or carry is not None
    result = sparse_decode_attention(query, keys, values, selection, scaling, lowprec, return_probs=want_probs)
    if want_probs:
        result, probs = result
        if carry is not None:
            carry.put(state.layer_idx, n, selection, probs, query.shape[1])
        if isinstance(policy, H2OPolicy):
            policy.observe(state, selection, probs)
    if stats is not None:  # 8-bit rows count at their bytes
        read = selection.attended()
        if selection.lowprec is not None:
            read = read - selection.lowprec.sum(-1) * (1.0 - plan.lowprec_cost)
        stats.record(state.layer_idx, n, read, keep=True, extra=plan.rerank * plan.rerank_cost)
    return result


def reference_path_reasons(config: DashKVConfig, device_type: str, kv_dtype: torch.dtype,
                           pq: bool = False) -> list[str]:
    """Why a code-scanning step (DASH-KV, SimHash) with this configuration runs the torch reference path
    instead of a fused kernel; empty when a fused kernel serves it.

    The one statement of what the fused kernels cover: `_fast_kernel` decides by it every step and
    `hf.enable` warns with it once. They serve a fixed-size exact tier: numba on the CPU (float32,
    bfloat16 or float16 K/V, on the calling thread; with the re-rank stage, pooled budgets, the bit-plane
    scan or the 8-bit tier, one at a time, and the probability group score), Triton on CUDA (the plain
    tiers).
    """
    reasons = _configuration_reasons(config, device_type, kv_dtype, pq)
    if reasons:
        return reasons
    _, missing = _device_kernel(device_type)
    return [missing] if missing else []


def _configuration_reasons(config: DashKVConfig, device_type: str, kv_dtype: torch.dtype,
                           pq: bool = False) -> list[str]:
    """The options (and K/V dtype) no fused kernel of this device serves; `pq`: PQ key codes. Asked at
    every decode step of every layer: remembered on the config (dropped when a field is set)."""
    memo = config.__dict__.get("_reasons_memo")
    key = (device_type, kv_dtype, pq)
    if memo is not None and key in memo:
        return list(memo[key])
    reasons = _reasons(config, device_type, kv_dtype, pq)
    config.__dict__.setdefault("_reasons_memo", {})[key] = tuple(reasons)  # not a field: eq and asdict ignore it
    return reasons


def _reasons(config: DashKVConfig, device_type: str, kv_dtype: torch.dtype, pq: bool) -> list[str]:
    reasons = []
    if pq and (device_type != "cpu" or not config.scores_by_probability):
        reasons.append("PQ key codes (fused in the CPU kernel with the probability group score)")
    if config.adaptive:
        reasons.append("adaptive=True")
    if config.spatial_vote:
        reasons.append(f"spatial_vote={config.spatial_vote}")
    if config.temporal:
        reasons.append(f"temporal={config.temporal}")
    if config.successors:
        reasons.append(f"successors={config.successors}")
    if config.scores_by_probability and (device_type != "cpu" or config.scorer == "hamming"):
        reasons.append("group_score='probability' (fused in the CPU kernel with the asymmetric scorer; "
                       "group_score='sum' runs the fused kernels everywhere)")
    pooled = config.head_budget == "pooled"
    if config.lowprec_fraction > 0 and (device_type != "cpu" or config.rerank or pooled):
        reasons.append(f"lowprec_fraction={config.lowprec_fraction} (the 8-bit tier is fused on the CPU, with a "
                       "fixed exact tier and no re-rank)")
    if pooled and config.rerank:
        reasons.append("head_budget='pooled' with rerank (pooled after the re-rank stage)")
    elif pooled and device_type != "cpu":
        reasons.append("head_budget='pooled' (in the CPU kernel only)")
    if config.rerank and device_type != "cpu":
        reasons.append(f"rerank={config.rerank} (the re-rank stage is in the CPU kernel only)")
    if config.query_bits and device_type != "cpu":
        reasons.append(f"query_bits={config.query_bits} (the bit-plane scan is in the CPU kernel only)")
    if device_type == "cpu" and kv_dtype not in CPU_KV_DTYPES:
        reasons.append(f"the CPU kernels take float32, bfloat16 or float16 K/V, the model is {kv_dtype}")
    return reasons


_DEVICE_KERNELS: dict = {}  # device type -> (kernel module, its fused function's name) or (None, why none)


def _device_kernel(device_type: str):
    """(the fused kernel of this device type, None), or (None, why there is none). The import is tried
    once per process (this runs at every decode step); the function is looked up on its module each
    time, so a wrapper put there (`--profile`, a test's spy) is what runs. Triton's availability is
    asked every time, as before (it reads TRITON_INTERPRET)."""
    found = _DEVICE_KERNELS.get(device_type)
    if found is None:
        if device_type == "cpu":
            try:
                from .kernels import cpu as module
                found = (module, "dashkv_decode_cpu")
            except ImportError as e:
                found = (None, f"the numba CPU kernels cannot be imported ({e})")
        elif device_type == "cuda":
            try:
                from .kernels import triton_kernels as module
                found = (module, "dashkv_decode_triton")
            except ImportError:
                found = (None, "triton is not available")
        else:
            found = (None, f"no fused kernel for device {device_type!r}")
        _DEVICE_KERNELS[device_type] = found
    module, name = found
    if module is None:
        return None, name
    if device_type == "cuda" and not module.triton_available():
        return None, "triton is not available"
    return getattr(module, name), None


def _fast_kernel(policy: SelectionPolicy, config: DashKVConfig, keys: torch.Tensor):
    """The fused kernel for this step, or None for the torch reference path (`hf.enable` warns once, with
    the same `reference_path_reasons`). Baselines (oracle, Quest, H2O, ...) have no fused kernel by design."""
    if not policy.uses_codes or _configuration_reasons(config, keys.device.type, keys.dtype,
                                                       getattr(policy, "pq", False)):
        return None
    return _device_kernel(keys.device.type)[0]
