"""`dashkv bench decode`: end-to-end decode tokens/s of `model.generate`, DASH-KV vs the unmodified model.

All rows run in the same process on the same prompt, one after the other:
- unmodified:       the model as loaded (transformers sdpa attention, DynamicCache);
- dense-dashkv-cache: DASH-KV's cache and attention path with selection switched off (policy "dense"),
                    which separates the gain of the preallocated cache from the gain of sparse reading;
- dashkv:           DASH-KV at the given budget.
Decode speed counts decode steps only: a streamer timestamps every token `generate` emits, and the time
to the first new token (the prefill) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import DashKVConfig


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
    from .demo import default_haystack
    from .eval.haystack import fill_to_tokens, get_haystack

    import random

    source = get_haystack(default_haystack(text_path))
    chunks = fill_to_tokens(source, tokenizer, n_tokens + 64, random.Random(0))
    ids = tokenizer.encode(" ".join(chunks), add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"could only build {len(ids)} tokens of text; lower --context")
    return torch.tensor([ids[:n_tokens]])


@torch.no_grad()
def time_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    from .demo import peak_rss_mb, reset_peak_rss

    streamer = TimingStreamer()
    reset_peak_rss()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, streamer=streamer, pad_token_id=0)
    t = streamer.times  # [prompt, token 1 (after prefill), token 2, ...]
    decode_steps = len(t) - 2
    return {"prefill_s": t[1] - t[0], "decode_s": t[-1] - t[1], "decode_tokens": decode_steps,
            "decode_tok_s": decode_steps / (t[-1] - t[1]), "peak_rss_mb": peak_rss_mb()}


def bench_decode(args: argparse.Namespace, model: Any = None, tokenizer: Any = None, encoders: Any = None) -> int:
    config = DashKVConfig(bits=args.bits, budget=args.budget, sink=args.sink, window=args.window)
    if args.context < 64 or args.new_tokens < 3:
        raise ValueError("--context must be >= 64 and --new-tokens >= 3")
    from .encoders import HashEncoders
    from .hf import disable, enable
    from .models import check_context_length, load_model

    if encoders is None and getattr(args, "encoders", None):
        encoders = HashEncoders.from_pretrained(args.encoders)
    if model is None:
        model, tokenizer = load_model(args.model)
    check_context_length(model, args.context + args.new_tokens)
    ids = long_prompt_ids(tokenizer, args.context)
    threads = torch.get_num_threads()
    print(f"bench decode: {args.model}, context {args.context}, {args.new_tokens} new tokens, budget {args.budget}, "
          f"{config.bits} bits, torch threads {threads}", file=sys.stderr, flush=True)
    rows = []
    for name in ("unmodified", "dense-dashkv-cache", "dashkv"):
        handle = None
        if name == "dashkv":
            handle = enable(model, encoders, config, track=True)
        elif name == "dense-dashkv-cache":
            handle = enable(model, encoders, config, method="dense")
        r = time_generate(model, ids, args.new_tokens)
        if handle is not None and handle.stats is not None and handle.stats.per_step:
            r["read_fraction_sparse_layers"] = handle.stats.fraction
        disable(model)
        r["method"] = name
        rows.append(r)
        print(f"  {name:<20} decode {r['decode_tok_s']:6.2f} tok/s   prefill {r['prefill_s']:6.1f} s   "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB", file=sys.stderr, flush=True)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["speedup_vs_unmodified"] = r["decode_tok_s"] / base
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                               "torch_threads": threads, "rows": rows}, indent=2))
    return 0


def format_rows(rows: list[dict]) -> str:
    head = f"{'method':<20} {'decode tok/s':>12} {'x unmodified':>12} {'prefill s':>9} {'peak RSS MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<20} {r['decode_tok_s']:>12.2f} {r['speedup_vs_unmodified']:>12.2f} "
                     f"{r['prefill_s']:>9.1f} {r['peak_rss_mb']:>11.0f}")
    return "\n".join(lines)
