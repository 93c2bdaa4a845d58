"""A/B inside a real decode loop: DASH-KV with a batch's rows on 1 vs 2 threads (`set_row_threads`),
steps interleaved with StaticCache and the floor, one process (so one OpenMP spin setting) per run.

    GOMP_SPINCOUNT=10000 python experiments/batch/row_threads_ab.py 8000 8 24 float32

Prints the median ms/step per row, ratios to StaticCache and the floor, and the fused kernel's median
ms per layer call for each DASH-KV row. Results of stop 27: experiments/batch/row-threads-ab.txt.
"""
import copy, statistics, sys, time, torch
sys.path.insert(0, 'src')
from transformers import StaticCache
from dashkv.bench_decode import _Row, long_prompt_ids
from dashkv.config import DashKVConfig
from dashkv.hf import enable
from dashkv.models import load_model
from dashkv.kernels import cpu as K
ctx, batch, steps, dt = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, tok = load_model('smollm2-135m'); model = model.to(getattr(torch, dt)).eval()
cfg = DashKVConfig()
ids = long_prompt_ids(tok, ctx); total = ctx + steps + 8
floor_n = cfg.budget_tokens(ctx)
rows = {}
KT = {}
_orig = K.dashkv_decode_cpu
CUR = ['']
def _timed(*a, **k):
    t0 = time.perf_counter(); r = _orig(*a, **k); KT.setdefault(CUR[0], []).append(time.perf_counter() - t0); return r
K.dashkv_decode_cpu = _timed
st = _Row('static', model); st.prefill(ids, StaticCache(config=model.config, max_cache_len=total), batch); rows['static'] = st
fl = _Row('floor', model); fl.prefill(ids[:, -floor_n:], StaticCache(config=model.config, max_cache_len=floor_n + total - ctx), batch); rows['floor'] = fl
for rt in (1, 2):
    m = copy.deepcopy(model); h = enable(m, None, cfg)
    r = _Row(f'dashkv-rt{rt}', m, h); r.prefill(ids, None, batch); rows[r.name] = r
print('prefilled', {k: round(r.prefill_s, 1) for k, r in rows.items()}, file=sys.stderr)
for s in range(steps + 3):
    for name, r in rows.items():
        if name.startswith('dashkv'):
            K.set_row_threads(int(name[-1]))
        CUR[0] = name if s >= 3 else ''
        r.step(timed=s >= 3)
K.set_row_threads(None)
res = {k: statistics.median(r.times) * 1e3 for k, r in rows.items()}
q = {k: (round(statistics.quantiles([t*1e3 for t in r.times], n=10)[0],1), round(statistics.quantiles([t*1e3 for t in r.times], n=10)[-1],1)) for k, r in rows.items()}
print(f'ctx {ctx} batch {batch} {dt}:', {k: round(v, 1) for k, v in res.items()}, 'p10-p90', q,
      {k: round(res['static'] / v, 3) for k, v in res.items()}, 'x_floor', {k: round(v / res['floor'], 3) for k, v in res.items()})
print('kernel ms per layer call', {k: round(statistics.median(v)*1e3, 3) for k, v in KT.items() if k})
