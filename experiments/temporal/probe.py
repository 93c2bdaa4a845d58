"""Issue 10, distance calibration's Δ_temporal: does the previous layer's attention help rank this layer's keys?

Held-out windows, every managed layer l with its predecessor l-1 captured; one candidate set per KV head,
fixed k = n * budget (no sinks/window: rankings only). Scores per KV head of layer l:
  learned        the shipped encoders' grouped asymmetric score s_l (today's scan)
  +prev_exact m  z(s_l) + m * z(log a_{l-1}), a_{l-1} = layer l-1's true attention averaged over its query
                 heads (an upper bound: decoding never sees all of it)
  +prev_seen m   the same with a_{l-1} known only on the tokens layer l-1 itself selected (its DASH-KV set),
                 floor elsewhere: what a decode step could carry from one layer to the next
z() standardises over the tokens of the row.

  PYTHONPATH=src python experiments/temporal/probe.py [--kind essays|code] [--seq-len N] [--encoders DIR] --out F.json

Rows here: {essays,code}-4096.json and essays-8192.json with the previous shipped (4K) set; calmix-*.json
with the set shipped from issue 10's mixed-length calibration.
"""
import argparse, json, sys, time
import torch

from dashkv.calibrate import essays_dir, heldout_code_files, load_texts, make_sequences
from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape

p = argparse.ArgumentParser()
p.add_argument("--kind", default="essays")
p.add_argument("--seq-len", type=int, default=4096)
p.add_argument("--sequences", type=int, default=2)
p.add_argument("--positions", type=int, default=16)
p.add_argument("--encoders", default=None, help="encoder directory (default: the shipped ones)")
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m")
shape = model_shape(model)
enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else default_encoders(shape, 64)
layers = sorted(enc.layer_ids)
cap_layers = sorted(set(layers) | {layers[0] - 1})
src = [essays_dir()] if a.kind == "essays" else list(heldout_code_files())
seqs = make_sequences(tok, load_texts(src), a.seq_len, a.sequences)
pos = torch.linspace(a.seq_len // 2, a.seq_len - 1, a.positions).round().long().unique()
t0 = time.perf_counter()
caps = capture_qkv(model, seqs, cap_layers, positions=pos, desc="capture")
MUS = (0.05, 0.1, 0.25, 0.5, 1.0)


def z(x):
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)


def attention(cap, pi, n):
    K, Q = cap.keys.float(), cap.queries.float()
    s, hkv, _, d = K.shape
    g = Q.shape[1] // hkv
    q = Q[:, :, pi].reshape(s, hkv, g, d)
    return torch.softmax(torch.einsum("shgd,shnd->shgn", q, K[:, :, :n]) * cap.scaling, -1)  # (s, hkv, g, n)


def learned_score(li, cap, pi, n):
    K, Q = cap.keys.float(), cap.queries.float()
    s, hkv, _, d = K.shape
    g = Q.shape[1] // hkv
    with torch.no_grad():
        sk = torch.sign(enc.project_keys(li, K[:, :, :n]))
        qp = enc.layers[str(li)].query(Q[:, :, pi:pi + 1])[:, :, 0].reshape(s, hkv, g, -1)
    return torch.einsum("shgb,shnb->shgn", qp, sk).sum(2)  # (s, hkv, n)


res = {}
for li in layers:
    cap, prev = caps[li], caps[li - 1]
    for pi, p_ in enumerate(pos.tolist()):
        n = p_ + 1
        pt = attention(cap, pi, n)
        a_prev = attention(prev, pi, n)  # (s, hkv', g', n)
        a_mean = a_prev.mean((1, 2))  # (s, n)
        lp = torch.log(a_mean + 1e-9)
        sl = learned_score(li, cap, pi, n)
        scores = {"learned": sl, "oracle": pt.sum(2)}
        for budget in (16, 32):
            k = max(1, n // budget)
            if li - 1 in enc.layer_ids:  # what layer l-1 itself read with DASH-KV at this budget
                sp = learned_score(li - 1, prev, pi, n)
                seen = torch.zeros_like(a_prev[:, :, 0]).scatter_(-1, sp.topk(k, -1).indices, 1.0).amax(1) > 0
            else:  # a dense layer before: all of it seen
                seen = torch.ones_like(a_mean, dtype=torch.bool)
            floor = lp.masked_fill(~seen, float("inf")).amin(-1, keepdim=True)
            lp_seen = torch.where(seen, lp, floor)
            for m in MUS:
                scores[f"+prev_exact {m}@1/{budget}"] = z(sl) + m * z(lp)[:, None]
                scores[f"+prev_seen {m}@1/{budget}"] = z(sl) + m * z(lp_seen)[:, None]
            for name, sc in scores.items():
                if "@" in name and not name.endswith(f"@1/{budget}"):
                    continue
                idx = sc.topk(k, -1).indices
                rec = torch.gather(pt, -1, idx[:, :, None].expand(-1, -1, pt.shape[2], -1)).sum(-1).mean()
                key = name if "@" in name else f"{name}@1/{budget}"
                res.setdefault(key, []).append(float(rec))
    print(f"layer {li} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
summary = {k: round(sum(v) / len(v), 4) for k, v in sorted(res.items())}
json.dump({"args": vars(a), "layers": layers, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)},
          open(a.out, "w"), indent=1)
print(json.dumps(summary, indent=1))
