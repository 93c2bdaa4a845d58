"""Long-text perplexity under sparse decode attention: the `perplexity` task of `dashkv eval`.

A document is a window of `length` tokens cut from a long text (Paul Graham essays by default). The
first `length - continuation` tokens are the context: everything but its last token is prefilled
densely (as for every task), then the continuation is *teacher-forced* one token at a time through
the method's decode path, so every predicted token is scored with sparse attention over the whole
context. The score is the mean negative log-likelihood (nats/token) of the continuation; perplexity
is exp(mean NLL) over all scored tokens.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .haystack import TextHaystack, get_haystack

__all__ = ["PERPLEXITY_TASK", "PerplexityDoc", "make_documents", "teacher_forced_nll", "perplexity"]

PERPLEXITY_TASK = "perplexity"
DEFAULT_CONTINUATION = 64


@dataclass
class PerplexityDoc:
    """One scored window: `ids` = context + continuation (token ids), `continuation` tokens scored."""

    index: int
    ids: list[int]
    continuation: int
    start: int  # token offset of the window in the tokenised corpus
    source: str

    @property
    def context_ids(self) -> list[int]:
        return self.ids[: len(self.ids) - self.continuation]

    @property
    def target_ids(self) -> list[int]:
        return self.ids[len(self.ids) - self.continuation:]


@functools.lru_cache(maxsize=4)
def _corpus_text(source_name: str) -> str:
    source = get_haystack(source_name)
    if not isinstance(source, TextHaystack):
        raise ValueError(f"the perplexity task needs a prose haystack (essays, jargon, files:...), not {source_name!r}")
    return "\n\n".join(source._load_texts())


def make_documents(tokenizer: Any, length: int, n: int, *, seed: int = 0, continuation: int = DEFAULT_CONTINUATION,
                   haystack: str | None = None) -> list[PerplexityDoc]:
    """`n` windows of `length` tokens starting at seeded random word boundaries of the corpus (essays
    unless `haystack`); only the text around each window is tokenised."""
    if continuation < 1 or length <= continuation + 1:
        raise ValueError(f"perplexity: length {length} must exceed the continuation ({continuation}) + 1")
    name = haystack or "essays"
    text = _corpus_text(name)
    docs = []
    for i in range(n):
        ids, start = prose_window(text, tokenizer, length, random.Random(f"dashkv:perplexity:{seed}:{i}"),
                                  f"perplexity: the {name} corpus")
        docs.append(PerplexityDoc(i, ids, continuation, start, name))
    return docs


def prose_window(text: str, tokenizer: Any, length: int, rng: random.Random, what: str) -> tuple[list[int], int]:
    """`length` token ids of `text` from a seeded random word boundary, and that boundary's offset;
    only the characters around the window are tokenised (6 per token at first, doubled until enough)."""
    chars = 6 * length
    while True:
        if len(text) <= chars:
            raise ValueError(f"{what} is too short for {length} tokens")
        start = text.find(" ", rng.randrange(len(text) - chars)) + 1  # a word boundary
        ids = tokenizer.encode(text[start:start + chars], add_special_tokens=False)
        if len(ids) >= length:
            return list(ids[:length]), start
        chars *= 2


@torch.inference_mode()
def teacher_forced_nll(model: Any, cache: Any, last_context_id: int, targets: Sequence[int]) -> list[float]:
    """NLL of each target token, feeding the previous true token one step at a time through `cache`.

    The cache holds the context minus its last token (`last_context_id`), so the first target is
    predicted by a decode step too.
    """
    nll = []
    prev = last_context_id
    for t in targets:
        out = model(input_ids=torch.tensor([[prev]]), cache=cache, use_cache=True, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[0, -1].float(), -1)
        nll.append(float(-logp[t]))
        prev = t
    return nll


def perplexity(nll_means: Sequence[float], counts: Sequence[int] | None = None) -> float:
    """exp of the token-weighted mean NLL."""
    if not nll_means:
        return float("nan")
    counts = counts or [1] * len(nll_means)
    return math.exp(sum(m * c for m, c in zip(nll_means, counts)) / sum(counts))
