#!/usr/bin/env python
"""fp32 vs bf16 prefill at 4K on the default model, one thread: time and whether fidelity/answers change."""
import json, sys, os
import torch
torch.set_num_threads(1)
torch.set_grad_enabled(False)
import dashkv
from dashkv.config import DashKVConfig
from dashkv.eval.fidelity import make_fidelity_documents, compare_logprobs
from dashkv.eval.runner import prefill_once, decode_method, _encoders_for, EvalPlan, build_prompt_ids, _overhead, stop_ids
from dashkv.eval.tasks import make_sample
from pathlib import Path
model, tok = dashkv.load_model("smollm2-135m")
plan = EvalPlan(model="smollm2-135m", encoders=None, methods=["dense", "dashkv", "snapkv"], budgets=[1/16], tasks=[],
                lengths=[4096], samples=1, haystack=None, out=Path("/tmp/dashkv-bf16-check"))
enc = _encoders_for(plan, model)
out = {"load": os.getloadavg()}
POS = 64
for kind in ("prose", "code"):
    doc = make_fidelity_documents(tok, kind, 4096, 1, seed=0, positions=POS)[0]
    res = {}
    for dt in ("fp32", "bf16"):
        pre = prefill_once(model, doc.context_ids, ["dense", "dashkv", "snapkv"], dtype=dt)
        lps = {}
        for m in ("dense", "dashkv", "snapkv"):
            cfg = DashKVConfig(budget=1.0 if m == "dense" else 1/16)
            r, _ = decode_method(model, pre, m, cfg, enc.get(m), targets=doc.target_ids, logprobs=True)
            lps[m] = r.logprobs
        res[dt] = (pre.seconds, lps)
        print(kind, dt, "prefill s", round(pre.seconds, 2), flush=True)
    d32, d16 = res["fp32"][1]["dense"], res["bf16"][1]["dense"]
    st = compare_logprobs(d32, d16, doc.target_ids)
    row = {"kind": kind, "prefill_s_fp32": res["fp32"][0], "prefill_s_bf16": res["bf16"][0],
           "dense_bf16_vs_fp32_agree": st.agreement, "dense_bf16_vs_fp32_kl": st.kl}
    for m in ("dashkv", "snapkv"):
        a = compare_logprobs(d32, res["fp32"][1][m], doc.target_ids)
        b = compare_logprobs(d16, res["bf16"][1][m], doc.target_ids)
        row[m] = {"fp32": [a.agree, round(a.kl, 5)], "bf16": [b.agree, round(b.kl, 5)]}
    out[kind] = row
    print(json.dumps(row), flush=True)
# answers: niah_single_1 at 4K, 3 samples, dense + dashkv
stop = stop_ids(tok, model)
ans = []
for i, depth in enumerate([0.0, 0.5, 1.0]):
    inner = 4096 - _overhead(tok, "niah_single_1", True, 14)
    s = make_sample("niah_single_1", tok, inner, seed=0, index=i, depth=depth)
    ids = build_prompt_ids(tok, s, True)
    for dt in ("fp32", "bf16"):
        pre = prefill_once(model, ids, ["dense", "dashkv"], dtype=dt)
        for m in ("dense", "dashkv"):
            cfg = DashKVConfig(budget=1.0 if m == "dense" else 1/16)
            r, _ = decode_method(model, pre, m, cfg, enc.get(m), max_new_tokens=14, stop_ids=stop, tokenizer=tok, newline_stop=True)
            ans.append([i, dt, m, tok.decode(r.tokens), s.answers, round(pre.seconds, 2)])
            print(ans[-1], flush=True)
out["niah"] = ans
out["load_end"] = os.getloadavg()
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "bf16_check.json", "w"), indent=1)
