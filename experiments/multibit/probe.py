"""Issue 10 (Gemma): spend a key's b bits on fewer directions at more bits each?

A uniform L-bit quantiser of a key's projection is itself a sign code with weighted bits: with offset
binary levels v = sum_t 2^t bit_t in [0, 2^L), the level (v - (2^L - 1)/2) * step equals
step * sum_t 2^(t-1) * s_t, s_t = 2 bit_t - 1 in {-1, +1}. So an asymmetric score against L-bit keys is
the asymmetric sign-code score with the query projection expanded to b = m * L weights: the scan, the
codes' layout and the kernels do not change, only the key encoder's non-linearity does.

This probe measures the ranking it gives, fitted on calibration windows (licence texts + Python docs +
stdlib sources, as `dashkv calibrate`'s defaults), scored on held-out windows. Projections:
  qpca  top-m directions of the KV head's queries (uncentred second moment)
  svd   the rank-m truncation of Sigma_q^1/2 Sigma_k^1/2 (the best rank-m bilinear form in mean square)
Keys are centred (a per-query constant: the ranking does not change) and each projected direction is
quantised with the Gaussian-optimal uniform step for its spread. One set per KV head (scores summed over
the group), fixed k = n * budget, no sinks/window: a comparison of rankings only. Also the learned
encoders' sign scan and exact top-k, for reference.

  PYTHONPATH=src python experiments/multibit/probe.py --model GGUF --encoders DIR --out F.json
"""
import argparse, json, math, sys, time
import torch

from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences, stdlib_package_dirs
from dashkv.calibrate import _psd_power
from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape

STEP = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335, 8: 0.0284 * 1.0}  # Gaussian-optimal uniform step / sigma (L=1: 2*0.798)

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--encoders", default=None)
p.add_argument("--kind", default="essays")
p.add_argument("--seq-len", type=int, default=4096)
p.add_argument("--sequences", type=int, default=2)
p.add_argument("--cal-sequences", type=int, default=4)
p.add_argument("--positions", type=int, default=16)
p.add_argument("--bits", type=int, default=64)
p.add_argument("--layers", default=None)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_model(a.model)
shape = model_shape(model)
enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else default_encoders(shape, 64)
layers = [int(x) for x in a.layers.split(",")] if a.layers else sorted(enc.layer_ids)
src = [essays_dir()] if a.kind == "essays" else list(heldout_code_files())
seqs = make_sequences(tok, load_texts(src), a.seq_len, a.sequences)
import pydoc_data.topics  # noqa: F401  (its file is a text source like the CLI's)
cal_src = ["/usr/share/common-licenses", pydoc_data.topics.__file__, *stdlib_package_dirs()]
cal = make_sequences(tok, load_texts(cal_src), a.seq_len, a.cal_sequences)
pos = torch.linspace(a.seq_len // 2, a.seq_len - 1, a.positions).round().long().unique()
cal_pos = torch.linspace(64, a.seq_len - 1, 64).round().long().unique()
t0 = time.perf_counter()
caps = capture_qkv(model, seqs, layers, positions=pos, desc="capture held-out")
ccaps = capture_qkv(model, cal, layers, positions=cal_pos, desc="capture calibration")


def psd_sqrt(m, inv=False):
    """S^1/2 (or S^-1/2) of a PSD matrix, eigenvalues floored: the package's `_psd_power`."""
    return _psd_power(m, -0.5 if inv else 0.5)


def fit(ck, cq, m, kind):
    """Per KV head: (P_k (d, m), P_q (g, d, m)... shared over the group: P_q (d, m)), key mean (d,)."""
    hkv, d = ck.shape[1], ck.shape[3]
    out = []
    for h in range(hkv):
        k = ck[:, h, 4:].reshape(-1, d).double()
        g = cq.shape[1] // hkv
        q = cq[:, h * g:(h + 1) * g].reshape(-1, d).double()
        mu = k.mean(0)
        kc = k - mu
        sk = kc.T @ kc / kc.shape[0]
        sq = q.T @ q / q.shape[0]
        if kind == "qpca":
            v = torch.linalg.eigh(sq).eigenvectors.flip(-1)[:, :m]
            pk, pq = v, v
        else:  # svd of Sq^1/2 Sk^1/2: q^T A k with A = Sq^-1/2 U S V^T Sk^-1/2
            a_, b_ = psd_sqrt(sq), psd_sqrt(sk)
            u, s, vt = torch.linalg.svd(a_ @ b_)
            pq = psd_sqrt(sq, inv=True) @ u[:, :m] * s[:m].sqrt()
            pk = psd_sqrt(sk, inv=True) @ vt[:m].T * s[:m].sqrt()
        zk = kc @ pk
        sig = zk.std(0).clamp_min(1e-9)
        out.append((pk.float(), pq.float(), mu.float(), sig.float()))
    return out


def quantise(z, sig, L):
    """Uniform L-bit quantiser, levels (v - (2^L-1)/2) * step, step = STEP[L] * sigma per direction."""
    step = STEP[L] * sig
    top = 2 ** L - 1
    v = torch.clamp(torch.floor(z / step + 2 ** (L - 1)), 0, top)
    return (v - top / 2) * step


res = {}
for li in layers:
    cap, cc = caps.pop(li), ccaps.pop(li)
    K, Q = cap.keys.float(), cap.queries.float()
    s, hkv, N, d = K.shape
    hq = Q.shape[1]
    g = hq // hkv
    with torch.no_grad():
        fk = enc.project_keys(li, K)
        fq = enc.layers[str(li)].query(Q)
    sk_learned = torch.sign(fk)
    variants = {}
    for kind in ("qpca", "svd"):
        for L in (1, 2, 4):
            m = a.bits // L
            if m > d:
                continue
            fits = fit(cc.keys.float(), cc.queries.float(), m, kind)
            kq = torch.stack([quantise((K[:, h] - f[2]) @ f[0], f[3], L) for h, f in enumerate(fits)], 1)
            variants[f"{kind}_m{m}_L{L}"] = (fits, kq)
        fits = fit(cc.keys.float(), cc.queries.float(), min(a.bits, d), kind)
        variants[f"{kind}_m{min(a.bits, d)}_exact"] = (fits, torch.stack([(K[:, h] - f[2]) @ f[0] for h, f in enumerate(fits)], 1))
    for pi, p_ in enumerate(pos.tolist()):
        n = p_ + 1
        q = Q[:, :, pi].reshape(s, hkv, g, d)
        logits = torch.einsum("shgd,shnd->shgn", q, K[:, :, :n]) * cap.scaling
        pt = torch.softmax(logits, -1)
        qp = fq[:, :, pi].reshape(s, hkv, g, -1)
        scores = {"learned_sign": torch.einsum("shgb,shnb->shgn", qp, sk_learned[:, :, :n]).sum(2),
                  "oracle": pt.sum(2)}
        for name, (fits, kq) in variants.items():
            per = torch.stack([torch.einsum("sgd,dm,snm->sgn", q[:, h], f[1], kq[:, h, :n]) for h, f in enumerate(fits)], 1)
            scores[name] = per.sum(2)
            scores[name + "_sum_p"] = torch.softmax(per * cap.scaling, -1).sum(2)
        for budget in (16, 32):
            k = max(1, n // budget)
            for mname, sc in scores.items():
                idx = sc.topk(k, -1).indices
                rec = torch.gather(pt, -1, idx[:, :, None].expand(-1, -1, g, -1)).sum(-1).mean()
                res.setdefault(f"{mname}@1/{budget}", []).append(float(rec))
    print(f"layer {li} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
summary = {k: round(sum(v) / len(v), 4) for k, v in res.items()}
json.dump({"args": vars(a), "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}, open(a.out, "w"), indent=1)
for k_, v in sorted(summary.items()):
    print(f"{k_:32s} {v}")
