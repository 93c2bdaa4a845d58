"""Kernel benchmark: one layer's decode attention, DASH-KV fused CPU kernel vs dense, in the same run.

    python -m dashkv.bench kernel --n 4096,16384,65536 --bits 64 --budget 1/16 --json out.json
    dashkv bench kernel ...            (the CLI calls `bench_kernel` and `format_table`)

For each (shape, N, bits), batch 1, K/V of `dtype` (float32 or bfloat16), with random-normal K/V and
key codes = sign of a random projection of the keys (the query projection uses the same projection), it
times, round-robin in the same loop (so every method sees the same machine noise), the median over
`repeats` rounds after warm-up:

- `dashkv`: `dashkv_decode_cpu(parallel=True)` (grouping="kv_head", scorer="asymmetric") on all
  threads: scan + select + attention;
- `dashkv_select`: the same call stopped after the selection (scan + counting select), so the attention
  part is `dashkv - dashkv_select`;
- `dashkv_hamming`: the same with the popcount scan;
- `dashkv_serial`: the single-threaded schedule that decoding inside `generate` uses;
- `dashkv_q8`, `dashkv_q4`: the serial schedule with the bit-plane scan of 8- or 4-bit query levels
  (`query_bits`);
- `dashkv_prob_split`: the probability score on the schedule decoding uses: the serial compile with a
  call's rows (one row: its KV heads, when large enough) split over the benchmark's threads
  (`set_row_threads`); every other serial column runs on one thread;
- `dashkv_prob_rr8`, `dashkv_prob_rr4`: the serial probability-score schedule with the re-rank stage
  (`rerank=3`, int8 or packed int4 key copy), its exact tier shrunk so the reads stay equal;
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention(q, K, V, enable_gqa=True)` -- torch's own
  GQA path, no K/V copy (repeat_interleave would add a full K/V copy per call);
- `dense_torch`: plain `matmul + softmax + matmul` on (B, Hkv, G, d) queries (no K/V copy);
- `dense_numba`: the numba split-K dense kernel (`dense_decode_cpu`).
`best_dense` is the faster of the last two. Bytes each method must read (e = bytes per K/V element):
dense 2*N*d*Hkv*e; DASH-KV N*(b/8)*Hkv code bytes + (sink+window+critical)*2*d*e per selecting head (the 2-byte bucket
per candidate is written and re-read from cache and not counted).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

SHAPES = {"smollm2": (9, 3, 64), "d128": (32, 8, 128)}  # (query heads, KV heads, head dim)
METHODS = ("dashkv", "dashkv_select", "dashkv_hamming", "dashkv_serial", "dashkv_q8", "dashkv_q4", "dashkv_prob",
           "dashkv_prob_serial", "dashkv_prob_split", "dashkv_prob_rr8", "dashkv_prob_rr4", "sdpa", "dense_torch", "dense_numba")
RERANK = 3  # the re-rank rows' candidate factor (the best measured at int4, docs/RESULTS.md §3)
# dashkv_q8/_q4: the bit-plane scan (`DashKVConfig.query_bits`), 1 thread; dashkv_prob(_serial): the default
# group score (summed per-head probabilities); dashkv, dashkv_serial, ...: the summed score


def _inputs(hq: int, hkv: int, d: int, n: int, bits: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    from .codes import pack_bits

    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, hkv, n, d, generator=g)
    values = torch.randn(1, hkv, n, d, generator=g)
    proj = torch.randn(d, bits, generator=g) / math.sqrt(d)
    codes = torch.empty(1, hkv, n, bits // 64, dtype=torch.int64)
    step = 1 << 15
    for s in range(0, n, step):  # chunked: never materialise an (N, b) float projection of all heads
        codes[:, :, s:s + step] = pack_bits(keys[:, :, s:s + step] @ proj > 0)
    query = torch.randn(1, hq, d, generator=g)
    q_proj = query @ proj
    return query, q_proj, keys.to(dtype), values.to(dtype), codes


def _time_round_robin(fns: dict, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def _with_row_threads(n: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) with the serial kernel's rows / heads split over n threads (1 elsewhere)."""
    from .kernels.cpu import set_row_threads

    set_row_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        set_row_threads(1)


def bench_kernel(ns=(4096, 16384, 65536, 262144), bits=(64, 128), budget=1 / 16, shapes=("smollm2", "d128"),
                 repeats: int | None = None, json_path: str | None = None, progress: bool = True,
                 threads: int = 2, sink: int = 4, window: int = 64, dtype: str = "float32") -> list[dict]:
    """Time one layer's decode attention for every (shape, N, bits); returns one dict per row.

    repeats None: 20 rounds below N = 65536, 10 above. Threads: torch and numba both get `threads`.
    """
    import numba
    import torch.nn.functional as F

    from .attention import QuantizedRows
    from .config import DashKVConfig, rerank_read_cost
    from .kernels.cpu import dashkv_decode_cpu, dense_decode_cpu, dense_decode_torch, threading_info, warmup

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    from .kernels.cpu import row_threads, set_row_threads
    saved_row_threads = row_threads()
    set_row_threads(1)  # the "1 thread" columns stay on one thread; "prob split" sets its own
    kv_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t_ready = warmup((kv_dtype,), parallel=True)
    env = threading_info()
    env.update(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), kernels_ready_s=round(t_ready, 2))
    if progress:
        print(f"# threads: torch {env['torch_threads']}, numba {env['numba_threads']} ({env['numba_layer']}); "
              f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY'] or '(default)'}; kernels ready in {t_ready:.1f} s",
              file=sys.stderr)
    rows = []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for n in ns:
            for b in bits:
                cfg = DashKVConfig(bits=b, budget=budget, sink=sink, window=window, min_context=0)
                plan = cfg.plan(n)
                query, q_proj, keys, values, codes = _inputs(hq, hkv, d, n, b, dtype=kv_dtype)
                q4 = query[:, :, None, :]
                scaling = d ** -0.5
                kw = dict(sink=plan.sink, window=plan.window, critical=plan.critical, scaling=scaling)
                temps = np.full(hq, 16.0 / b, np.float32)  # a calibrated-like logit scale (16) / b
                rr = {}
                for rb in (8, 4):  # the re-rank stage at equal reads: fewer exact rows, RERANK x candidates
                    rplan = DashKVConfig(bits=b, budget=budget, sink=sink, window=window, min_context=0,
                                         rerank=RERANK, rerank_bits=rb).plan(n, rerank_read_cost(d, keys.element_size(), rb),
                                                                             keys.element_size())
                    kq = QuantizedRows.quantize(keys, rb)
                    rr[rb] = dict(sink=rplan.sink, window=rplan.window, critical=rplan.rerank, keep=rplan.critical,
                                  keys8=(kq.q, kq.scale), scaling=scaling, prob_temps=temps)
                fns = {
                    "dashkv": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=True, **kw),
                    "dashkv_select": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, _mode=1,
                                                               parallel=True, **kw),
                    "dashkv_hamming": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes,
                                                                scorer="hamming", parallel=True, **kw),
                    "dashkv_serial": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw),
                    # the default group score (summed per-head probabilities: one scan per query head)
                    "dashkv_prob": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, parallel=True,
                                                             prob_temps=temps, **kw),
                    "dashkv_prob_serial": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes,
                                                                    prob_temps=temps, **kw),
                    # the schedule decoding uses: serial compile, a row's KV heads on `threads` threads
                    "dashkv_prob_split": lambda: _with_row_threads(threads, dashkv_decode_cpu, query, q_proj, keys,
                                                                   values, codes, prob_temps=temps, **kw),
                    "dashkv_prob_rr8": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, **rr[8]),
                    "dashkv_prob_rr4": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, **rr[4]),
                    # the bit-plane scan, on the calling thread (the schedule `generate` uses)
                    "dashkv_q8": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, query_bits=8, **kw),
                    "dashkv_q4": lambda: dashkv_decode_cpu(query, q_proj, keys, values, codes, query_bits=4, **kw),
                    "sdpa": lambda: F.scaled_dot_product_attention(q4.to(kv_dtype), keys, values, scale=scaling,
                                                                   enable_gqa=True),
                    "dense_torch": lambda: dense_decode_torch(query, keys, values, scaling),
                    "dense_numba": lambda: dense_decode_cpu(query, keys, values, scaling),
                }
                # sanity: the kernels compute attention (full budget == dense)
                ref = fns["sdpa"]()[:, :, 0].float()
                err = max(float((dense_decode_cpu(query, keys, values, scaling) - ref).abs().max()),
                          float((dense_decode_torch(query, keys, values, scaling) - ref).abs().max()))
                reps = repeats or (20 if n < 65536 else 10)
                times = _time_round_robin(fns, reps)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                best_name = min(("dense_torch", "dense_numba"), key=lambda k: med[k])
                e = keys.element_size()
                dense_bytes = 2 * n * d * hkv * e
                rows_read = plan.total if not plan.dense else n
                dash_bytes = n * (b // 8) * hkv + rows_read * 2 * d * e * hkv
                q = sorted(times["dashkv"])
                row = {
                    "shape": shape, "dtype": dtype, "hq": hq, "hkv": hkv, "d": d, "n": n, "bits": b, "budget": str(budget),
                    "tokens_read": rows_read, "sink": plan.sink, "window": plan.window, "critical": plan.critical,
                    **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                    "dashkv_attention_ms": round(med["dashkv"] - med["dashkv_select"], 4),
                    "best_dense": best_name, "best_dense_ms": round(med[best_name], 4),
                    "sdpa_over_dashkv": round(med["sdpa"] / med["dashkv"], 2),
                    "best_dense_over_dashkv": round(med[best_name] / med["dashkv"], 2),
                    "best_dense_over_dashkv_q8": round(med[best_name] / med["dashkv_q8"], 2),
                    "best_dense_over_dashkv_prob": round(med[best_name] / med["dashkv_prob"], 2),
                    "best_dense_over_dashkv_q4": round(med[best_name] / med["dashkv_q4"], 2),
                    "best_dense_over_dashkv_prob_split": round(med[best_name] / med["dashkv_prob_split"], 2),
                    "rr4_over_prob_serial": round(med["dashkv_prob_rr4"] / med["dashkv_prob_serial"], 3),
                    "dense_bytes": dense_bytes, "dashkv_bytes": dash_bytes,
                    "dashkv_gbps": round(dash_bytes / med["dashkv"] / 1e6, 2),
                    "sdpa_gbps": round(dense_bytes / med["sdpa"] / 1e6, 2),
                    "best_dense_gbps": round(dense_bytes / med[best_name] / 1e6, 2),
                    "dashkv_iqr_over_median": round((q[(3 * len(q)) // 4] - q[len(q) // 4]) / statistics.median(q), 3),
                    "dense_max_abs_err": err, "repeats": reps, **env,
                }
                rows.append(row)
                if progress:
                    print(format_table([row], header=len(rows) == 1), file=sys.stderr, flush=True)
                del query, q_proj, keys, values, codes, fns, rr
    set_row_threads(saved_row_threads)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


_COLS = [
    ("shape", "shape", "{}"), ("dtype", "K/V", "{}"), ("n", "N", "{}"), ("bits", "b", "{}"), ("tokens_read", "read", "{}"),
    ("dashkv_ms", "dashkv ms", "{:.3f}"), ("dashkv_select_ms", "scan+sel", "{:.3f}"),
    ("dashkv_attention_ms", "attn", "{:.3f}"), ("dashkv_hamming_ms", "hamming", "{:.3f}"),
    ("dashkv_serial_ms", "1 thread", "{:.3f}"), ("dashkv_q8_ms", "1 thr q8", "{:.3f}"),
    ("dashkv_q4_ms", "1 thr q4", "{:.3f}"), ("dashkv_prob_ms", "prob", "{:.3f}"),
    ("dashkv_prob_serial_ms", "1 thr prob", "{:.3f}"), ("dashkv_prob_rr8_ms", "+rr8", "{:.3f}"),
    ("dashkv_prob_rr4_ms", "+rr4", "{:.3f}"), ("dashkv_prob_split_ms", "prob split", "{:.3f}"),
    ("sdpa_ms", "sdpa ms", "{:.3f}"), ("dense_torch_ms", "mm+sm", "{:.3f}"), ("dense_numba_ms", "numba", "{:.3f}"),
    ("sdpa_over_dashkv", "sdpa/dkv", "{:.1f}x"), ("best_dense_over_dashkv", "best/dkv", "{:.1f}x"),
    ("best_dense_over_dashkv_q4", "best/q4", "{:.1f}x"), ("best_dense_over_dashkv_prob", "best/prob", "{:.1f}x"),
    ("best_dense_over_dashkv_prob_split", "best/split", "{:.1f}x"),
    ("dashkv_gbps", "dkv GB/s", "{:.1f}"), ("sdpa_gbps", "sdpa GB/s", "{:.1f}"), ("best_dense_gbps", "best GB/s", "{:.1f}"),
]


def format_table(rows: list[dict], header: bool = True) -> str:
    """Markdown table of `bench_kernel` rows."""
    lines = []
    if header:
        lines.append("| " + " | ".join(h for _, h, _ in _COLS) + " |")
        lines.append("|" + "|".join("---" for _ in _COLS) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in _COLS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m dashkv.bench ...` is `dashkv bench ...`: one parser, one set of options and help."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
