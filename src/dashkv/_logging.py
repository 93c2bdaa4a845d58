"""Module loggers and once-per-process warnings for dashkv's silent fallbacks.

The library never prints: information goes to `logging.getLogger("dashkv....")` (silent unless the
application configures logging); each fallback that changes what a user gets (dense instead of sparse,
the reference path instead of the fused kernel, encoders used past their calibrated length) is logged
as a WARNING once per process and key, so a server decoding thousands of requests logs it once.
"""

from __future__ import annotations

import logging
import threading
from typing import Hashable

_lock = threading.Lock()
_seen: set[Hashable] = set()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def warn_once(logger: logging.Logger, key: Hashable, message: str, *args: object) -> bool:
    """Log `message` at WARNING the first time `key` is seen in this process; True if it was logged."""
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.warning(message, *args)
    return True


def reset_warnings() -> None:
    """Forget which warnings were given (tests)."""
    with _lock:
        _seen.clear()
