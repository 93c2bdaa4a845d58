"""Fast kernels for the DASH-KV decode step.

`dashkv.kernels.cpu` holds the fused numba CPU kernel (`dashkv_decode_cpu`) and the fast dense decode
attention it is benchmarked against (`dense_decode_cpu`). Import it lazily: compiling (or loading the
cached compilation of) the numba kernels takes a moment the first time.
"""

from __future__ import annotations

import torch

#: K/V dtypes the fused CPU kernel reads (16-bit ones widened in registers, fp32 accumulation). Here, not
#: in `cpu`, so code that only asks "is this dtype fused?" does not import numba.
CPU_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Histogram buckets of the fused CPU kernel's asymmetric score (the pooled-budget reference bins alike).
NBINS_ASYM = 2048

__all__ = ["cpu", "CPU_KV_DTYPES"]
