"""`dashkv serve`: an OpenAI-compatible HTTP server over DASH-KV decoding (optional extra `dashkv[serve]`).

Modules, one job each:
- `engine`:   the single worker thread that owns the model, forms batches and runs `generate`;
- `schemas`:  the OpenAI request bodies (pydantic) and the per-request `dashkv` field;
- `errors`:   OpenAI-style JSON errors;
- `metrics`:  counters and histograms rendered as Prometheus text;
- `memory`:   the K/V + codes memory estimate that bounds a batch;
- `app`:      the FastAPI routes (imports fastapi: only import it when serving).
"""

from __future__ import annotations

from ..errors import DashKVError

INSTALL_HINT = "pip install 'dashkv[serve]'"


def require_serve_deps() -> None:
    """Fail with one readable line when the optional server dependencies are missing."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DashKVError(f"`dashkv serve` needs {', '.join(missing)}; install them with: {INSTALL_HINT}")
