#!/usr/bin/env python
"""`model.generate` with DASH-KV end to end on one device (CUDA: the Triton path), in one short run.

1. parity: at full budget, greedy generate with DASH-KV is token-identical to the unmodified model
   (fp32; greedy, a left-padded batch, beam search 3);
2. agreement: at budget 1/16 (a 2K-token context, dense_layers=()), the fused path and the torch
   reference path generate the same tokens (random real-valued encoders: no score ties), and decode
   steps read about 1/16 of the context;
3. speed: decode tokens/s of DASH-KV at 1/16 against the unmodified model with
   cache_implementation="static" and with its default dynamic cache, at --ctx tokens, bf16 and fp32.

Prints one line per check, writes JSON (--out, else $OUT/gpu_generate_check.json, else ./...), exits 1
on any failed check. Runs on the CPU too (`--device cpu --ctx 2048`), as a smoke test.

    python scripts/gpu_generate_check.py                  # on a CUDA machine (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from dashkv import hf  # noqa: E402
from dashkv.config import DashKVConfig  # noqa: E402
from dashkv.encoders import HashEncoders  # noqa: E402
from dashkv.models import model_shape, tiny_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(device, dtype, layers=4, heads=(8, 2), head_dim=64, max_pos=40000):
    m = tiny_model("llama", num_layers=layers, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                   max_position_embeddings=max_pos, dtype=dtype)
    return m.to(device)


def _learned(model, seed=0):
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    enc = HashEncoders(s.to_dict(), 64, s.full_attention_layers)
    for p in enc.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return enc


def _simhash(model):
    s = model_shape(model)
    return HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=0)


def _ids(n, batch, device, seed=0):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _gen(model, ids, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


def check_parity(device, results):
    model = _model(device, torch.float32)
    ids = _ids(1024, 1, device)
    batch = _ids(700, 3, device, seed=1)
    mask = torch.ones_like(batch)
    mask[0, :100] = 0
    mask[2, :9] = 0
    batch = batch.masked_fill(mask == 0, 0)
    cases = {"greedy": (ids, None, {}), "left-padded batch": (batch, mask, {}),
             "beam search 3": (ids, None, {"num_beams": 3})}
    for name, (x, m, kw) in cases.items():
        ref = _gen(model, x, m, max_new_tokens=16, **kw)
        with hf.enable(model, _simhash(model), DashKVConfig(budget=1.0, dense_layers=())):
            out = _gen(model, x, m, max_new_tokens=16, **kw)
        ok = torch.equal(out, ref)
        results.append(dict(check=f"parity full budget: {name}", ok=ok))
        print(f"{'ok ' if ok else 'BAD'} parity at full budget, {name}", flush=True)


def check_agreement(device, results):
    model = _model(device, torch.float32)
    ids = _ids(2048, 2, device, seed=2)
    # the Triton kernel ranks by the summed score (the probability score is fused on the CPU only)
    cfg = DashKVConfig(budget=1 / 16, sink=4, window=32, dense_layers=(), group_score="sum", min_context=1536)
    outs, fracs = [], []
    for fast in (True, False):
        with hf.enable(model, _learned(model), cfg, track=True) as h:
            h.fast = fast
            outs.append(_gen(model, ids, max_new_tokens=24))
            fracs.append(h.stats.fraction)
    ok = torch.equal(outs[0], outs[1]) and all(f < 0.1 for f in fracs)
    results.append(dict(check="fused == reference at 1/16", ok=ok, read_fraction=fracs))
    print(f"{'ok ' if ok else 'BAD'} fused == reference at 1/16 (read fraction {fracs[0]:.3f})", flush=True)


def _decode_tok_s(model, ids, new, **kw):
    """Decode tokens/s, from a stopping criterion that stamps the time after every step (so prefill is
    excluded); best of 2 runs."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores, **_):
            _sync(input_ids.device)
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    best = 0.0
    for _ in range(2):
        clock = Clock()
        _gen(model, ids, max_new_tokens=new, min_new_tokens=new, stopping_criteria=StoppingCriteriaList([clock]),
             **kw)
        best = max(best, (len(clock.t) - 1) / (clock.t[-1] - clock.t[0]))
    return best


def check_speed(device, results, ctx, new, dtypes):
    for dtype in dtypes:
        model = _model(device, dtype, layers=8, heads=(16, 4), head_dim=128)
        ids = _ids(ctx, 1, device, seed=3)
        row = dict(check=f"decode tok/s at {ctx} tokens, {dtype}", ok=True, ctx=ctx, dtype=str(dtype))
        row["static"] = _decode_tok_s(model, ids, new, cache_implementation="static")
        row["dynamic"] = _decode_tok_s(model, ids, new)
        with hf.enable(model, _learned(model), DashKVConfig(budget=1 / 16, dense_layers=(), group_score="sum")) as h:
            row["dashkv_1_16"] = _decode_tok_s(model, ids, new)
            h.fast = False
            row["dashkv_1_16_reference_path"] = _decode_tok_s(model, ids, new)
        results.append(row)
        print(f"    {row['check']}: static {row['static']:.1f}, dynamic {row['dynamic']:.1f}, dashkv 1/16 "
              f"{row['dashkv_1_16']:.1f} (reference path {row['dashkv_1_16_reference_path']:.1f})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ctx", type=int, default=32768, help="context length of the speed check")
    ap.add_argument("--new", type=int, default=64, help="decode tokens timed")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (pass --device cpu for a CPU smoke test)", file=sys.stderr)
        return 2
    results: list[dict] = []
    t0 = time.perf_counter()
    for name, fn in (("parity", lambda: check_parity(device, results)),
                     ("agreement", lambda: check_agreement(device, results)),
                     ("speed", None if args.no_speed else
                      lambda: check_speed(device, results, args.ctx, args.new,
                                          [getattr(torch, d) for d in args.dtypes.split(",")]))):
        if fn is None:
            continue
        try:
            fn()
        except Exception as e:  # report and go on: one run should say everything
            results.append(dict(check=name, ok=False, error=f"{type(e).__name__}: {e}"))
            print(f"BAD {name}: {type(e).__name__}: {e}", flush=True)
    ok = all(r["ok"] for r in results)
    report = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", ok=ok,
                  torch=torch.__version__, wall_s=round(time.perf_counter() - t0, 1), results=results)
    out = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_generate_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{sum(r['ok'] for r in results)}/{len(results)} checks ok; {report['wall_s']} s; report: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
