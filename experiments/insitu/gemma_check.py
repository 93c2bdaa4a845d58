"""Stop-28 check on the second real model, Gemma-3-270M (MQA, head dim 256, 4 query heads per KV head:
the attention loop's four-head block, the folded query encoder at 256 bits, the probability score).

    .venv/bin/python experiments/insitu/gemma_check.py /work/models/gemma-3-270m-q4_k_m.gguf   # ~3 min

On a 3000-token prompt of essays: (1) the fused kernel and the torch reference path generate the same
tokens at budget 1/16 (the committed 256-bit encoders); (2) full budget generates the unmodified model's
tokens. (Speed: `dashkv bench decode --model GGUF --encoders DIR --bits 256`, docs/RESULTS.md §1.)
"""
import os
import sys
import time

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import torch

from dashkv import hf
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
import random

from dashkv.eval.haystack import fill_to_tokens
from dashkv.models import load_model

ENC = "experiments/multibit/gemma-b256-svd-L4"


def main() -> None:
    model, tok = load_model(sys.argv[1])
    enc = HashEncoders.from_pretrained(ENC)
    text = " ".join(fill_to_tokens("essays", tok, 3000, random.Random(0)))
    ids = tok(text, return_tensors="pt").input_ids
    new = 24
    kw = dict(max_new_tokens=new, do_sample=False)
    ref = model.generate(ids, **kw)
    cfg = DashKVConfig(budget=1.0, min_context=0, bits=enc.bits)
    with hf.enable(model, enc, cfg):
        full = model.generate(ids, **kw)
    print("full budget == unmodified model:", torch.equal(full, ref))
    outs = []
    for fast in (True, False):
        handle = hf.enable(model, enc, DashKVConfig(budget="1/16", min_context=0, bits=enc.bits))
        handle.fast = fast
        t = time.perf_counter()
        outs.append(model.generate(ids, **kw))
        print(f"fast={fast}: {time.perf_counter() - t:.1f} s for prefill + {new} tokens")
        hf.disable(model)
    print("fused == reference path, 1/16:", torch.equal(outs[0], outs[1]))
    print("1/16 tokens equal to full attention's:", int((outs[0][0, -new:] == ref[0, -new:]).sum()), "of", new)


if __name__ == "__main__":
    main()
