"""dashkv: long-context decoding as nearest-neighbour search in a learned Hamming space (DASH-KV).

    model, tok = dashkv.load_model("smollm2-135m")
    with dashkv.enable(model, config=dashkv.DashKVConfig(budget="1/16")):
        model.generate(...)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DashKVConfig": "dashkv.config",
    "HashEncoders": "dashkv.encoders",
    "load_model": "dashkv.models",
    "enable": "dashkv.hf",
    "disable": "dashkv.hf",
    "calibrate": "dashkv.calibrate",
    "DashKVError": "dashkv.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:  # lazy: `import dashkv` stays cheap (no torch/transformers)
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dashkv' has no attribute {name!r}")
