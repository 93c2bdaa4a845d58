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
    "levenshtein_ratio",
    "code_sim_score",
    "retrieval_score",
    "count_score",
    "classification_score",
    "LONGBENCH_METRICS",
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
    """Score one prediction with the metric RULER (or, for the lb_* tasks, LongBench) uses for ``task``."""
    if task in LONGBENCH_METRICS:
        refs = [answers] if isinstance(answers, str) else list(answers)
        if not refs:
            raise ValueError("answers must hold at least one reference string")
        return max(LONGBENCH_METRICS[task](prediction, r) for r in refs)  # LongBench: max over answers
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


# ---- LongBench metrics (THUDM/LongBench `metrics.py`), for the LongBench-style tasks ----------------------
def levenshtein_ratio(a: str, b: str) -> float:
    """Normalised Indel similarity in [0, 1]: 2 * LCS(a, b) / (len(a) + len(b)), the ratio that
    `fuzz.ratio` (thefuzz / rapidfuzz, used by LongBench's code_sim_score) reports x 100. Two empty
    strings are identical (1.0)."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for ca in a:  # LCS by dynamic programming, one row at a time
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return 2.0 * prev[-1] / (len(a) + len(b))


def code_sim_score(prediction: str, answer: str) -> float:
    """LongBench's LCC / RepoBench-P score: the first generated line that holds no '`', '#' or '//'
    against the true next line, by `fuzz.ratio` (rounded to an integer percent, as thefuzz returns it)
    / 100. Leading/trailing whitespace of both lines is ignored (our answers are stored stripped)."""
    line = ""
    for cand in prediction.lstrip("\n").split("\n"):
        if "`" not in cand and "#" not in cand and "//" not in cand:
            line = cand
            break
    return round(100 * levenshtein_ratio(line.strip(), answer.strip())) / 100


def retrieval_score(prediction: str, answer: str) -> float:
    """LongBench's PassageRetrieval score: the share of the numbers in the prediction that equal the
    paragraph number of the answer ("Paragraph 7"); 0 when the prediction has no number."""
    m = re.findall(r"Paragraph (\d+)", answer)
    if not m:
        raise ValueError(f"retrieval answer {answer!r} is not 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    return sum(1 for n in numbers if n == m[0]) / len(numbers) if numbers else 0.0


def count_score(prediction: str, answer: str) -> float:
    """LongBench's PassageCount score: the share of the numbers in the prediction equal to the count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(1 for n in numbers if n == str(answer)) / len(numbers) if numbers else 0.0


def classification_score(prediction: str, answer: str, classes: Sequence[str] | None = None) -> float:
    """LongBench's TREC-style score on the first generated line: the labels named in it (as substrings),
    less those that are only part of the true label's name; 1 / their number if the true label is among
    them, else 0 (naming two labels scores 0.5). `classes`: the label set (default: lb_fewshot's)."""
    if classes is None:
        from .longbench import FEWSHOT_MODULES as classes
    if answer not in classes:
        raise ValueError(f"classification answer {answer!r} is not one of the labels")
    line = prediction.lstrip("\n").split("\n")[0]
    named = [c for c in classes if c in line]
    named = [c for c in named if c == answer or c not in answer]
    return 1.0 / len(named) if answer in named else 0.0


#: LongBench-style task -> its scorer (prediction, first reference) -> [0, 1]
LONGBENCH_METRICS = {
    "lb_code": code_sim_score,
    "lb_passage_retrieval": retrieval_score,
    "lb_passage_count": count_score,
    "lb_fewshot": classification_score,
}
