"""Fast kernels for the DASH-KV decode step.

`dashkv.kernels.cpu` holds the fused numba CPU kernel (`dashkv_decode_cpu`) and the fast dense decode
attention it is benchmarked against (`dense_decode_cpu`). Import it lazily: compiling (or loading the
cached compilation of) the numba kernels takes a moment the first time.
"""

from __future__ import annotations

__all__ = ["cpu"]
