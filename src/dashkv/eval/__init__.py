"""Offline long-context evaluation: RULER-style task generators, haystacks and string-match scoring."""

from .haystack import (
    HaystackSource,
    TokenizerLike,
    count_tokens,
    fill_to_tokens,
    get_haystack,
)
from .scoring import score_all, score_part, score_sample, score_samples
from .tasks import TASKS, Sample, make_sample, make_samples, needle_token_positions, sample_depths

__all__ = [
    "HaystackSource",
    "TokenizerLike",
    "count_tokens",
    "fill_to_tokens",
    "get_haystack",
    "score_all",
    "score_part",
    "score_sample",
    "score_samples",
    "TASKS",
    "Sample",
    "make_sample",
    "make_samples",
    "needle_token_positions",
    "sample_depths",
]
