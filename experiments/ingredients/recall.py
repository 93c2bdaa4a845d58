"""What each selection ingredient buys, at equal reads (issue 10): held-out attention-mass recall and
output error of the default model with its shipped encoders.

    .venv/bin/python experiments/ingredients/recall.py --kind essays --seq-len 4096 --out DIR

Methods (one candidate set per KV head, b = 64, sinks 4, window 64; every row reads the same full K+V
rows per step, the re-rank stage's int8 keys counted at their bytes):
  oracle / oracle+pooled         exact top-k by attention probability, fixed or pooled per-head budgets
  simhash                        random hyperplanes, Hamming scan
  learned                        the shipped encoders (today's default)
  learned+pooled                 ... with per-head budgets pooled by estimated probability (since stop 24 the
                                 probability score's buckets, one map per row: the fused kernel's rule)
  learned+sum+pooled             ... pooled by the summed score's histogram (the rule before stop 24)
  learned+rerankR                ... with the int8 re-rank stage (R x the exact tier re-scored)
  learned+prob+rerankRiB[c]      ... the probability score re-ranked from a B-bit copy of the keys (prototype:
                                 levels +-(2^(B-1) - 1), one float32 scale per key, charged (d B / 8 + 4) bytes
                                 per key; "c": channels first divided by their RMS over the first half, the prefill)
  learned+rerank4+pooled
  learned+prob+rerankRiB+pooled  ... the probability score's candidates re-ranked, then the exact tier pooled over
                                 the layer's heads by the re-scored probabilities (prototype, stop 27)
  learned+prob[+rerank4]         ... ranked by the query heads' estimated probabilities summed (group_score)
  learned+prob+pooled            ... and per-head budgets pooled by those probabilities (the oracle's rule)
Rows: one JSON line per (layer, method, budget); summary.json and summary.md with the means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import torch

from dashkv.attention import QuantizedRows, sparse_decode_attention
from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences
from dashkv.capture import capture_qkv
from dashkv.config import DashKVConfig, rerank_read_cost
from dashkv.encoders import HashEncoders
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape
from dashkv.selection import DashKVPolicy, LayerState, OraclePolicy, SimHashPolicy, build_selection

METHODS = ["oracle", "oracle+pooled", "simhash", "learned", "learned+pooled", "learned+rerank2",
           "learned+rerank4", "learned+rerank8", "learned+rerank4+pooled", "learned+prob", "learned+prob+rerank4",
           "learned+prob+pooled", "learned+sum+pooled"]


class _ProbPooledPolicy(DashKVPolicy):
    """Prototype: the probability group score with pooled per-head budgets by that same estimate (the
    oracle's pooling rule, `pooled_exact_slots`, fed the estimated probabilities)."""

    def select(self, state, query, keys, plan, scaling, start):
        scores = self.probability_scores(state, query, keys.shape[1], start)
        return build_selection(scores, plan, start, None, SimpleNamespace(head_budget="pooled", adaptive=False, k_min=self.config.k_min))


class _ProbRerankPooledPolicy(DashKVPolicy):
    """Prototype: the probability score's top R x k candidates re-scored from the low-bit keys, then the
    exact tier pooled over the row's heads by those re-scored probabilities (`pooled_exact_slots`)."""

    def select(self, state, query, keys, plan, scaling, start):
        scores = self.probability_scores(state, query, keys.shape[1], start)
        scores = self.rerank_scores(state, query, scores, plan, scaling, start)
        return build_selection(scores, plan, start, None, SimpleNamespace(head_budget="pooled", adaptive=False, k_min=self.config.k_min))


def policy_for(name: str, budget: float, enc: HashEncoders, simenc: HashEncoders):
    kw = dict(bits=enc.bits, budget=budget, min_context=0)
    if name.startswith("learned+prob+rerank") and name.endswith("+pooled"):
        r = int(name.split("rerank")[1].split("+")[0].split("i")[0])
        return _ProbRerankPooledPolicy(DashKVConfig(**kw, group_score="probability", rerank=r), enc)
    if name == "learned+prob+pooled":
        return _ProbPooledPolicy(DashKVConfig(**kw, group_score="probability"), enc)
    if "pooled" in name:
        kw["head_budget"] = "pooled"
    if "sum" in name:
        kw["group_score"] = "sum"
    if "prob" in name:  # one set per KV head ranked by the summed estimated probabilities (group_score)
        kw["group_score"] = "probability"
    if "rerank" in name:
        kw["rerank"] = int(name.split("rerank")[1].split("+")[0].split("i")[0])
    cfg = DashKVConfig(**kw)
    if name.startswith("oracle"):
        return OraclePolicy(cfg)
    if name == "simhash":
        return SimHashPolicy(cfg, simenc)
    return DashKVPolicy(cfg, enc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("essays", "code"), default="essays", help="held-out text")
    p.add_argument("--seq-len", type=int, default=4096, help="held-out sequence length (tokens)")
    p.add_argument("--sequences", type=int, default=2, help="held-out sequences")
    p.add_argument("--positions", type=int, default=16, help="decode positions per sequence (later half)")
    p.add_argument("--budgets", default="1/16,1/32")
    p.add_argument("--layers", default=None, help="layers, e.g. 2-29 or 4,10,20 (default: the encoders' layers)")
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or local HF directory")
    p.add_argument("--encoders", default=None, help="encoder directory (default: the shipped ones)")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    a = p.parse_args(argv)
    methods = a.methods.split(",") if a.methods else METHODS
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model)
    shape = model_shape(model)
    enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else default_encoders(shape, 64)
    if a.layers is None:
        layers = sorted(enc.layer_ids)
    else:
        lo, _, hi = a.layers.partition("-")
        layers = list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in a.layers.split(",")]
    simenc = HashEncoders.simhash(shape.to_dict(), enc.bits, layers, seed=0)  # SimHash at the encoders' length
    src = [essays_dir()] if a.kind == "essays" else list(heldout_code_files())
    seqs = make_sequences(tok, load_texts(src), a.seq_len, a.sequences)
    positions = torch.linspace(a.seq_len // 2, a.seq_len - 1, a.positions).round().long().unique()
    t0 = time.perf_counter()
    caps = capture_qkv(model, seqs, layers, positions=positions, keep_values=True, desc="capture")
    budgets = [float(eval(b)) for b in a.budgets.split(",")]
    cost = rerank_read_cost(shape.head_dim, 4)

    def low_bits(m: str):
        """(bits, per-channel) of a method's low-bit re-rank copy, or None for the int8 one."""
        tail = m.split("rerank")[1].split("+")[0] if "rerank" in m else ""
        return (int(tail.split("i")[1].rstrip("c")), tail.endswith("c")) if "i" in tail else None
    rows = []
    with open(out / "rows.jsonl", "w") as f:
        for li in layers:
            cap = caps.pop(li)
            k_all, v_all, q_all = cap.keys.float(), cap.values.float(), cap.queries.float()
            s, hkv, _, d = k_all.shape
            hq = q_all.shape[1]
            pols = {(m, b): policy_for(m, b, enc, simenc) for m in methods for b in budgets}
            codes = {"learned": enc.encode_keys(li, k_all), "simhash": simenc.encode_keys(li, k_all)}
            k8 = QuantizedRows.quantize(k_all)
            lows = {}
            for m in methods:
                lb = low_bits(m)
                if lb and lb not in lows:
                    top = 2 ** (lb[0] - 1) - 1
                    chan = (k_all[:, :, : a.seq_len // 2].pow(2).mean(2, keepdim=True).sqrt().clamp_min(1e-6)
                            if lb[1] else torch.ones(1))  # from the first half: the prefill, before any decode position
                    kn = k_all / chan
                    sc = kn.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
                    # dequantised rows stored as float "q" with scale = the per-key scale x per-channel one
                    lows[lb] = QuantizedRows(q=torch.round(kn / sc).clamp(-top, top) * chan, scale=sc)
            acc = {}
            for pi, pos in enumerate(positions.tolist()):
                n = pos + 1
                q = q_all[:, :, pi]
                keys, vals = k_all[:, :, :n], v_all[:, :, :n]
                logits = torch.einsum("shgd,shnd->shgn", q.reshape(s, hkv, hq // hkv, d), keys) * cap.scaling
                p_true = torch.softmax(logits, -1).reshape(s, hq, n)
                o_dense = torch.einsum("shgn,shnd->shgd", p_true.reshape(s, hkv, hq // hkv, n), vals).reshape(s, hq, d)
                for (m, b), pol in pols.items():
                    c = codes["simhash" if m == "simhash" else "learned"][:, :, :n]
                    lb = low_bits(m)
                    kq = lows[lb] if lb else k8
                    state = LayerState(li, codes=c, keys8=QuantizedRows(kq.q[:, :, :n], kq.scale[:, :, :n]))
                    plan = pol.config.plan(n, (d * lb[0] / 8 + 4) / (2 * d * 4) if lb else cost)
                    sel = pol.select(state, q, keys, plan, cap.scaling, None)
                    allowed = torch.zeros(s, sel.heads, n, dtype=torch.bool).scatter_(-1, sel.indices, sel.exact)
                    allowed = allowed.repeat_interleave(hq // sel.heads, dim=1)
                    rec = (p_true * allowed).sum(-1)
                    o_sel = sparse_decode_attention(q[:, :, None], keys, vals, sel, cap.scaling)[:, :, 0]
                    err = (o_sel - o_dense).norm(dim=-1) / o_dense.norm(dim=-1).clamp_min(1e-12)
                    reads = plan.reads / n
                    acc.setdefault((m, b), []).append(torch.stack([rec.mean(), err.mean(), torch.tensor(reads)]))
            for (m, b), v in acc.items():
                t = torch.stack(v).mean(0)
                row = {"layer": li, "method": m, "budget": b, "recall": float(t[0]), "output_error": float(t[1]),
                       "reads": float(t[2])}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"layer {li} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = {}
    for m in methods:
        for b in budgets:
            rs = [r for r in rows if r["method"] == m and r["budget"] == b]
            summary[f"{m}@1/{round(1 / b)}"] = {k: round(sum(r[k] for r in rs) / len(rs), 4)
                                               for k in ("recall", "output_error", "reads")}
    meta = {"model": a.model, "encoders": a.encoders or "shipped", "kind": a.kind, "seq_len": a.seq_len, "sequences": a.sequences, "positions": positions.tolist(),
            "layers": layers, "rerank_cost": cost, "seconds": round(time.perf_counter() - t0, 1),
            "command": "experiments/ingredients/recall.py " + " ".join(argv or sys.argv[1:])}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    lines = [f"# Ingredients at equal reads: {a.model}, {a.kind}, {a.seq_len} tokens", "",
             f"`{meta['command']}` ({meta['seconds']} s, one thread)", "",
             "| method | budget | recall | output error | reads / context |", "|---|---|---:|---:|---:|"]
    for key, v in summary.items():
        m, b = key.split("@")
        lines.append(f"| {m} | {b} | {v['recall']:.4f} | {v['output_error']:.4f} | {v['reads']:.4f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
