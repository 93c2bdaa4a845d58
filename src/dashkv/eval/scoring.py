"""RULER string-match metrics, per sample, in [0, 1].

RULER (NVIDIA/RULER, ``eval/synthetic/constants.py``) scores every synthetic task by
case-insensitive substring match of each reference answer in the prediction:

* ``string_match_all``: fraction of the references found (all NIAH variants, vt, cwe, fwe, passkey);
* ``string_match_part``: 1 if any reference is found (qa_1, qa_2).

RULER reports the mean over samples times 100; here a sample scores in [0, 1] and
:func:`score_samples` gives the mean, so multiply by 100 to compare with published tables.
Substring matching is kept on purpose (comparability), with its known looseness: "cat" counts as
found in "category".
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "postprocess_prediction",
    "score_all",
    "score_part",
    "score_sample",
    "score_samples",
    "metric_for_task",
    "PART_TASKS",
]

# Tasks RULER scores with string_match_part; everything else uses string_match_all.
PART_TASKS = frozenset({"qa_1", "qa_2"})
_CTRL_RE = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's clean-up: control characters become newlines, then strip."""
    return _CTRL_RE.sub("\n", prediction.strip()).strip()


def _check(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise ValueError("answers must hold at least one reference string")
    return [str(a).lower() for a in answers]


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of reference answers contained in the prediction (RULER string_match_all)."""
    refs = _check(answers)
    pred = postprocess_prediction(prediction).lower()
    return sum(1.0 for r in refs if r in pred) / len(refs)


def score_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any reference answer is contained in the prediction (RULER string_match_part)."""
    refs = _check(answers)
    pred = postprocess_prediction(prediction).lower()
    return 1.0 if any(r in pred for r in refs) else 0.0


def metric_for_task(task: str) -> str:
    """'part' for RULER's QA tasks, 'all' for every other (synthetic) task."""
    return "part" if task in PART_TASKS or task.startswith("qa") else "all"


def score_sample(task: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with the metric RULER uses for ``task``."""
    if metric_for_task(task) == "part":
        return score_part(prediction, answers)
    return score_all(prediction, answers)


def score_samples(
    task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> float:
    """Mean per-sample score in [0, 1] (RULER's number divided by 100)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(score_sample(task, p, a) for p, a in zip(predictions, answers)) / len(predictions)
