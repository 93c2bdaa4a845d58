"""Copy-augmented calibration: does calibration text with retrieval in it keep retrieval heads' matches?

Ordinary calibration text rarely makes a head retrieve a distant exact match, so the learned projection
keeps the directions of diffuse attention and drops those a retrieval head matches on (docs/
calibration.md, "Why Gemma misses its needles"). Here each calibration window gets `--copies` spans of
`--span` tokens taken from its first half and written again at random places of its second half (where
the decode queries are drawn), so a share of the training queries are copy / lookup events. Same
corpus, windows, steps and defaults as the CLI's `dashkv calibrate` otherwise.

  PYTHONPATH=src python experiments/copyaug/calibrate.py --model GGUF --out DIR [--copies 16 --span 32]
"""
import argparse, json, random, sys
from pathlib import Path

import torch

from dashkv.calibrate import calibrate, load_texts, make_sequences, save_encoders, stdlib_package_dirs
from dashkv.models import load_model

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--text", nargs="+", default=None, help="default: the CLI's corpus (licenses, python docs, stdlib)")
p.add_argument("--out", required=True)
p.add_argument("--seq-len", type=int, default=4096)
p.add_argument("--sequences", type=int, default=12)
p.add_argument("--copies", type=int, default=16)
p.add_argument("--span", type=int, default=32)
p.add_argument("--bits", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_model(a.model)
text = a.text or ["/usr/share/common-licenses", "/tmp/python-doc-topics.txt", *map(str, stdlib_package_dirs())]
seqs = make_sequences(tok, load_texts(text), a.seq_len, a.sequences)
rng = random.Random(a.seed)
half = a.seq_len // 2
aug = []
for row in seqs.tolist():
    for _ in range(a.copies):
        s = rng.randrange(0, half - a.span)
        d = rng.randrange(half, a.seq_len - a.span)
        row[d:d + a.span] = row[s:s + a.span]
    aug.append(row)
log = {}
enc = calibrate(model, tok, aug, bits=a.bits, seq_len=a.seq_len, num_sequences=a.sequences, seed=a.seed,
                model_name=a.model, log=log)
enc.meta.update({"copy_augmentation": {"copies": a.copies, "span": a.span, "text": text}})
save_encoders(enc, a.out, overwrite=True, fp16=True)
print(json.dumps({k: v for k, v in log.items() if k != "layers"}), file=sys.stderr)
