"""Issue 10 lead: does a per-key magnitude stored beside the sign code rank better?

Score variants of the learned asymmetric scan, one candidate set per KV head, fixed k = n * budget,
held-out windows, decode positions over the later half; recall = true attention mass inside the set
(no sinks/window: a relative comparison of rankings only):
  sign        <f_q(q), sign f_k(k)> summed over the group (today's scan)
  l1          alpha_k * sign-score, alpha_k = mean |f_k(k)| (the least-squares scale of a 1-bit code)
  exact_proj  <f_q(q), f_k(k)> (no quantisation: what the encoders could give at full precision)
  oracle      exact top-k by summed true probability

  PYTHONPATH=src python experiments/keyscale/probe.py --model M [--encoders DIR] --kind essays --out F.json
"""
import argparse, json, sys, time
import torch

from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences
from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--encoders", default=None)
p.add_argument("--kind", default="essays")
p.add_argument("--seq-len", type=int, default=4096)
p.add_argument("--sequences", type=int, default=2)
p.add_argument("--positions", type=int, default=16)
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
pos = torch.linspace(a.seq_len // 2, a.seq_len - 1, a.positions).round().long().unique()
t0 = time.perf_counter()
caps = capture_qkv(model, seqs, layers, positions=pos, desc="capture")
res = {}
for li in layers:
    cap = caps.pop(li)
    K, Q = cap.keys.float(), cap.queries.float()
    s, hkv, N, d = K.shape
    hq = Q.shape[1]
    g = hq // hkv
    with torch.no_grad():
        fk = enc.project_keys(li, K)                      # (s, hkv, N, b)
        fq = enc.layers[str(li)].query(Q)                 # (s, hq, P, b)
    sk = torch.sign(fk)
    alpha = fk.abs().mean(-1, keepdim=True)
    b = fk.shape[-1]
    mu = K.mean((0, 2), keepdim=True)                     # (1, hkv, 1, d)
    Kc = (K - mu).transpose(0, 1).reshape(hkv, -1, d)
    ev = torch.linalg.eigh(Kc.transpose(1, 2) @ Kc).eigenvectors[..., -b:]   # (hkv, d, b): top-b key PCA
    Qg = Q.transpose(0, 1).reshape(hkv, g, -1, d).reshape(hkv, -1, d)
    evq = torch.linalg.eigh(Qg.transpose(1, 2) @ Qg).eigenvectors[..., -b:]  # top-b query PCA
    pk = torch.einsum("shnd,hdb->shnb", K - mu, ev)
    pkq = torch.einsum("shnd,hdb->shnb", K - mu, evq)
    for pi, p_ in enumerate(pos.tolist()):
        n = p_ + 1
        q = Q[:, :, pi].reshape(s, hkv, g, d)
        logits = torch.einsum("shgd,shnd->shgn", q, K[:, :, :n]) * cap.scaling
        pt = torch.softmax(logits, -1)                    # (s, hkv, g, n)
        qp = fq[:, :, pi].reshape(s, hkv, g, -1)
        sc_sign = torch.einsum("shgb,shnb->shgn", qp, sk[:, :, :n]).sum(2)
        scores = {"sign": sc_sign, "l1": sc_sign * alpha[:, :, :n, 0],
                  "exact_proj": torch.einsum("shgb,shnb->shgn", qp, fk[:, :, :n]).sum(2),
                  "oracle": pt.sum(2),
                  "pca_k_exact": torch.einsum("shgd,hdb,shnb->shgn", q, ev, pk[:, :, :n]).sum(2),
                  "pca_k_sign": torch.einsum("shgd,hdb,shnb->shgn", q, ev, torch.sign(pk[:, :, :n])).sum(2),
                  "pca_q_exact": torch.einsum("shgd,hdb,shnb->shgn", q, evq, pkq[:, :, :n]).sum(2),
                  "pca_q_sign": torch.einsum("shgd,hdb,shnb->shgn", q, evq, torch.sign(pkq[:, :, :n])).sum(2)}
        for budget in (16, 32):
            k = max(1, n // budget)
            for m, sc in scores.items():
                idx = sc.topk(k, -1).indices                # (s, hkv, k)
                rec = torch.gather(pt, -1, idx[:, :, None].expand(-1, -1, g, -1)).sum(-1).mean()
                res.setdefault(f"{m}@1/{budget}", []).append(float(rec))
    print(f"layer {li} ({time.perf_counter() - t0:.0f} s)", {k: round(sum(v) / len(v), 4) for k, v in res.items()}, file=sys.stderr, flush=True)
summary = {k: round(sum(v) / len(v), 4) for k, v in res.items()}
json.dump({"args": vars(a), "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}, open(a.out, "w"), indent=1)
print(json.dumps(summary, indent=1))
