"""LongBench-style tasks built offline from local text, scored with LongBench's own metrics.

LongBench's data is not reachable here, so four of its task types are rebuilt from local material
with LongBench's prompt templates and metrics (`scoring.LONGBENCH_METRICS`):

* ``lb_code`` (LCC / RepoBench-P): a long Python standard-library file cut at a line; the model writes
  the next line; edit similarity (`code_sim_score`). Raw completion prompt, no chat template (LongBench
  does not wrap lcc / repobench-p in the chat template either).
* ``lb_passage_retrieval`` (PassageRetrieval-en): numbered paragraphs of Paul Graham essays and one
  sentence quoted verbatim from one of them; which paragraph? (`retrieval_score`).
* ``lb_passage_count`` (PassageCount): numbered paragraphs, some repeated verbatim; how many distinct
  paragraphs? (`count_score`).
* ``lb_fewshot`` (TREC-style few-shot classification): many "Description: <first docstring line> /
  Module: <stdlib module>" examples, then one more description; which module? (`classification_score`
  over the fixed label set `FEWSHOT_MODULES`). Raw prompt, no chat template, as LongBench's trec.

How each differs from the original is listed in docs/evaluation.md. Every sample records where its
answer is (file and line; paragraph number and offsets) so tests can check it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
from dataclasses import dataclass
from typing import Callable

from .fidelity import stdlib_sources
from .haystack import TextHaystack, TokenizerLike, count_tokens, get_haystack
from .tasks import Sample

__all__ = ["LONGBENCH_TASKS", "LongBenchSpec", "make_longbench_sample", "MAX_NEW_TOKENS_LB", "FEWSHOT_MODULES",
           "fewshot_examples"]

#: LongBench's generation caps: lcc 64, passage_retrieval_en 32, passage_count 32, trec 64.
MAX_NEW_TOKENS_LB = {"lb_code": 64, "lb_passage_retrieval": 32, "lb_passage_count": 32, "lb_fewshot": 64}

#: lb_fewshot's labels: standard-library modules with >= 8 usable docstrings, no name a substring of
#: another's or a common word (the classification score matches label names as substrings)
FEWSHOT_MODULES = ("base64", "binascii", "calendar", "codecs", "dataclasses", "difflib", "email.utils",
                   "hashlib", "heapq", "inspect", "locale", "logging", "math", "posixpath",
                   "shutil", "statistics", "tarfile", "traceback", "typing", "unicodedata")
FEWSHOT_PER_MODULE = 64  # examples kept per module (the first, by function name): caps the largest labels

_RETRIEVAL_HEAD = ("Here are {n} paragraphs from essays, along with a sentence quoted from one of them. "
                   "Please determine which paragraph the sentence is from.\n\n")
_RETRIEVAL_Q = ("The following is the sentence.\n\n{sentence}\n\nPlease enter the number of the paragraph that the "
                "sentence is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n")
_COUNT_HEAD = ("There are some paragraphs below sourced from essays. Some of them may be duplicates. Please "
               "carefully read these paragraphs and determine how many unique paragraphs there are after "
               "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n")
_COUNT_Q = ("Please enter the final count of unique paragraphs after removing duplicates. The output format "
            "should only contain the number, such as 1, 2, 3, and so on.\n\n")
_FEWSHOT_HEAD = ("Please determine which Python standard-library module the function described below belongs "
                 "to. Here are some examples.\n\n")
_FEWSHOT_EXAMPLE = "Description: {d}\nModule: {m}\n\n"
_FEWSHOT_Q = "Description: {d}\nModule:"
_CODE_HEAD = "Please complete the code given below. \n"
_CODE_Q = "Next line of code:\n"


@dataclass(frozen=True)
class LongBenchSpec:
    name: str
    build: Callable[..., Sample]
    has_depth: bool
    default_haystack: str | None
    description: str


# ---- paragraphs from a prose corpus ---------------------------------------------------------------------
def _paragraphs(source: TextHaystack, tokenizer: TokenizerLike, rng: random.Random, count: int,
                target_tokens: int) -> list[str]:
    """`count` paragraphs of about `target_tokens` tokens, each a run of consecutive corpus sentences
    from a different, non-overlapping place (so no sentence is shared by two paragraphs)."""
    sents = source.sentences
    used: set[int] = set()
    out: list[str] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 100:
            raise ValueError(f"the {source.name} corpus is too small for {count} distinct paragraphs")
        i = rng.randrange(len(sents))
        j, parts, n = i, [], 0
        while n < target_tokens and j < len(sents) and j not in used:
            parts.append(sents[j])
            n += count_tokens(tokenizer, sents[j]) + 1
            j += 1
        if n < target_tokens // 2 or any(k in used for k in range(max(0, i - 1), j + 1)):
            continue
        used.update(range(i, j))
        out.append(" ".join(parts))
    return out


def _fit_paragraphs(tokenizer, head_fn, question, length, paragraphs, sep="\n\n") -> int:
    """How many of `paragraphs` fit (numbered) with the head and question in `length` tokens."""
    lo, hi = 1, len(paragraphs)
    best = 0
    while lo <= hi:  # the count is monotone in the number of paragraphs
        mid = (lo + hi) // 2
        body = sep.join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paragraphs[:mid]))
        n = count_tokens(tokenizer, head_fn(mid) + body + sep + question(mid))
        if n <= length:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _prose(haystack: str | None) -> TextHaystack:
    src = get_haystack(haystack or "essays")
    if not isinstance(src, TextHaystack):
        raise ValueError(f"LongBench-style paragraph tasks need a prose corpus (essays, jargon, files:...), "
                         f"not {haystack!r}")
    return src


PARAGRAPH_TOKENS = 150


def _passage_retrieval(tokenizer, length, seed, index, depth, haystack) -> Sample:
    rng = random.Random(f"dashkv:lb_passage_retrieval:{seed}:{index}")
    src = _prose(haystack)
    pool = _paragraphs(src, tokenizer, rng, max(4, length // PARAGRAPH_TOKENS + 4), PARAGRAPH_TOKENS)
    # the quoted sentence is chosen before fitting so the question's length is known
    sentence_of: dict[int, str] = {}

    def quote(k: int, paras: list[str]) -> str:
        if k not in sentence_of:
            cands = [s for s in src.sentences if s in paras[k] and len(s.split()) >= 8
                     and not any(s in p for i, p in enumerate(paras) if i != k)]
            if not cands:
                cands = [paras[k][: max(40, len(paras[k]) // 3)]]
            sentence_of[k] = rng.choice(sorted(cands))
        return sentence_of[k]

    longest = max((s for s in src.sentences[:2000]), key=len)
    n = _fit_paragraphs(tokenizer, lambda m: _RETRIEVAL_HEAD.format(n=m), lambda m: _RETRIEVAL_Q.format(sentence=longest),
                        length, pool)
    if n < 2:
        raise ValueError(f"length {length} is too small for task 'lb_passage_retrieval': two paragraphs of "
                         f"~{PARAGRAPH_TOKENS} tokens and the question need about {3 * PARAGRAPH_TOKENS} tokens")
    paras = pool[:n]
    d = 0.5 if depth is None else float(depth)
    target = min(n - 1, int(round(d * (n - 1))))
    sentence = quote(target, paras)
    body = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paras))
    context = _RETRIEVAL_HEAD.format(n=n) + body
    question = _RETRIEVAL_Q.format(sentence=sentence)
    offset = context.index(f"Paragraph {target + 1}: ")
    meta = {"answer_prefix": "The answer is: ", "paragraphs": n, "target": target + 1, "sentence": sentence,
            "char_offset": offset, "needles": [], "depth_actual": target / max(1, n - 1), "index": index,
            "haystack": src.name}
    return Sample("lb_passage_retrieval", length, d, context, question, [f"Paragraph {target + 1}"], meta, seed)


def _passage_count(tokenizer, length, seed, index, depth, haystack) -> Sample:
    rng = random.Random(f"dashkv:lb_passage_count:{seed}:{index}")
    src = _prose(haystack)
    slots_max = max(4, length // PARAGRAPH_TOKENS + 4)
    pool = _paragraphs(src, tokenizer, rng, slots_max, PARAGRAPH_TOKENS)
    slots = _fit_paragraphs(tokenizer, lambda m: _COUNT_HEAD, lambda m: _COUNT_Q, length, pool)
    if slots < 3:
        raise ValueError(f"length {length} is too small for task 'lb_passage_count': a few paragraphs of "
                         f"~{PARAGRAPH_TOKENS} tokens need about {4 * PARAGRAPH_TOKENS} tokens")
    for _ in range(20):  # duplicates are exact copies, so only the slot count changes the length
        unique = rng.randint(max(2, slots // 3), slots - 1)
        order = list(range(unique)) + [rng.randrange(unique) for _ in range(slots - unique)]
        rng.shuffle(order)
        body = "\n\n".join(f"Paragraph {i + 1}: {pool[k]}" for i, k in enumerate(order))
        context = _COUNT_HEAD + body
        if count_tokens(tokenizer, context + "\n\n" + _COUNT_Q) <= length:
            break
        slots -= 1
    meta = {"answer_prefix": "The final answer is: ", "slots": len(order), "unique": unique, "order": order,
            "needles": [], "index": index, "haystack": src.name}
    return Sample("lb_passage_count", length, None, context, _COUNT_Q, [str(unique)], meta, seed)


def _qualifies(line: str) -> bool:
    """A next line worth predicting: real code (not blank, not a comment, not a lone bracket/quote)."""
    s = line.strip()
    return len(s) >= 8 and not s.startswith("#") and not s.startswith(('"""', "'''")) and \
        "`" not in s and "//" not in s


def _code(tokenizer, length, seed, index, depth, haystack) -> Sample:
    rng = random.Random(f"dashkv:lb_code:{seed}:{index}")
    files = list(stdlib_sources())
    rng.shuffle(files)
    budget = length - count_tokens(tokenizer, _CODE_HEAD + _CODE_Q) - 4
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        counts = [count_tokens(tokenizer, ln) for ln in lines]
        if sum(counts) < budget + 50:
            continue
        # the target line: a seeded qualifying line with at least `budget` tokens of file before it
        cum, acc = [], 0
        for c in counts:
            cum.append(acc)
            acc += c
        cands = [i for i, ln in enumerate(lines) if cum[i] >= budget and _qualifies(ln)]
        if not cands:
            continue
        target = rng.choice(cands)
        start = target
        total = 0
        while start > 0 and total + counts[start - 1] <= budget:
            start -= 1
            total += counts[start]
        while True:  # per-line counts are close; measure the real prompt and drop leading lines to fit
            context = _CODE_HEAD + "".join(lines[start:target])
            if count_tokens(tokenizer, context + _CODE_Q) <= length or start >= target - 1:
                break
            start += 1
        meta = {"answer_prefix": "", "file": f.name, "line": target + 1, "first_line": start + 1, "no_chat": True,
                "needles": [], "index": index}
        return Sample("lb_code", length, None, context, _CODE_Q, [lines[target].strip()], meta, seed)
    raise ValueError(f"no standard-library file is long enough for task 'lb_code' at {length} tokens")


@functools.lru_cache(maxsize=1)
def fewshot_examples() -> tuple[tuple[str, str], ...]:
    """(description, module) pairs: the first docstring line of each public function of the modules in
    `FEWSHOT_MODULES` (this Python's standard library), 20-160 characters, not naming its module, and
    found in exactly one module (so every label is unambiguous); at most `FEWSHOT_PER_MODULE` each."""
    found: dict[str, list[str]] = {}
    for name in FEWSHOT_MODULES:
        mod = importlib.import_module(name)
        lines = []
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            if not _defined_in(obj, name):
                continue  # re-exported from elsewhere: its label would be wrong
            doc = inspect.getdoc(obj)
            line = doc.strip().split("\n")[0].strip() if doc else ""
            if 20 <= len(line) <= 160 and name.split(".")[-1] not in line.lower():
                lines.append(line)
        found[name] = lines

    def key(line: str) -> str:  # near-duplicates (a trailing period, case) count as one description
        return line.rstrip(". ").lower()

    seen: dict[str, int] = {}
    for lines in found.values():
        for k in {key(ln) for ln in lines}:
            seen[k] = seen.get(k, 0) + 1
    out = []
    for name in FEWSHOT_MODULES:
        kept, keys = [], set()
        for ln in found[name]:
            if seen[key(ln)] == 1 and key(ln) not in keys:  # in one module only, and once there
                kept.append(ln)
                keys.add(key(ln))
        out += [(ln, name) for ln in kept[:FEWSHOT_PER_MODULE]]
    return tuple(out)


def _defined_in(obj, name: str) -> bool:
    """True if the function belongs to module `name` (or its C accelerator `_name`): not one re-exported
    from another module (statistics.log is math.log) and not a bound method of some object."""
    home = (name, "_" + name.split(".")[-1])
    mod = getattr(obj, "__module__", None)
    if mod is not None:
        return mod in home
    owner = getattr(obj, "__self__", None)  # C builtins without __module__: their owner decides
    return owner is None or (inspect.ismodule(owner) and owner.__name__ in home)


def _fewshot(tokenizer, length, seed, index, depth, haystack) -> Sample:
    rng = random.Random(f"dashkv:lb_fewshot:{seed}:{index}")
    pool = list(fewshot_examples())
    query, label = pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    question = _FEWSHOT_Q.format(d=query)
    budget = length - count_tokens(tokenizer, _FEWSHOT_HEAD + "\n" + question) - 4
    shots, used = [], 0
    for d, m in pool:
        t = count_tokens(tokenizer, _FEWSHOT_EXAMPLE.format(d=d, m=m))
        if used + t > budget:
            break
        shots.append((d, m))
        used += t
    if not any(m == label for _, m in shots):  # the asked label must be among the examples' labels
        first = next((i for i, (_, m) in enumerate(pool) if m == label), None)
        if first is None or not shots:
            raise ValueError(f"length {length} is too small for task 'lb_fewshot'")
        shots[rng.randrange(len(shots))] = pool[first]  # at a seeded place, not always next to the question
    if len(shots) == len(pool) and used < 0.9 * budget:
        raise ValueError(f"length {length} is too long for task 'lb_fewshot': its {len(pool) + 1} examples fill "
                         f"only about {used} tokens")
    if len(shots) < 8:
        raise ValueError(f"length {length} is too small for task 'lb_fewshot': it fits {len(shots)} examples, "
                         "at least 8 are needed")
    def render(shots: list[tuple[str, str]]) -> str:
        return _FEWSHOT_HEAD + "".join(_FEWSHOT_EXAMPLE.format(d=d, m=m) for d, m in shots)

    while count_tokens(tokenizer, render(shots) + "\n" + question) > length and len(shots) > 8:
        shots.pop(0 if shots[0][1] != label or sum(m == label for _, m in shots) > 1 else 1)
    meta = {"answer_prefix": "", "no_chat": True, "needles": [], "index": index, "shots": len(shots),
            "query": query, "label_shots": sum(m == label for _, m in shots)}
    sample = Sample("lb_fewshot", length, None, render(shots).rstrip("\n") + "\n", question, [label], meta, seed)
    if count_tokens(tokenizer, sample.prompt) > length:
        raise ValueError(f"length {length} is too small for task 'lb_fewshot': 8 examples and the question "
                         "do not fit")
    return sample


LONGBENCH_TASKS: dict[str, LongBenchSpec] = {
    s.name: s for s in [
        LongBenchSpec("lb_code", _code, False, None, "LCC-style next line of a long stdlib Python file (edit sim.)"),
        LongBenchSpec("lb_passage_retrieval", _passage_retrieval, True, "essays",
                      "PassageRetrieval-style: which numbered essay paragraph holds the quoted sentence"),
        LongBenchSpec("lb_passage_count", _passage_count, False, "essays",
                      "PassageCount-style: distinct paragraphs among repeated ones"),
        LongBenchSpec("lb_fewshot", _fewshot, False, None,
                      "TREC-style few-shot classification: which stdlib module a described function is from"),
    ]
}


def make_longbench_sample(task: str, tokenizer: TokenizerLike, length: int, *, seed: int = 0, index: int = 0,
                          depth: float | None = None, haystack: str | None = None) -> Sample:
    """One LongBench-style sample whose plain prompt (context + "\\n" + question) fits in `length` tokens."""
    if task not in LONGBENCH_TASKS:
        raise ValueError(f"unknown LongBench-style task {task!r}; valid: {', '.join(LONGBENCH_TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    return LONGBENCH_TASKS[task].build(tokenizer, length, seed, index, depth, haystack)
