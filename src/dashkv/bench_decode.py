"""`dashkv bench decode`: decode step time of DASH-KV against the best dense decoding, step-interleaved.

Rows (each its own model copy and cache, all prefilled once from the same prompt):
- dynamic:            the unmodified model with transformers' default DynamicCache (re-concatenates K/V
                      every step: what `generate` does unless told otherwise);
- static:             the unmodified model with transformers' StaticCache (preallocated, in place): the
                      best dense decoding a user can ask `generate` for, and **the baseline of every ratio**;
- dense-dashkv-cache: DASH-KV's cache with selection off (every step dense, on our attention path);
- dashkv:             DASH-KV at the given budget;
- floor:              the unmodified model + StaticCache at a context equal to the budget (the last
                      budget-many prompt tokens): what a decode step reading budget-many tokens would cost
                      if selecting them were free.

Timing: after the prefills, decode steps run round-robin -- one step of every row, then the next step of
every row -- so drift on a shared machine hits every row alike. Each row feeds back its own greedy token.
The report gives the median ms/step with the 10th-90th percentile spread over the timed steps, the ratio
of StaticCache's median to each row's, the prefill time and the bytes its cache holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import DashKVConfig

ROWS = ("dynamic", "static", "dense-dashkv-cache", "dashkv", "floor")


class TimingStreamer:
    """A transformers streamer that only records when each chunk of tokens arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def long_prompt_ids(tokenizer: Any, n_tokens: int, text_path: str | None = None) -> torch.Tensor:
    """Exactly n_tokens of real text (essays if installed, else the Python standard library's sources)."""
    import random

    from .demo import default_haystack
    from .eval.haystack import fill_to_tokens, get_haystack

    source = get_haystack(default_haystack(text_path))
    chunks = fill_to_tokens(source, tokenizer, n_tokens + 64, random.Random(0))
    ids = tokenizer.encode(" ".join(chunks), add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"could only build {len(ids)} tokens of text; lower --context")
    return torch.tensor([ids[:n_tokens]])


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a cache holds (preallocated capacity included)."""
    seen: set[int] = set()
    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = list(getattr(layer, "_buffers", {}).values()) or [getattr(layer, "keys", None),
                                                                     getattr(layer, "values", None)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _repeat_batch(cache: Any, batch: int) -> None:
    """Turn a batch-1 cache into `batch` identical rows (same prompt in every row) without a new prefill."""
    if batch == 1:
        return
    for layer in cache.layers:
        if hasattr(layer, "_buffers"):  # DashKVLayer
            layer.batch_repeat_interleave(batch)
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, t.repeat_interleave(batch, 0).contiguous())
        if hasattr(layer, "batch_size"):
            layer.batch_size = batch


class _Row:
    """One benchmarked configuration: its model, cache, next token and step times."""

    def __init__(self, name: str, model: Any, handle: Any = None):
        self.name, self.model, self.handle = name, model, handle
        self.cache: Any = None
        self.token: torch.Tensor | None = None
        self.times: list[float] = []
        self.prefill_s = 0.0

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: Any, batch: int) -> None:
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, cache=cache, use_cache=True)
        self.prefill_s = time.perf_counter() - t0
        self.cache = out.cache
        _repeat_batch(self.cache, batch)
        self.token = out.logits[:, -1:].argmax(-1).repeat_interleave(batch, 0)

    @torch.no_grad()
    def step(self, timed: bool) -> None:
        t0 = time.perf_counter()
        out = self.model(input_ids=self.token, cache=self.cache, use_cache=True)
        self.token = out.logits[:, -1:].argmax(-1)
        if timed:
            self.times.append(time.perf_counter() - t0)


def _summary(row: _Row, base_ms: float | None) -> dict[str, Any]:
    ms = sorted(t * 1e3 for t in row.times)
    q = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    med = statistics.median(ms)
    r = {"row": row.name, "times_ms": [round(t * 1e3, 2) for t in row.times], "median_ms": med, "p10_ms": q[0], "p90_ms": q[-1], "steps": len(ms),
         "prefill_s": row.prefill_s, "cache_mb": cache_bytes(row.cache) / 2**20}
    if base_ms is not None:
        r["x_static"] = base_ms / med
    if row.handle is not None and row.handle.stats is not None and row.handle.stats.per_step:
        r["read_fraction_sparse_layers"] = row.handle.stats.fraction
    return r


def bench_decode(args: argparse.Namespace, model: Any = None, tokenizer: Any = None, encoders: Any = None) -> int:
    """Run the rows of this module's docstring at every batch size of `--batch` and print one table each."""
    from transformers import DynamicCache, StaticCache

    from .encoders import HashEncoders
    from .hf import enable
    from .models import check_context_length, load_model

    config = DashKVConfig.from_args(args)
    batches = [int(b) for b in str(args.batch).split(",")]
    if args.context < 64 or args.steps < 3 or args.warmup < 0 or min(batches) < 1:
        raise ValueError("--context must be >= 64, --steps >= 3, --warmup >= 0 and --batch >= 1")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if encoders is None and getattr(args, "encoders", None):
        encoders = HashEncoders.from_pretrained(args.encoders)
    if model is None:
        model, tokenizer = load_model(args.model)
    model = model.to(dtype).eval()
    total = args.context + args.warmup + args.steps + 2
    check_context_length(model, total)
    ids = long_prompt_ids(tokenizer, args.context)
    floor_n = config.budget_tokens(args.context)
    threads = torch.get_num_threads()
    info = _threading_info()
    print(f"bench decode: {args.model}, {args.dtype}, context {args.context}, budget {args.budget} "
          f"({floor_n} tokens), {config.bits} bits, {args.steps} timed steps after {args.warmup} warm-up, "
          f"torch threads {threads}, kernels {info}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "func"},
                              "torch_threads": threads, "kernels": info, "floor_tokens": floor_n, "tables": []}
    for batch in batches:
        rows = []
        for name in ROWS:
            m = model if name in ("dynamic", "static", "floor") else copy.deepcopy(model)
            handle = None
            if name == "dashkv":
                handle = enable(m, encoders, config, track=True)
            elif name == "dense-dashkv-cache":
                handle = enable(m, encoders, config, method="dense")
            row = _Row(name, m, handle)
            if name == "dynamic":
                row.prefill(ids, DynamicCache(config=m.config), batch)
            elif name == "static":
                row.prefill(ids, StaticCache(config=m.config, max_cache_len=total), batch)
            elif name == "floor":
                row.prefill(ids[:, -floor_n:], StaticCache(config=m.config, max_cache_len=floor_n + total - args.context),
                            batch)
            else:
                row.prefill(ids, None, batch)
            rows.append(row)
            print(f"  batch {batch}: {name:<20} prefill {row.prefill_s:6.1f} s", file=sys.stderr, flush=True)
        for s in range(args.warmup + args.steps):
            for row in rows:
                row.step(timed=s >= args.warmup)
        base = statistics.median(rows[ROWS.index("static")].times) * 1e3
        table = [_summary(r, base) for r in rows]
        floor = table[ROWS.index("floor")]["median_ms"]
        for r in table:
            r["x_floor"] = r["median_ms"] / floor
        result["tables"].append({"batch": batch, "rows": table})
        print(format_rows(batch, table))
        del rows
    if getattr(args, "profile", False):
        result["profile"] = profile_generate(model, ids, config, encoders, args.steps)
        print(format_profile(result["profile"]))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _threading_info() -> dict:
    try:
        from .kernels.cpu import threading_info
    except ImportError:
        return {}
    return threading_info()


def format_rows(batch: int, rows: list[dict]) -> str:
    head = (f"batch {batch}\n{'row':<20} {'ms/step':>8} {'p10-p90':>13} {'x static':>8} {'/ floor':>7} "
            f"{'prefill s':>9} {'cache MB':>8} {'read':>6}")
    lines = [head, "-" * len(head.splitlines()[-1])]
    for r in rows:
        read = r.get("read_fraction_sparse_layers")
        lines.append(f"{r['row']:<20} {r['median_ms']:>8.1f} {r['p10_ms']:>6.1f}-{r['p90_ms']:<6.1f} "
                     f"{r['x_static']:>8.2f} {r['x_floor']:>7.2f} {r['prefill_s']:>9.1f} {r['cache_mb']:>8.0f} "
                     f"{'' if read is None else f'{read:.3f}':>6}")
    return "\n".join(lines)


# ---- --profile: where a DASH-KV decode step spends its time, inside a real `generate` ------------------
def _parts() -> list[tuple[Any, str, str, bool]]:
    """(owner, attribute, label, also runs at prefill) of each piece of a decode step timed separately."""
    from . import cache, encoders, hf, selection
    from .kernels import cpu

    return [
        (cache.DashKVLayer, "update", "cache append (incl. key encoding)", True),
        (cpu, "append_coded_cpu", "one-call append (K/V rows + key codes)", True),
        (encoders.HashEncoders, "encode_keys", "key encoding (general append path)", True),
        (hf, "decode_step", "decode_step (incl. the parts below)", False),
        (selection.DashKVPolicy, "query_projection", "query projection", False),  # absent: folded below
        (cpu, "dashkv_decode_cpu", "fused kernel (query projection, scan, select, attend)", False),
    ]


@torch.no_grad()
def profile_generate(model: Any, ids: torch.Tensor, config: DashKVConfig, encoders: Any, new_tokens: int) -> dict:
    """Per-layer time of each part of DASH-KV's decode steps inside `model.generate` (one run, after the
    timed rows, so the timers cannot slow what the table measured). Only single-token calls count."""
    from .hf import disable, enable

    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    saved = []

    def timed(fn: Any, label: str, prefill_too: bool) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = fn(*a, **k)
            dt = time.perf_counter() - t0
            if prefill_too:  # count it only when its (B, H, T, d) states hold one token per row
                states = next(x for x in a if isinstance(x, torch.Tensor))
                if states.shape[-2] != 1:
                    return r
            totals[label] = totals.get(label, 0.0) + dt
            calls[label] = calls.get(label, 0) + 1
            return r
        return wrapper

    handle = enable(model, encoders, config)
    try:
        for owner, name, label, prefill_too in _parts():
            fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            saved.append((owner, name, fn))
            setattr(owner, name, timed(fn, label, prefill_too))
        streamer = TimingStreamer()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                       min_new_tokens=new_tokens + 1, do_sample=False, streamer=streamer, pad_token_id=0)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        disable(model)
    steps = len(streamer.times) - 2
    step_s = (streamer.times[-1] - streamer.times[1]) / steps
    layers = len(handle.managed_layers)
    parts = {label: {"us_per_layer": totals[label] / calls[label] * 1e6, "ms_per_step": totals[label] / steps * 1e3}
             for label in totals}
    return {"steps": steps, "ms_per_step": step_s * 1e3, "managed_layers": layers, "parts": parts}


def format_profile(p: dict) -> str:
    lines = [f"profile: {p['steps']} decode steps of generate, {p['ms_per_step']:.1f} ms/step, "
             f"{p['managed_layers']} DASH-KV layers",
             f"{'part':<40} {'us/layer':>9} {'ms/step':>8}"]
    for label, v in p["parts"].items():
        lines.append(f"{label:<40} {v['us_per_layer']:>9.1f} {v['ms_per_step']:>8.2f}")
    return "\n".join(lines)
