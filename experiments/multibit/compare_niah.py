"""Per-sample comparison of a DASH-KV eval run with the oracle top-k rows of the Gemma RULER 4K matrix
(same prompts: seed 0, default haystack, 4K, 10 samples per task), at one budget.

  python experiments/multibit/compare_niah.py NEW_DIR [MATRIX_DIR] [BUDGET] [OLD_DASHKV_DIR]
(OLD_DASHKV_DIR: where the "old dkv" column's rows are, default MATRIX_DIR; both may list several
directories separated by commas)
Prints, per task: oracle right, DASH-KV right, oracle-right samples DASH-KV misses (the issue-10
criterion: at most one over all tasks), and the sums.
"""
import json, sys
from collections import defaultdict

new = sys.argv[1]
matrix = sys.argv[2] if len(sys.argv) > 2 else "results/eval/gemma3-270m-ruler-4k"
budget = sys.argv[3] if len(sys.argv) > 3 else "1/16"
old_dir = sys.argv[4] if len(sys.argv) > 4 else matrix


def rows(dirs):
    """Scores by (task, sample, method, budget) from one or more comma-separated sweep directories."""
    out = {}
    for d in dirs.split(","):
        for line in open(f"{d}/results.jsonl"):
            r = json.loads(line)
            out[(r["task"], r["index"], r["method"], r["budget"])] = r["score"]
    return out


old, cur, olddkv = rows(matrix), rows(new), rows(old_dir)
tot = defaultdict(float)
print(f"{'task':18s} {'n':>3s} {'dense':>6s} {'oracle':>6s} {'old dkv':>7s} {'new dkv':>7s} {'missed':>6s}")
for task in sorted({k[0] for k in cur}):
    idx = sorted({k[1] for k in cur if k[0] == task and k[2] == "dashkv" and k[3] == budget})
    o = [old.get((task, i, "oracle", budget)) for i in idx]
    if any(x is None for x in o):
        continue
    dn = [old[(task, i, "dense", "full")] for i in idx]
    od = [olddkv.get((task, i, "dashkv", budget), float("nan")) for i in idx]
    nw = [cur[(task, i, "dashkv", budget)] for i in idx]
    missed = sum(1 for a, b in zip(o, nw) if a >= 1.0 and b < 1.0)
    for k, v in (("n", len(idx)), ("dense", sum(dn)), ("oracle", sum(o)), ("old", sum(od)), ("new", sum(nw)), ("missed", missed)):
        tot[k] += v
    print(f"{task:18s} {len(idx):3d} {sum(dn):6.2f} {sum(o):6.2f} {sum(od):7.2f} {sum(nw):7.2f} {missed:6d}")
print(f"{'all':18s} {int(tot['n']):3d} {tot['dense']:6.2f} {tot['oracle']:6.2f} {tot['old']:7.2f} {tot['new']:7.2f} {int(tot['missed']):6d}")
