"""Per-layer decode attention in bf16 at SmolLM2 shapes (9 query / 3 KV heads, d 64): SDPA with enable_gqa,
with repeated K/V, with the query heads grouped per KV head, and the numba / torch dense kernels.

    .venv/bin/python experiments/bf16-dense/sdpa_layout.py   # idle machine; output in sdpa_layout.txt
"""
import time, torch, torch.nn.functional as F
from dashkv.kernels.cpu import dense_decode_cpu, dense_decode_torch
torch.manual_seed(0)
for n in (1024, 8000):
    q = torch.randn(1, 9, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 3, n, 64, dtype=torch.bfloat16); v = torch.randn(1, 3, n, 64, dtype=torch.bfloat16)
    fs = {"sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True),
          "sdpa_repeat": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=0.125),
          "sdpa_group_q": lambda: F.scaled_dot_product_attention(q.reshape(1, 3, 3, 64), k, v, scale=0.125),
          "numba_dense": lambda: dense_decode_cpu(q[:, :, 0], k, v, 0.125),
          "torch_dense": lambda: dense_decode_torch(q[:, :, 0], k, v, 0.125)}
    for name, f in fs.items():
        try:
            for _ in range(5): f()
            t = time.perf_counter()
            for _ in range(50): f()
            print(n, name, f"{(time.perf_counter() - t) / 50 * 1e6:.0f} us")
        except Exception as e:
            print(n, name, "ERR", str(e)[:80])
