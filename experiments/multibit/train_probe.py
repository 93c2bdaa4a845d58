"""Issue 10 (Gemma): multi-bit key levels, trained. See probe.py for why an L-bit uniform level code is
a weighted sign code (the scan and the kernels are unchanged). Here the projections start at the
rank-m SVD fit of probe.py and are trained on the calibration windows with the list-wise KL of
`dashkv calibrate` (per query head, straight-through rounding), then ranked on held-out windows.

  PYTHONPATH=src python experiments/multibit/train_probe.py --model GGUF --encoders DIR --out F.json
"""
import argparse, json, sys, time
import torch

from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences, stdlib_package_dirs, _true_logits
from dashkv.calibrate import _psd_power
from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape

STEP = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335}

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--encoders", default=None)
p.add_argument("--kind", default="essays")
p.add_argument("--seq-len", type=int, default=4096)
p.add_argument("--sequences", type=int, default=2)
p.add_argument("--cal-sequences", type=int, default=6)
p.add_argument("--positions", type=int, default=16)
p.add_argument("--bits", type=int, default=64)
p.add_argument("--levels", default="1,2,4")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--lr", type=float, default=5e-3)
p.add_argument("--layers", default=None)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model, tok = load_model(a.model)
shape = model_shape(model)
enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else default_encoders(shape, 64)
layers = [int(x) for x in a.layers.split(",")] if a.layers else sorted(enc.layer_ids)
src = [essays_dir()] if a.kind == "essays" else list(heldout_code_files())
seqs = make_sequences(tok, load_texts(src), a.seq_len, a.sequences)
import pydoc_data.topics
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


def svd_start(cc, m, L):
    """Key weights/bias in units of the quantiser step, query weights back in q.k units."""
    K, Q = cc.keys.float(), cc.queries.float()
    hkv, d = K.shape[1], K.shape[3]
    g = Q.shape[1] // hkv
    wk, bk, wq = [], [], []
    for h in range(hkv):
        k = K[:, h, 4:].reshape(-1, d).double()
        q = Q[:, h * g:(h + 1) * g].reshape(-1, d).double()
        mu = k.mean(0)
        kc = k - mu
        a_, b_ = psd_sqrt(q.T @ q / q.shape[0]), psd_sqrt(kc.T @ kc / kc.shape[0])
        u, s, vt = torch.linalg.svd(a_ @ b_)
        pq = psd_sqrt(q.T @ q / q.shape[0], inv=True) @ u[:, :m] * s[:m].sqrt()
        pk = psd_sqrt(kc.T @ kc / kc.shape[0], inv=True) @ vt[:m].T * s[:m].sqrt()
        step = STEP[L] * (kc @ pk).std(0)
        wk.append(pk / step); bk.append(-(mu @ pk) / step)
        wq.append((pq * step).expand(g, -1, -1))
    return (torch.stack(wk).float(), torch.stack(bk).float(), torch.cat(wq).float())


def levels(z, L, soft=False):
    half = 2 ** (L - 1)
    hard = torch.clamp(torch.floor(z + half), 0, 2 ** L - 1) - (2 ** L - 1) / 2
    if not soft:
        return hard
    s = torch.clamp(z, -half, half)
    return hard + s - s.detach()


def scores(wk, bk, wq, K, Q, L, soft=False):
    """(s, Hq, P, N) <f_q(q), level(f_k(k))>."""
    s, hkv = K.shape[:2]
    hq = Q.shape[1]
    lv = levels(torch.einsum("shnd,hdm->shnm", K, wk) + bk[None, :, None], L, soft)
    qp = torch.einsum("shpd,hdm->shpm", Q, wq).reshape(s, hkv, hq // hkv, Q.shape[2], -1)
    return torch.einsum("shgpm,shnm->shgpn", qp, lv).reshape(s, hq, Q.shape[2], -1)


def train(cc, m, L, steps):
    wk, bk, wq = (t.clone().requires_grad_(True) for t in svd_start(cc, m, L))
    hq = cc.queries.shape[1]
    ls = torch.full((hq,), float(torch.tensor(cc.scaling).log()), requires_grad=True)
    opt = torch.optim.Adam([wk, bk, wq, ls], lr=a.lr)
    with torch.no_grad():
        tl, mask = _true_logits(cc, torch.arange(cc.num_sequences))
        pt = tl.softmax(-1)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        i = torch.randint(cc.num_sequences, (1,), generator=g)
        z = scores(wk, bk, wq, cc.keys[i].float(), cc.queries[i].float(), L, soft=True) * ls.exp()[None, :, None, None]
        loss = (torch.logsumexp(z.masked_fill(~mask[i], float("-inf")), -1) - (pt[i] * z.masked_fill(~mask[i], 0)).sum(-1)).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return wk.detach(), bk.detach(), wq.detach()


res = {}
for li in layers:
    cap, cc = caps.pop(li), ccaps.pop(li)
    K, Q = cap.keys.float(), cap.queries.float()
    s, hkv, N, d = K.shape
    hq = Q.shape[1]
    g = hq // hkv
    with torch.no_grad():
        fq = enc.layers[str(li)].query(Q)
        sk_learned = torch.sign(enc.project_keys(li, K))
    variants = {}
    for L in [int(x) for x in a.levels.split(",")]:
        m = a.bits // L
        if m > d:
            continue
        variants[f"svd_m{m}_L{L}"] = svd_start(cc, m, L)
        t1 = time.perf_counter()
        variants[f"trained_m{m}_L{L}"] = train(cc, m, L, a.steps)
        print(f"layer {li} L{L} trained in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    with torch.no_grad():
        per_var = {name: (scores(*w, K, Q, int(name.split("_L")[1])), ) for name, w in variants.items()}
    for pi, p_ in enumerate(pos.tolist()):
        n = p_ + 1
        q = Q[:, :, pi].reshape(s, hkv, g, d)
        pt = torch.softmax(torch.einsum("shgd,shnd->shgn", q, K[:, :, :n]) * cap.scaling, -1)
        qp = fq[:, :, pi].reshape(s, hkv, g, -1)
        sc = {"learned_sign": torch.einsum("shgb,shnb->shgn", qp, sk_learned[:, :, :n]).sum(2), "oracle": pt.sum(2)}
        for name, (full,) in per_var.items():
            per = full[:, :, pi, :n].reshape(s, hkv, g, n)
            sc[name] = per.sum(2)
        for budget in (16, 32):
            k = max(1, n // budget)
            for mname, v in sc.items():
                idx = v.topk(k, -1).indices
                rec = torch.gather(pt, -1, idx[:, :, None].expand(-1, -1, g, -1)).sum(-1).mean()
                res.setdefault(f"{mname}@1/{budget}", []).append(float(rec))
    print(f"layer {li} ({time.perf_counter() - t0:.0f} s)", {k: round(sum(v) / len(v), 4) for k, v in res.items() if "1/16" in k}, file=sys.stderr, flush=True)
summary = {k: round(sum(v) / len(v), 4) for k, v in res.items()}
json.dump({"args": vars(a), "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}, open(a.out, "w"), indent=1)
for k_, v in sorted(summary.items()):
    print(f"{k_:32s} {v}")
