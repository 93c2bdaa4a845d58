"""Per-call time of each piece of a DASH-KV decode step inside a real `generate` (stop 28).

    .venv/bin/python experiments/insitu/parts_in_generate.py [float32|bfloat16] [tokens]   # idle machine; SmolLM2, random tokens (3000), 20 steps

Each function below is wrapped by a perf_counter timer (its callees included); only decode steps count
(timers switch on after the first generated token).
"""
import os; os.environ.setdefault("GOMP_SPINCOUNT","10000")
import time, torch, collections
from dashkv.models import load_model
from dashkv import hf, cache, encoders, selection, decode, config as cfgmod
from dashkv.kernels import cpu
import sys
DT = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
model, tok = load_model("smollm2-135m", dtype=DT)
torch.manual_seed(0)
ids = torch.randint(100, 20000, (1, int(sys.argv[2]) if len(sys.argv) > 2 else 3000))
h = hf.enable(model)
tot=collections.defaultdict(float); cnt=collections.Counter(); on=[False]
def wrap(owner, name):
    fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    def w(*a, **k):
        t=time.perf_counter(); r=fn(*a, **k); 
        if on[0]: tot[name]+=time.perf_counter()-t; cnt[name]+=1
        return r
    setattr(owner, name, w)
for owner, name in [(cache.DashKVLayer,"update"),(cache.DashKVLayer,"_append_fast"),(cache.DashKVLayer,"_publish"),(cache.DashKVLayer,"_buffer_views"),
                    (cpu,"append_coded_cpu"),(encoders.HashEncoders,"_fast_linear"),(hf,"decode_step"),(selection.DashKVPolicy,"query_projection"),
                    (selection.DashKVPolicy,"probability_temperatures"),(cpu,"dashkv_decode_cpu"),(cpu,"_dashkv_kernel_serial"),(cfgmod.DashKVConfig,"plan"),
                    (decode,"_fast_kernel"),(hf,"sdpa_attention_forward"),(decode,"dense_decode_attention"),(cpu,"dense_decode_torch")]:
    wrap(owner,name)
class S:
    def __init__(s): s.n=0
    def put(s, v):
        s.n+=1
        if s.n==2: on[0]=True
    def end(s): pass
model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
tot.clear(); cnt.clear(); on[0]=False
model.generate(ids, max_new_tokens=21, do_sample=False, pad_token_id=0, streamer=S())
for k in tot: print(f"{k:28s} calls {cnt[k]:5d}  {tot[k]/cnt[k]*1e6:8.1f} us/call")
