"""The fused kernel's 2-thread schedule against its serial one, one layer, SmolLM2's shape, budget 1/16.

    PYTHONPATH=src python experiments/threads/parallel_kernel.py --n 65536 --out experiments/threads/parallel-64k.json

Three ways of calling it, each a median over 22 calls: back to back (the thread pool stays awake),
interleaved with the dense torch matmul + softmax of the same layer (as between layers of `generate`),
and after 5 ms of sleep (an idle pool). Phases by the kernel's `_mode`: 2 = scan only, 1 = scan +
select, 0 = the whole step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numba
import torch

from dashkv.bench import _inputs
from dashkv.config import DashKVConfig
from dashkv.kernels.cpu import dashkv_decode_cpu, threading_info, warmup


def _median_ms(seq, rounds=25, skip=3):
    ts = {}
    for r in range(rounds):
        for name, f in seq:
            t0 = time.perf_counter()
            f()
            if r >= skip:
                ts.setdefault(name, []).append(time.perf_counter() - t0)
    return {k: round(1e3 * statistics.median(v), 4) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536, help="context length (default 65536)")
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    args = ap.parse_args()
    warmup((torch.float32,), parallel=True)
    plan = DashKVConfig(bits=64, budget=1 / 16, min_context=0).plan(args.n)
    query, q_proj, keys, values, codes = _inputs(9, 3, 64, args.n, 64)
    kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=0.125)
    rows = []
    for qbits in (None, 4):
        for mode in (2, 1, 0):
            row = {"n": args.n, "query_bits": qbits, "mode": mode}
            for label, par, nt in (("serial", False, 1), ("parallel_1", True, 1), ("parallel_2", True, 2)):
                numba.set_num_threads(nt)
                f = lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=par,  # noqa: E731
                                              query_bits=qbits, _mode=mode, **kw)
                row[label] = _median_ms([("k", f)])["k"]
            rows.append(row)
            print(row, flush=True)
    numba.set_num_threads(2)
    par = lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=True, **kw)  # noqa: E731
    ser = lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)  # noqa: E731
    mm = lambda: torch.softmax((query.view(1, 3, 3, 64) @ keys.transpose(-1, -2)) * 0.125, -1) @ values  # noqa: E731
    sleep = lambda: time.sleep(0.005)  # noqa: E731
    ctx = {"back_to_back": _median_ms([("parallel_2", par), ("serial", ser)]),
           "after_torch_matmul": _median_ms([("parallel_2", par), ("mm", mm), ("serial", ser), ("mm2", mm)]),
           "after_5ms_sleep": _median_ms([("parallel_2", par), ("sleep", sleep), ("serial", ser), ("sleep2", sleep)])}
    print(ctx)
    with open(args.out, "w") as fh:
        json.dump({"rows": rows, "contexts": ctx, "threads": threading_info()}, fh, indent=1)


if __name__ == "__main__":
    main()
