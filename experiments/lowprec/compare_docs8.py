"""Pooled teacher-forced agreement/KL of DASH-KV F = 0.75 against the oracle, per document range (8K, 1/16).  python experiments/lowprec/compare_docs8.py"""
import json
def load(d): return [json.loads(l) for l in open(f"/work/main/experiments/lowprec/{d}/results.jsonl")]
o=load('fidelity-8192-oracle-docs8')
for t in ['code','prose']:
    f=load(f'fidelity-8192-low0.75-docs8-{t}')
    for lab,idx in [('docs 0-3',range(4)),('docs 4-7 (held out)',range(4,8)),('docs 0-7',range(8))]:
        def agg(rs,m):
            rr={(r['index']):r for r in rs if r['method']==m and r['task']==f'fidelity_{t}' and r['index'] in idx}
            a=sum(r['agree'] for r in rr.values()); p=sum(r['positions'] for r in rr.values()); k=sum(r['kl_sum'] for r in rr.values())
            return len(rr), 100*a/p, k/p
        nf,af,kf=agg(f,'dashkv'); no,ao,ko=agg(o,'oracle')
        print(f"| {t} | {lab} | {nf} | {af:.1f} / {kf:.4f} | {ao:.1f} / {ko:.4f} | {af-ao:+.1f} | {kf/ko:.2f}x |")
