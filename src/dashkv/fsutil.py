"""Small filesystem helpers: outputs appear complete or not at all."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def swap_into_place(staged: Path, out: Path) -> None:
    """Rename a fully written directory `staged` to `out`, replacing an existing `out`.

    The old directory is renamed aside first and removed only after the new one is in place, so a
    crash leaves either the old or the new directory at `out`, never a half-written one.
    """
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(out)
