"""`dashkv serve`: validate the arguments, load the model, start the engine and uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from . import require_serve_deps

log = logging.getLogger("dashkv.serve")


def _default_mode(budget: str):
    from ..config import parse_budget
    from .engine import Mode

    return Mode(None) if budget.strip().lower() == "dense" else Mode(parse_budget(budget))


def serve_command(args: argparse.Namespace) -> int:
    require_serve_deps()
    from ..config import DashKVConfig, resolve_bits
    from .memory import parse_bytes

    # everything a user can get wrong is checked before the model is loaded
    mode = _default_mode(args.budget)
    config = DashKVConfig(bits=resolve_bits(args.bits, args.encoders), budget=mode.budget if not mode.dense else "1/16", sink=args.sink,
                          window=args.window)
    max_kv = parse_bytes(args.max_kv_memory)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise ValueError("--max-batch must be >= 1")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError("--max-context must be >= 2")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("listening on %s: this server has no authentication", args.host)

    import torch
    import uvicorn

    from ..encoders import HashEncoders
    from ..models import load_model
    from .app import create_app
    from .engine import Engine

    encoders = HashEncoders.from_pretrained(args.encoders) if args.encoders else None
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    engine = Engine(model, tokenizer, encoders=encoders, config=config, default_mode=mode,
                    max_batch=args.max_batch, max_kv_memory=max_kv, max_context=args.max_context,
                    batch_wait_s=args.batch_wait_ms / 1000, threads=args.threads, scheduler=args.scheduler)
    name = args.served_model_name or args.model
    app = create_app(engine, name)
    log.info("dashkv serve: %s on http://%s:%d/v1 (default dashkv: %s, %s batching, max batch %d, KV bound %s)",
             name, args.host, args.port, mode.label(), engine.scheduler, args.max_batch, args.max_kv_memory)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
