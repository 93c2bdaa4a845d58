"""Prototype (issue 10): product-quantised key codes against the shipped sign codes, at the same 64 bits.

    .venv/bin/python experiments/pq/recall_pq.py --kind essays --seq-len 4096 --layers 4,10,16,22,28 --out DIR

Each key (post-RoPE, per layer and KV head) is cut into b/8 sub-vectors and each is replaced by the index
of its nearest of 256 centroids (one byte): b bits per key, scanned with b/8 table look-ups per key exactly
like the asymmetric scorer (the query's inner product with each centroid is the table). Codebooks are fitted
by k-means on keys the model produces on the calibration text (licences, pydoc topics, stdlib packages),
never on the held-out text. Variants:
  pq        sub-vectors of raw keys, each holding whole RoPE pairs (dims i and i + d/2)
  pqw       keys first mapped by C^(1/2), C the layer's query covariance per KV head (queries by C^(-1/2)),
            so that k-means minimises the expected error of q.k, not of k; eigen-directions dealt round-robin
            to the sub-vectors so each holds a share of the variance
  pqwo      pqw, then an OPQ rotation R of the mapped space (Ge et al. 2013, non-parametric: alternate
            k-means and the Procrustes rotation that best maps the keys onto their reconstructions);
            keys T k -> R^T T k, queries R^T T^-T q, so q.k is still unchanged
Scores: each query head's q.k_hat x scaling, softmax, summed over the KV head's query heads (the probability
group score without a temperature: the reconstruction estimates the logit itself). Selection, sinks 4,
window 64, budgets and recall exactly as experiments/ingredients/recall.py.
"""
from __future__ import annotations

import argparse, json, sys, time
from pathlib import Path

import torch

from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences, stdlib_package_dirs
from dashkv.capture import capture_qkv
from dashkv.config import DashKVConfig
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape
from dashkv.selection import DashKVPolicy, LayerState, OraclePolicy, build_selection


def kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """(k, m) centroids of x (n, m), k-means++-lite start (random rows), Lloyd iterations."""
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
        a = d.argmin(1)
        s = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).to(x.dtype)[:, None]
        empty = cnt[:, 0] == 0
        c = torch.where(empty[:, None], x[torch.randint(0, x.shape[0], (k,), generator=g)], s / cnt.clamp_min(1))
    return c


def assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((c * c).sum(1)[None] - 2 * x @ c.T).argmin(1)


def kmeans_from(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations from given centroids (OPQ's warm start); an emptied cluster keeps its centroid."""
    for _ in range(iters):
        a = assign(x, c)
        s = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=c.shape[0]).to(x.dtype)[:, None]
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)
    return c


class PQ:
    """Per KV head: a d x d map T (keys k -> T k, queries q -> T^-T q), sub-vector dims, codebooks."""

    def __init__(self, keys: torch.Tensor, queries: torch.Tensor, nsub: int, whiten: bool, iters: int, seed: int,
                 opq: int = 0):
        hkv, n, d = keys.shape
        g = torch.Generator().manual_seed(seed)
        self.T, self.Tq, self.dims, self.books = [], [], [], []
        for h in range(hkv):
            k = keys[h].double()
            if whiten:
                qh = queries[h].double()  # (nq, d): this KV head's query heads' queries
                cov = qh.T @ qh / qh.shape[0]
                ev, vec = torch.linalg.eigh(cov)
                ev = ev.clamp_min(ev.max() * 1e-6)
                T = (vec * ev.sqrt()).T          # k' = T k = diag(sqrt ev) V^T k
                Tq = (vec / ev.sqrt()).T          # q' = Tq q:  q'.k' = q.k
                order = torch.argsort(ev, descending=True)
                dims = [order[j::nsub] for j in range(nsub)]  # round-robin of the eigen-directions
            else:
                T = Tq = torch.eye(d, dtype=torch.float64)
                half, per = d // 2, d // (2 * nsub)
                dims = [torch.cat([torch.arange(j * per, (j + 1) * per), half + torch.arange(j * per, (j + 1) * per)])
                        for j in range(nsub)]
            if opq:
                perm = torch.cat(dims)  # make the sub-spaces contiguous, then rotate the whole space
                T, Tq = T[perm], Tq[perm]
                dims = [torch.arange(j * (d // nsub), (j + 1) * (d // nsub)) for j in range(nsub)]
                x = (k @ T.T).float()
                R = torch.eye(d)
                books = [kmeans(x[:, dd], 256, 4, g) for dd in dims]
                for _ in range(opq):
                    xr = x @ R
                    books = [kmeans_from(xr[:, dd], b, 2) for dd, b in zip(dims, books)]
                    y = torch.cat([b[assign(xr[:, dd], b)] for dd, b in zip(dims, books)], 1)
                    u, _, vh = torch.linalg.svd(x.double().T @ y.double())
                    R = (u @ vh).float()
                T, Tq = (R.double().T @ T), (R.double().T @ Tq)
            kt = (k @ T.T).float()
            self.T.append(T.float()); self.Tq.append(Tq.float()); self.dims.append(dims)
            self.books.append([kmeans(kt[:, dd], 256, iters, g) for dd in dims])

    def reconstruct(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (S, Hkv, N, d) -> k_hat in the transformed space (S, Hkv, N, d)."""
        out = torch.empty_like(keys)
        for h in range(keys.shape[1]):
            kt = keys[:, h] @ self.T[h].T
            rec = torch.empty_like(kt)
            for dd, book in zip(self.dims[h], self.books[h]):
                sub = kt[..., dd]
                dist = (sub * sub).sum(-1, keepdim=True) - 2 * sub @ book.T + (book * book).sum(1)
                rec[..., dd] = book[dist.argmin(-1)]
            out[:, h] = rec
        return out

    def query(self, q: torch.Tensor, hkv: int) -> torch.Tensor:
        s, hq, d = q.shape
        qg = q.reshape(s, hkv, hq // hkv, d)
        return torch.stack([qg[:, h] @ self.Tq[h].T for h in range(hkv)], 1).reshape(s, hq, d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("essays", "code"), default="essays")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--cal-seq-len", type=int, default=4096)
    p.add_argument("--cal-sequences", type=int, default=3)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--layers", default="4,10,16,22,28")
    p.add_argument("--variants", default="pq,pqw")
    p.add_argument("--opq-iters", type=int, default=10, help="outer OPQ iterations of the pqwo variant")
    p.add_argument("--budgets", default="1/16,1/32")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--encoders", default=None, help="sign-code encoders to compare with (default: the shipped ones)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model)
    shape = model_shape(model)
    from dashkv.encoders import HashEncoders
    enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else (
        default_encoders(shape, 64) if a.model == "smollm2-135m" else None)
    layers = [int(x) for x in a.layers.split(",")]
    import tempfile, subprocess
    topics = Path(tempfile.mkdtemp()) / "topics.txt"
    from pydoc_data.topics import topics as tp
    topics.write_text("\n\n".join(tp[k] for k in sorted(tp)))
    cal_src = [Path("/usr/share/common-licenses"), topics, *stdlib_package_dirs()]
    cal = make_sequences(tok, load_texts(cal_src), a.cal_seq_len, a.cal_sequences)
    t0 = time.perf_counter()
    calcap = capture_qkv(model, cal, layers, queries_per_seq=256, query_from=0.0, desc="calibration capture")
    src = [essays_dir()] if a.kind == "essays" else list(heldout_code_files())
    seqs = make_sequences(tok, load_texts(src), a.seq_len, a.sequences)
    positions = torch.linspace(a.seq_len // 2, a.seq_len - 1, a.positions).round().long().unique()
    caps = capture_qkv(model, seqs, layers, positions=positions, keep_values=True, desc="held-out capture")
    budgets = [float(eval(b)) for b in a.budgets.split(",")]
    variants = a.variants.split(",")
    nsub = a.bits // 8
    rows = []
    f = open(out / "rows.jsonl", "w")
    for li in layers:
        cc = calcap.pop(li)
        s, hkv, n_, d = cc.keys.shape
        hq = cc.queries.shape[1]
        ck = cc.keys.float().permute(1, 0, 2, 3).reshape(hkv, -1, d)
        cq = cc.queries.float().reshape(s, hkv, hq // hkv, -1, d).permute(1, 0, 2, 3, 4).reshape(hkv, -1, d)
        pqs = {v: PQ(ck, cq, nsub, v in ("pqw", "pqwo"), a.iters, 0, a.opq_iters if v == "pqwo" else 0)
               for v in variants}
        cap = caps.pop(li)
        k_all, v_all, q_all = cap.keys.float(), cap.values.float(), cap.queries.float()
        recs = {v: pq.reconstruct(k_all) for v, pq in pqs.items()}
        codes = enc.encode_keys(li, k_all) if enc is not None else None
        acc = {}
        for pi, pos in enumerate(positions.tolist()):
            n = pos + 1
            q = q_all[:, :, pi]
            keys, vals = k_all[:, :, :n], v_all[:, :, :n]
            logits = torch.einsum("shgd,shnd->shgn", q.reshape(s := q.shape[0], hkv, hq // hkv, d), keys) * cap.scaling
            p_true = torch.softmax(logits, -1)
            o_dense = torch.einsum("shgn,shnd->shgd", p_true, vals).reshape(s, hq, d)
            p_true = p_true.reshape(s, hq, n)
            for b in budgets:
                cfg = DashKVConfig(bits=enc.bits if enc is not None else 64, budget=b, min_context=0, group_score="probability")
                plan = cfg.plan(n)
                cand = {"oracle": torch.softmax(logits, -1).sum(2)}
                if codes is not None:
                    pol = DashKVPolicy(cfg, enc)
                    cand["learned+prob"] = pol.probability_scores(LayerState(li, codes=codes[:, :, :n]), q, hkv)
                for v, pq in pqs.items():
                    qt = pq.query(q, hkv).reshape(s, hkv, hq // hkv, d)
                    est = torch.einsum("shgd,shnd->shgn", qt, recs[v][:, :, :n]) * cap.scaling
                    cand[v] = torch.softmax(est, -1).sum(2)
                for m, sc in cand.items():
                    sel = build_selection(sc, plan, None, None, cfg)
                    allowed = torch.zeros(s, sel.heads, n, dtype=torch.bool).scatter_(-1, sel.indices, sel.exact)
                    allowed = allowed.repeat_interleave(hq // sel.heads, dim=1)
                    rec = (p_true * allowed).sum(-1).mean()
                    pm = (torch.softmax(logits, -1).reshape(s, hq, n) * allowed)
                    o_sel = torch.einsum("shn,shnd->shd", pm / pm.sum(-1, keepdim=True),
                                         vals.repeat_interleave(hq // hkv, 1))
                    err = ((o_sel - o_dense).norm(dim=-1) / o_dense.norm(dim=-1).clamp_min(1e-12)).mean()
                    acc.setdefault((m, b), []).append(torch.stack([rec, err]))
        for (m, b), v in acc.items():
            t = torch.stack(v).mean(0)
            row = {"layer": li, "method": m, "budget": b, "recall": round(float(t[0]), 5), "output_error": round(float(t[1]), 5)}
            rows.append(row); f.write(json.dumps(row) + "\n"); f.flush()
        print(f"layer {li} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
            f"{r['method']}@{r['budget']:.4f} {r['recall']:.3f}" for r in rows if r["layer"] == li), file=sys.stderr)
    summary = {}
    for (m, b) in {(r["method"], r["budget"]) for r in rows}:
        rs = [r for r in rows if r["method"] == m and r["budget"] == b]
        summary[f"{m}@1/{round(1 / b)}"] = {k: round(sum(r[k] for r in rs) / len(rs), 4) for k in ("recall", "output_error")}
    meta = {"command": "experiments/pq/recall_pq.py " + " ".join(argv or sys.argv[1:]), "seconds": round(time.perf_counter() - t0)}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": dict(sorted(summary.items()))}, indent=1) + "\n")
    for k, v in sorted(summary.items()):
        print(f"{k:24s} {v['recall']:.4f} {v['output_error']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
