"""Why DASH-KV misses Gemma's needles: where do the needle's tokens rank at the first answer step?

For niah samples built exactly as `dashkv eval` builds them, capture Q/K of the managed (global)
layers at the last prompt position and report per layer: the attention mass each query head puts on
the needle's tokens, and the best rank of a needle token under (a) exact attention summed over the
group (what oracle top-k selects by), (b) the learned asymmetric scan (today's DASH-KV score),
(c) the same projections unquantised, (d) each query head's own sign score.

  PYTHONPATH=src python experiments/gemma_needle/probe.py --model GGUF --encoders DIR --out F.json
"""
import argparse, json
import torch

from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.eval.runner import build_prompt_ids, _overhead
from dashkv.eval.tasks import make_sample, sample_depths
from dashkv.hf import default_encoders
from dashkv.models import load_model, model_shape

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--encoders", default=None)
p.add_argument("--task", default="niah_single_2")
p.add_argument("--length", type=int, default=4096)
p.add_argument("--samples", type=int, default=5)
p.add_argument("--out", required=True)
p.add_argument("--random", default="64,256,1024", help="random-hyperplane code lengths to compare ('' = none)")
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_model(a.model)
enc = HashEncoders.from_pretrained(a.encoders) if a.encoders else default_encoders(model_shape(model), 64)
layers = sorted(enc.layer_ids)
out = []
for i, depth in enumerate(sample_depths(10)[:a.samples]):
    inner = a.length - _overhead(tok, a.task, True, 32)
    s = make_sample(a.task, tok, inner, seed=0, index=i, depth=depth, haystack=None)
    ids = build_prompt_ids(tok, s, True)
    text = tok.decode(ids)
    nd = s.metadata["needles"][0]["text"]
    off = text.find(nd)
    t0 = len(tok.encode(text[:off], add_special_tokens=False))
    t1 = len(tok.encode(text[:off + len(nd)], add_special_tokens=False))
    cap = capture_qkv(model, [torch.tensor(ids)], layers, positions=torch.tensor([len(ids) - 1]), progress=False)
    N = len(ids)
    k = N // 16
    rec = {"sample": i, "depth": depth, "N": N, "needle_tokens": [t0, t1], "layers": {}}
    for li in layers:
        c = cap[li]
        K, Q = c.keys.float()[0], c.queries.float()[0, :, 0]          # (hkv, N, d), (hq, d)
        hkv, hq = K.shape[0], Q.shape[0]
        g = hq // hkv
        logits = torch.einsum("hgd,hnd->hgn", Q.view(hkv, g, -1), K) * c.scaling
        pr = logits.softmax(-1)                                         # (hkv, g, N)
        with torch.no_grad():
            fk = enc.project_keys(li, K[None])[0]                        # (hkv, N, b)
            fq = enc.layers[str(li)].query(Q[None, :, None])[0, :, 0]    # (hq, b)
        fq = fq.view(hkv, g, -1)
        from dashkv.codes import to_signs
        sk = to_signs(enc.encode_keys(li, K[None]))[0]                    # (hkv, N, b): the stored code's signs
        if getattr(enc, "key_levels", 1) > 1:                             # level codes: no unquantised analogue
            fk = sk
        L = {}
        L |= {"needle_mass_per_head": pr[..., t0:t1].sum(-1).flatten().tolist(),
             "needle_max_p_per_head": pr[..., t0:t1].amax(-1).flatten().tolist()}
        scores = {"oracle_sum_p": pr.sum(1),
                  "dashkv_sign": torch.einsum("hgb,hnb->hn", fq, sk),
                  "unquantised": torch.einsum("hgb,hnb->hn", fq, fk)}
        per_head_sign = torch.einsum("hgb,hnb->hgn", fq, sk)
        z = (per_head_sign - per_head_sign.mean(-1, keepdim=True)) / per_head_sign.std(-1, keepdim=True)
        scores["sign_max_z"] = z.amax(1)                                 # the group's most confident head
        gen = torch.Generator().manual_seed(li)
        for nb in [int(x) for x in a.random.split(",") if x]:                                       # random hyperplanes, asymmetric
            R = torch.randn(K.shape[-1], nb, generator=gen)
            ph = torch.einsum("hgb,hnb->hgn", (Q.view(hkv, g, -1) @ R), torch.sign(K @ R))
            scores[f"random{nb}_asym"] = ph.sum(1)
            # the per-head estimate of q.k (E[(Rq)_j sign(Rk)_j] = sqrt(2/pi) q.k/|k|), as probabilities, summed
            est = ph * K.norm(dim=-1)[:, None, :] * (torch.pi / 2) ** 0.5 / nb
            scores[f"random{nb}_asym_sum_p"] = (est * c.scaling).softmax(-1).sum(1)
            L[f"best_rank_random{nb}_per_head"] = (ph[..., None, :] > ph[..., t0:t1, None]).sum(-1).amin(-1).flatten().tolist()
        scale = enc.logit_scale(li).view(hkv, g, 1)                      # the calibrated temperatures
        pe = torch.softmax(per_head_sign / fq.shape[-1] * scale, -1)     # (hkv, g, N) estimated probabilities
        scores["sign_sum_p_calibrated"] = pe.sum(1)                      # what the oracle ranks by, estimated
        scores["sign_max_p_calibrated"] = pe.amax(1)
        prk = (-per_head_sign).argsort(-1).argsort(-1).float()           # each head's own rank of each token
        scores["per_head_rank_union"] = -prk.amin(1)                     # top-k/G of every head, interleaved
        for tau in (1.0, 2.0, 4.0):                                      # sum of per-head softmaxes of z
            scores[f"sign_sum_softmax_z{tau:g}"] = (tau * z).softmax(-1).sum(1)
        for name, sc in scores.items():
            rank = (sc[:, None, :] > sc[:, t0:t1, None]).sum(-1)        # (hkv, span): rank of each needle token
            L[f"best_rank_{name}"] = rank.amin(-1).tolist()
            L[f"in_topk_{name}"] = (rank < k).float().mean(-1).tolist()
            top = sc.topk(k, -1).indices                                  # (hkv, k)
            kept = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top, True)
            L[f"needle_kept_{name}"] = (pr[..., t0:t1] * kept[:, None, t0:t1]).sum(-1).flatten().tolist()
        rk = (per_head_sign[..., None, :] > per_head_sign[..., t0:t1, None]).sum(-1)   # (hkv, g, span)
        L["best_rank_sign_per_head"] = rk.amin(-1).flatten().tolist()
        uq = torch.einsum("hgb,hnb->hgn", fq, fk)
        L["best_rank_unquantised_per_head"] = (uq[..., None, :] > uq[..., t0:t1, None]).sum(-1).amin(-1).flatten().tolist()
        ex = (logits[..., None, :] > logits[..., t0:t1, None]).sum(-1)
        L["best_rank_exact_per_head"] = ex.amin(-1).flatten().tolist()
        rec["layers"][li] = L
        print(i, li, {kk.replace("best_rank_", "r_"): ([round(x, 3) for x in v] if isinstance(v, list) else v)
                      for kk, v in L.items() if not kk.startswith("in_topk")}, flush=True)
    out.append(rec)
json.dump({"argv": vars(a), "k": "N // 16", "rows": out}, open(a.out, "w"), indent=1)
