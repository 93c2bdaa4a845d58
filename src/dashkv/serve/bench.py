"""`dashkv bench serve`: N concurrent streaming clients against the server, DASH-KV vs dense.

Both modes run on the same server process (one model, one engine), chosen per request with the `dashkv`
extension field, so the comparison needs no restart and shares every other cost. Each client sends one
streamed /v1/completions request per repeat with its own window of real text of `--context` tokens (as
token ids, so lengths are exact), greedy. Modes alternate within each repeat. Reported per mode: aggregate
completion tokens/s (all tokens of all clients / wall time from the first request sent to the last done),
time to first token (arrival to first streamed text, so it includes queueing and the batch's prefill).
By default the server is started in this process on a free loopback port; `--url` targets a running one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to serve (default: %(default)s)")
    p.add_argument("--encoders", default=None, help="encoder directory (default: the shipped ones)")
    p.add_argument("--url", default=None, help="benchmark a running server at this base URL instead "
                                               "(e.g. http://127.0.0.1:8000); --model is then its model id")
    p.add_argument("--budget", default="1/16", help="DASH-KV budget of the dashkv rows (default: %(default)s)")
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default: %(default)s)")
    p.add_argument("--context", type=int, default=8128,
                   help="prompt tokens per request; + --new-tokens must fit the model (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="max_tokens per request (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per mode (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: --clients)")
    p.add_argument("--max-kv-memory", default="16GiB", help="server --max-kv-memory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and numba threads of the in-process server (default: their choice)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _InProcessServer:
    """uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: Any):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, float]:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "tokens": tokens, "end": end, "start": t0}


async def _round(url: str, model: str, prompts: list[list[int]], new_tokens: int, dashkv: Any) -> dict[str, Any]:
    import httpx

    body = {"model": model, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "dashkv": dashkv}
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one(client, url, {**body, "prompt": p}) for p in prompts))
    wall = max(r["end"] for r in res) - t0
    tokens = sum(r["tokens"] for r in res)
    ttfts = [r["ttft_s"] for r in res]
    return {"wall_s": wall, "tokens": tokens, "agg_tok_s": tokens / wall, "ttft_mean_s": statistics.mean(ttfts),
            "ttft_max_s": max(ttfts)}


def bench_serve(args: argparse.Namespace) -> int:
    from ..serve import require_serve_deps

    require_serve_deps()
    if args.clients < 1 or args.repeats < 1 or args.context < 16 or args.new_tokens < 2:
        raise ValueError("--clients and --repeats must be >= 1, --context >= 16, --new-tokens >= 2")
    from ..bench_decode import long_prompt_ids
    from ..config import DashKVConfig, parse_budget
    from ..encoders import HashEncoders
    from ..models import load_model
    from .app import create_app
    from .engine import Engine, Mode
    from .memory import parse_bytes

    budget = parse_budget(args.budget)
    model, tok = load_model(args.model)
    stride = 64
    ids = long_prompt_ids(tok, args.context + stride * args.clients)[0].tolist()
    prompts = [ids[i * stride: i * stride + args.context] for i in range(args.clients)]
    server = None
    url = args.url
    if url is None:
        encoders = HashEncoders.from_pretrained(args.encoders) if args.encoders else None
        engine = Engine(model, tok, encoders=encoders, config=DashKVConfig(budget=budget), default_mode=Mode(budget),
                        max_batch=args.max_batch or args.clients, max_kv_memory=parse_bytes(args.max_kv_memory),
                        batch_wait_s=0.02, threads=args.threads)
        server = _InProcessServer(create_app(engine, args.model))
        url = server.__enter__()
    modes = {"dashkv": {"budget": args.budget}, "dense": "dense"}
    print(f"bench serve: {args.model}, {args.clients} clients x {args.context} prompt tokens, {args.new_tokens} new "
          f"tokens, budget {args.budget}, {args.repeats} repeats, threads {args.threads or 'default'}",
          file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(_round(url, args.model, prompts[:1], 2, "dense"))  # warm-up (kernels, allocator)
        for rep in range(args.repeats):
            for name, field in modes.items():
                r = asyncio.run(_round(url, args.model, prompts, args.new_tokens, field))
                r.update(mode=name, repeat=rep)
                rows.append(r)
                print(f"  {name:<7} repeat {rep}: {r['agg_tok_s']:7.2f} tok/s aggregate, TTFT mean "
                      f"{r['ttft_mean_s']:.2f} s (max {r['ttft_max_s']:.2f} s), {r['tokens']} tokens in "
                      f"{r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    summary = {}
    for name in modes:
        rs = [r for r in rows if r["mode"] == name]
        tps = [r["agg_tok_s"] for r in rs]
        summary[name] = {"agg_tok_s_mean": statistics.mean(tps),
                         "agg_tok_s_std": statistics.stdev(tps) if len(tps) > 1 else 0.0,
                         "ttft_mean_s": statistics.mean(r["ttft_mean_s"] for r in rs)}
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=2))
    return 0


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    head = f"{'mode':<8} {'aggregate tok/s':>16} {'x dense':>8} {'TTFT mean s':>12}"
    lines = [head, "-" * len(head)]
    dense = summary.get("dense", {}).get("agg_tok_s_mean")
    for name, s in summary.items():
        ratio = s["agg_tok_s_mean"] / dense if dense else float("nan")
        lines.append(f"{name:<8} {s['agg_tok_s_mean']:>9.2f} ± {s['agg_tok_s_std']:<4.2f} {ratio:>8.2f} "
                     f"{s['ttft_mean_s']:>12.2f}")
    return "\n".join(lines)
