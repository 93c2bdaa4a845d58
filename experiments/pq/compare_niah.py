"""Per prompt: full attention, oracle top-k and DASH-KV in one sweep's rows; counts the samples oracle top-k
answers and DASH-KV misses (issue 10's criterion: at most one).

    python experiments/pq/compare_niah.py results/eval/<sweep> [--also results/eval/<other sweep>:<label>]
"""
import json, sys
from collections import defaultdict

def load(d):
    rows = [json.loads(l) for l in open(f"{d}/results.jsonl")]
    return {(r["task"], r["length"], r["index"], r["method"]): r["score"] for r in rows}

args = sys.argv[1:]
main = load(args[0])
others = [(a.split(":")[1], load(a.split(":")[0])) for a in args[1:] if ":" in a]
keys = sorted({k[:3] for k in main})
tot = defaultdict(float); missed = []; gained = []
for k in keys:
    s = {m: main.get(k + (m,)) for m in ("dense", "oracle", "dashkv")}
    if None in s.values():
        continue
    for m, v in s.items():
        tot[m] += v
    tot["n"] += 1
    if s["oracle"] >= 0.5 and s["dashkv"] < 0.5:
        missed.append(k)
    if s["oracle"] < 0.5 and s["dashkv"] >= 0.5:
        gained.append(k)
    for label, o in others:
        v = o.get(k + ("dashkv",))
        if v is not None:
            tot[label] += v; tot[label + "_n"] += 1
print(f"prompts with all three rows: {int(tot['n'])}")
for m in ("dense", "oracle", "dashkv"):
    print(f"  {m:8s} {tot[m]:.1f}")
for label, _ in others:
    print(f"  {label:8s} {tot[label]:.1f} of {int(tot[label + '_n'])}")
print(f"oracle right, DASH-KV wrong: {len(missed)} {missed}")
print(f"oracle wrong, DASH-KV right: {len(gained)} {gained}")
