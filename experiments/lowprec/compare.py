"""Paired teacher-forced fidelity: the same documents (task, length, start) across sweep directories.

  python experiments/lowprec/compare.py LABEL=DIR[:METHODS] ...   (METHODS: comma list, default all)
Prints, per length / task / budget, agreement % and mean KL for each (label, method) over the documents
every given directory has; and the share of read context (`read_fraction`).
"""
import json, sys
from collections import defaultdict

specs = []
for arg in sys.argv[1:]:
    label, rest = arg.split("=", 1)
    d, _, methods = rest.partition(":")
    specs.append((label, d, set(methods.split(",")) if methods else None))
rows = {}
docs = None
for label, d, methods in specs:
    mine = [json.loads(l) for l in open(f"{d}/results.jsonl")]
    keys = {(r["task"], r["length"], r["start"]) for r in mine}
    docs = keys if docs is None else docs & keys
    rows[label] = [r for r in mine if methods is None or r["method"] in methods]
agg = defaultdict(lambda: [0, 0, 0.0, 0.0, 0])  # agree, positions, kl_sum, read, n
for label, rs in rows.items():
    for r in rs:
        if (r["task"], r["length"], r["start"]) not in docs or r["method"] == "dense":
            continue
        a = agg[(r["length"], r["task"], r["budget"], label, r["method"])]
        a[0] += r["agree"]; a[1] += r["positions"]; a[2] += r["kl_sum"]; a[3] += r["read_fraction"]; a[4] += 1
print(f"documents in every directory: {len(docs)}")
print("| length | task | budget | label | method | agreement % | mean KL | read | docs |")
print("|---|---|---|---|---|---:|---:|---:|---:|")
for k in sorted(agg):
    a = agg[k]
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {100 * a[0] / a[1]:.1f} | {a[2] / a[1]:.4f} | "
          f"{a[3] / a[4]:.4f} | {a[4]} |")
