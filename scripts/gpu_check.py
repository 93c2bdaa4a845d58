#!/usr/bin/env python
"""Check and time dashkv's Triton decode step on a CUDA GPU (one script, one run).

1. compiles the kernels (`dashkv.kernels.triton_kernels`);
2. correctness against a torch reference on random inputs at several N: selected positions (exact
   match; dyadic projections make every score exact, ties go to the lower position), counts, and
   the attention output (float32 within 2e-5 / 1e-4; bf16 within 3e-2); real-valued projections
   (top-k property); both scorers, both groupings, b = 64 and 128, batch 1 and 2 with left padding,
   views of larger buffers; and a CUDA-graph capture/replay of the whole step;
3. timing (CUDA only): DASH-KV (scan + on-device top-k + sparse attention, and each part) against
   dense `torch.nn.functional.scaled_dot_product_attention` (GQA through `enable_gqa`, and with the G
   query heads folded into the query length: no K/V repeat), bf16 and fp32, at N = 4096..262144, for
   the default model's shape (9 query / 3 KV heads, d=64) and a 32/8 d=128 shape, batch 1 and 8;
4. `model.generate` with DASH-KV end to end (scripts/gpu_generate_check.py: parity at full budget,
   fused == reference at 1/16, decode tokens/s against StaticCache); --no-generate skips it.

Prints a table, writes JSON (to --out, else $OUT/gpu_check.json, else ./gpu_check.json), and exits 1
on any mismatch.

    python scripts/gpu_check.py                      # on a CUDA machine
    TRITON_INTERPRET=1 python scripts/gpu_check.py --interpret   # CPU, tiny sizes, correctness only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
import zlib

if "--interpret" in sys.argv:  # must precede the import of the kernels module
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from dashkv.kernels import triton_kernels as tk  # noqa: E402

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# reference (device-agnostic torch, float64)
# ---------------------------------------------------------------------------------------------
def unpack_signs(words: torch.Tensor) -> torch.Tensor:
    """(..., W) int64 -> (..., 64W) float64 in {-1,+1}; bit i = bit i%64 of word i//64."""
    sh = torch.arange(64, device=words.device)
    bits = (words[..., None] >> sh) & 1
    return bits.reshape(*words.shape[:-1], -1).double() * 2 - 1


def ref_scores(q_proj, codes, grouping, scorer):
    """(B, Hs, N) float64 scores."""
    B, Hq, bits = q_proj.shape
    Hkv, N = codes.shape[1], codes.shape[2]
    G = Hq // Hkv
    signs = unpack_signs(codes)  # (B, Hkv, N, b)
    q = q_proj.double().reshape(B, Hkv, G, bits)
    if scorer == "hamming":
        q = (q > 0).double() * 2 - 1  # <sign q, c> = b - 2 * hamming
    s = torch.einsum("bhnk,bhgk->bhgn", signs, q)
    return s.sum(2) if grouping == "kv_head" else s.reshape(B, Hq, N)


def ref_mask(scores, start, sink, window, critical):
    """(B, Hs, N) bool: sinks, window, top-critical candidates (stable: lower position wins ties)."""
    B, Hs, N = scores.shape
    pos = torch.arange(N, device=scores.device)
    st = torch.zeros(B, dtype=torch.long, device=scores.device) if start is None else start.clamp(0, N)
    valid = pos[None, :] >= st[:, None]
    mask = torch.zeros(B, Hs, N, dtype=torch.bool, device=scores.device)
    for b in range(B):
        s0 = int(st[b])
        if sink + window + critical >= N - s0:
            mask[b] = valid[b]
            continue
        mask[b, :, s0:s0 + sink] = True
        mask[b, :, N - window:] = True
        if critical:
            lo, hi = s0 + sink, N - window
            order = torch.sort(-scores[b, :, lo:hi], dim=-1, stable=True).indices[:, :critical]
            mask[b].scatter_(-1, lo + order, True)
    return mask


def masked_attention(query, keys, values, mask_q, scaling):
    G = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(G, dim=1)
    v = values.double().repeat_interleave(G, dim=1)
    logits = torch.einsum("bhd,bhnd->bhn", query.double(), k) * scaling
    p = torch.softmax(logits.masked_fill(~mask_q, NEG_INF), -1).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", p, v)


def idx_to_mask(idx, N):
    m = torch.zeros(*idx.shape[:2], N + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(idx >= 0, idx, torch.full_like(idx, N)), True)
    return m[..., :N]


def make_inputs(seed, B, Hq, Hkv, d, N, bits, device, dtype=torch.float32, ties=False, cap=None, dyadic=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = bits // 64
    M = cap or N
    q = torch.randn(B, Hq, d, generator=g)
    if dyadic:
        qp = torch.randint(-8, 9, (B, Hq, bits), generator=g).float() / 4
    else:
        qp = torch.randn(B, Hq, bits, generator=g)
    k = torch.randn(B, Hkv, M, d, generator=g)
    v = torch.randn(B, Hkv, M, d, generator=g)
    c = torch.randint(-2**63, 2**63 - 1, (B, Hkv, M, W), generator=g)
    if ties and N > 3:
        c[:, :, :N:3] = c[:, :, :1]
    start = None
    if B > 1:
        start = torch.randint(0, max(1, N // 3), (B,), generator=g)
        start[0] = 0
        start = start.to(device)
    t = lambda x: x.to(device)  # noqa: E731
    return (t(q).to(dtype), t(qp), t(k).to(dtype)[:, :, :N], t(v).to(dtype)[:, :, :N], t(c)[:, :, :N], start)


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
def check_case(results, name, *, device, B, Hq, Hkv, d, N, bits, grouping, scorer, impl="unpack", ties=False,
               cap=None, dtype=torch.float32, dyadic=True, budget=1 / 16, sink=4, window=64):
    rec = dict(name=name, B=B, Hq=Hq, Hkv=Hkv, d=d, N=N, bits=bits, grouping=grouping, scorer=scorer, impl=impl,
               dtype=str(dtype).replace("torch.", ""), dyadic=dyadic)
    try:
        q, qp, k, v, c, start = make_inputs(zlib.crc32(name.encode()), B, Hq, Hkv, d, N, bits, device, dtype, ties, cap,
                                            dyadic)
        critical = max(0, int(budget * N) - sink - window)
        scaling = d ** -0.5
        out, idx, counts = tk.dashkv_decode_triton(q, qp, k, v, c, sink=sink, window=window, critical=critical,
                                                   scaling=scaling, grouping=grouping, scorer=scorer, start=start,
                                                   return_indices=True, return_counts=True, _asym_impl=impl)
        scores = ref_scores(qp, c, grouping, scorer)
        want = ref_mask(scores, start, sink, window, critical)
        got = idx_to_mask(idx, N)
        G = Hq // Hkv
        gq = G if grouping == "kv_head" else 1
        ok_counts = bool(torch.equal(counts, want.sum(-1)))
        if dyadic:
            ok_sel = bool(torch.equal(got, want))
            mask_q = want.repeat_interleave(gq, dim=1)
        else:  # float summation order may flip near-ties: check the top-k property instead
            pos = torch.arange(N, device=device)
            st = torch.zeros(B, dtype=torch.long, device=device) if start is None else start
            cand = ((pos[None, :] >= st[:, None] + sink) & (pos[None, :] < N - window))[:, None, :]
            fixed_ok = torch.equal(got & ~cand, want & ~cand)
            s_in = scores.masked_fill(~(got & cand), math.inf).amin(-1)
            s_out = scores.masked_fill(~(~got & cand), -math.inf).amax(-1)
            ok_sel = bool(fixed_ok and (s_in >= s_out - 1e-4 * scores.abs().amax()).all())
            mask_q = got.repeat_interleave(gq, dim=1)
        ref = masked_attention(q, k, v, mask_q, scaling)
        err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
        tol = 2e-5 + 1e-4 * ref.abs().max().item() if dtype == torch.float32 else 3e-2
        ok_out = err <= tol
        rec.update(ok=ok_sel and ok_counts and ok_out, selection_ok=ok_sel, counts_ok=ok_counts, max_abs_err=err)
    except Exception as e:  # a crash is a mismatch too
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
    results.append(rec)
    flag = "ok " if rec["ok"] else "BAD"
    print(f"  [{flag}] {name:<58} err={rec.get('max_abs_err', float('nan')):.2e} {rec.get('error', '')}", flush=True)


def check_cuda_graph(results, device):
    """Capture the whole step in a CUDA graph, replay it on new inputs copied in place."""
    rec = dict(name="cuda_graph_capture_replay")
    try:
        B, Hq, Hkv, d, N, bits = 2, 9, 3, 64, 5000, 64
        q, qp, k, v, c, start = make_inputs(1, B, Hq, Hkv, d, N, bits, device)
        kw = dict(sink=4, window=64, critical=240, scaling=d ** -0.5, start=start)
        for _ in range(2):  # compile + warm up outside the capture
            tk.dashkv_decode_triton(q, qp, k, v, c, **kw)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            tk.dashkv_decode_triton(q, qp, k, v, c, **kw)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = tk.dashkv_decode_triton(q, qp, k, v, c, **kw)
        q2, qp2, _, _, _, _ = make_inputs(2, B, Hq, Hkv, d, N, bits, device)
        q.copy_(q2)
        qp.copy_(qp2)
        graph.replay()
        torch.cuda.synchronize()
        eager = tk.dashkv_decode_triton(q, qp, k, v, c, **kw)
        err = (static_out - eager).abs().max().item()
        rec.update(ok=err == 0.0, max_abs_err=err)
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
    results.append(rec)
    print(f"  [{'ok ' if rec['ok'] else 'BAD'}] {rec['name']:<58} {rec.get('error', '')}", flush=True)


def run_correctness(device, interpret: bool):
    results = []
    if interpret:
        shapes = [(9, 3, 64), (4, 2, 16)]
        ns = [1, 7, 150, 300]
        budget, sink, window = 0.25, 4, 16
    else:
        shapes = [(9, 3, 64), (32, 8, 128)]
        ns = [1, 100, 1000, 4096, 65536]
        budget, sink, window = 1 / 16, 4, 64
    i = 0
    for Hq, Hkv, d in shapes:
        for N in ns:
            for grouping in ("kv_head", "query_head"):
                for scorer in ("asymmetric", "hamming"):
                    i += 1
                    # vary bits, batch, implementation, buffer views and ties across the cases
                    bits = 64 if (i // 2) % 2 == 0 else 128
                    B = 1 if i % 3 == 0 else 2
                    impl = "lut" if (scorer == "asymmetric" and (i // 2) % 3 == 1) else "unpack"
                    cap = N + 37 if i % 3 == 1 else None
                    ties = i % 5 in (0, 3)
                    name = (f"{Hq}/{Hkv} d{d} N{N} B{B} b{bits} {grouping} {scorer}/{impl}"
                            f"{' view' if cap else ''}{' ties' if ties else ''}")
                    check_case(results, name, device=device, B=B, Hq=Hq, Hkv=Hkv, d=d, N=N, bits=bits,
                               grouping=grouping, scorer=scorer, impl=impl, ties=ties, cap=cap,
                               budget=budget, sink=sink, window=window)
    # real-valued projections and half-precision K/V
    Hq, Hkv, d = shapes[0]
    N = ns[-1]
    for grouping in ("kv_head", "query_head"):
        check_case(results, f"{Hq}/{Hkv} d{d} N{N} real-valued q_proj {grouping}", device=device, B=2, Hq=Hq,
                   Hkv=Hkv, d=d, N=N, bits=64, grouping=grouping, scorer="asymmetric", dyadic=False,
                   budget=budget, sink=sink, window=window)
    for dtype in (torch.bfloat16, torch.float16):
        check_case(results, f"{Hq}/{Hkv} d{d} N{N} {str(dtype)[6:]}", device=device, B=2, Hq=Hq, Hkv=Hkv, d=d,
                   N=N, bits=64, grouping="kv_head", scorer="asymmetric", dtype=dtype, budget=budget, sink=sink,
                   window=window)
    if device.type == "cuda":
        check_cuda_graph(results, device)
    return results


# ---------------------------------------------------------------------------------------------
# timing (CUDA only)
# ---------------------------------------------------------------------------------------------
def bench(fn, rep_ms, graph=True):
    """Median GPU time (ms) from CUDA events: replayed from a CUDA graph (no Python launch overhead) when
    graph=True (nan if the function cannot be captured), else eager launches (do_bench)."""
    import triton

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        except Exception:  # not capturable
            torch.cuda.synchronize()
            return float("nan")
    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def time_one(Hq, Hkv, d, B, N, dtype, bits, budget, rep_ms, device):
    import torch.nn.functional as F

    sink, window = 4, 64
    G = Hq // Hkv
    esz = torch.tensor([], dtype=dtype).element_size()
    row = dict(Hq=Hq, Hkv=Hkv, d=d, B=B, N=N, dtype=str(dtype)[6:], bits=bits, budget=budget)
    g = torch.Generator(device=device).manual_seed(N + B)
    q = torch.randn(B, Hq, d, device=device, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, d, device=device, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, d, device=device, generator=g, dtype=dtype)
    qp = torch.randn(B, Hq, bits, device=device, generator=g)
    c = torch.randint(-2**62, 2**62, (B, Hkv, N, bits // 64), device=device, generator=g)
    scaling = d ** -0.5
    critical = max(0, int(budget * N) - sink - window)
    kw = dict(sink=sink, window=window, critical=critical, scaling=scaling)
    q4 = q[:, :, None]
    qf = q.reshape(B, Hkv, G, d)
    row["sdpa_gqa_ms"] = bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scaling, enable_gqa=True),
                               rep_ms)
    row["sdpa_folded_ms"] = bench(lambda: F.scaled_dot_product_attention(qf, k, v, scale=scaling), rep_ms)
    row["dashkv_ms"] = bench(lambda: tk.dashkv_decode_triton(q, qp, k, v, c, **kw), rep_ms)
    row["dashkv_eager_ms"] = bench(lambda: tk.dashkv_decode_triton(q, qp, k, v, c, **kw), rep_ms, graph=False)
    row["dashkv_lut_ms"] = bench(lambda: tk.dashkv_decode_triton(q, qp, k, v, c, _asym_impl="lut", **kw), rep_ms)
    row["dashkv_hamming_ms"] = bench(lambda: tk.dashkv_decode_triton(q, qp, k, v, c, scorer="hamming", **kw), rep_ms)
    row["dashkv_query_head_ms"] = bench(
        lambda: tk.dashkv_decode_triton(q, qp, k, v, c, grouping="query_head", **kw), rep_ms)
    row["scan_unpack_ms"] = bench(lambda: tk.dashkv_scan_triton(qp, c, sink=sink, window=window, keys=True), rep_ms)
    row["scan_lut_ms"] = bench(lambda: tk.dashkv_scan_triton(qp, c, sink=sink, window=window, keys=True,
                                                             _asym_impl="lut"), rep_ms)
    row["scan_hamming_ms"] = bench(lambda: tk.dashkv_scan_triton(qp, c, sink=sink, window=window, keys=True,
                                                                 scorer="hamming"), rep_ms)
    keys = tk.dashkv_scan_triton(qp, c, sink=sink, window=window, keys=True)
    row["topk_ms"] = bench(lambda: torch.topk(keys, critical, dim=-1, sorted=False), rep_ms) if critical else 0.0
    idx, _ = tk.select_indices_triton(qp, c, N, sink=sink, window=window, critical=critical)
    row["attn_ms"] = bench(lambda: tk.sparse_decode_triton(q, k, v, idx, scaling), rep_ms)
    dense_best = min(row["sdpa_gqa_ms"], row["sdpa_folded_ms"])
    row["speedup_vs_best_dense"] = dense_best / row["dashkv_ms"]
    K = idx.shape[-1]
    dense_bytes = 2 * B * Hkv * N * d * esz
    dk_bytes = B * Hkv * (N * bits // 8 + 2 * 8 * N + 2 * K * d * esz)  # codes, int64 keys (w+r), K/V rows
    row.update(K=K, dense_bytes=dense_bytes, dashkv_bytes=dk_bytes, byte_ratio=dense_bytes / dk_bytes,
               dense_GBps=dense_bytes / dense_best / 1e6, dashkv_GBps=dk_bytes / row["dashkv_ms"] / 1e6)
    return row


def run_timing(device, ns, batches, dtypes, bits_list, budget, rep_ms):
    rows = []
    shapes = [(9, 3, 64), (32, 8, 128)]
    hdr = (f"{'shape':>11} {'B':>2} {'N':>7} {'dt':>5} {'b':>3} | {'sdpa':>7} {'fold':>7} | {'dashkv':>7} "
           f"{'eager':>7} {'scan':>7} {'scanL':>7} {'scanH':>7} {'topk':>7} {'attn':>7} | {'x best':>6} {'GB/s':>5}")
    print(hdr)
    print("-" * len(hdr))
    for Hq, Hkv, d in shapes:
        for B in batches:
            for dtype in dtypes:
                for N in ns:
                    for bits in bits_list:
                        lead = f"{Hq:>3}/{Hkv}/d{d:<3} {B:>2} {N:>7} {str(dtype)[6:11]:>5} {bits:>3} |"
                        try:
                            r = time_one(Hq, Hkv, d, B, N, dtype, bits, budget, rep_ms, device)
                            print(f"{lead} {r['sdpa_gqa_ms']:7.3f} {r['sdpa_folded_ms']:7.3f} | {r['dashkv_ms']:7.3f} "
                                  f"{r['dashkv_eager_ms']:7.3f} {r['scan_unpack_ms']:7.3f} {r['scan_lut_ms']:7.3f} "
                                  f"{r['scan_hamming_ms']:7.3f} {r['topk_ms']:7.3f} {r['attn_ms']:7.3f} | "
                                  f"{r['speedup_vs_best_dense']:6.2f} {r['dashkv_GBps']:5.0f}", flush=True)
                        except Exception as e:  # OOM or a failure: record it, keep going
                            r = dict(Hq=Hq, Hkv=Hkv, d=d, B=B, N=N, dtype=str(dtype)[6:], bits=bits,
                                     error=f"{type(e).__name__}: {e}"[:300])
                            print(f"{lead} {r['error'][:80]}", flush=True)
                        torch.cuda.empty_cache()
                        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny sizes, no timing")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or ./gpu_check.json)")
    ap.add_argument("--ns", default="4096,16384,65536,262144", help="context lengths to time")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--bits", default="64,128", help="code bits to time")
    ap.add_argument("--budget", type=float, default=1 / 16, help="tokens read per step / N (sinks+window+top-k)")
    ap.add_argument("--rep-ms", type=int, default=30, help="do_bench repetition time per measurement")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-generate", action="store_true", help="skip scripts/gpu_generate_check.py")
    args = ap.parse_args(argv)

    interpret = args.interpret or tk.interpreting()
    if interpret and not tk.interpreting():
        print("TRITON_INTERPRET=1 must be set before the kernels are imported", file=sys.stderr)
        return 2
    if not tk.triton_available():
        print("no CUDA device (and not --interpret): nothing to check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if interpret else "cuda")
    import triton

    report = dict(device=(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (triton interpreter)"),
                  torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  interpret=interpret, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    t0 = time.perf_counter()
    if device.type == "cuda":
        print(f"compiling kernels on {report['device']} ...", flush=True)
        report["compile_s"] = tk.warmup("cuda")
    print("correctness:", flush=True)
    report["correctness"] = run_correctness(device, interpret)
    n_bad = sum(not r["ok"] for r in report["correctness"])
    if device.type == "cuda" and not args.no_timing:
        print("\ntiming (ms, median; dashkv = scan + top-k + sparse attention; x best = best dense / dashkv):")
        report["timing"] = run_timing(device, [int(x) for x in args.ns.split(",")],
                                      [int(x) for x in args.batches.split(",")],
                                      [getattr(torch, x) for x in args.dtypes.split(",")],
                                      [int(x) for x in args.bits.split(",")], args.budget, args.rep_ms)
    if device.type == "cuda" and not args.no_generate:  # model.generate with DASH-KV end to end
        import gpu_generate_check

        print("\ngenerate end to end (scripts/gpu_generate_check.py):", flush=True)
        gen_out = os.path.join(os.environ.get("OUT") or ".", "gpu_generate_check.json")
        report["generate_ok"] = gpu_generate_check.main(["--out", gen_out]) == 0
        n_bad += not report["generate_ok"]
    report["ok"] = n_bad == 0
    report["wall_s"] = time.perf_counter() - t0
    out = args.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{len(report['correctness']) - n_bad}/{len(report['correctness'])} correctness checks passed; "
          f"{report['wall_s']:.1f} s; report: {out}")
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
