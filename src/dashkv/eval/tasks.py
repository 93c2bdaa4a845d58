"""Offline, seeded RULER-style long-context tasks.

Every task builds :class:`Sample` objects whose prompt (``context + "\\n" + question``) has a token
count, measured with the caller's tokenizer, within ``tolerance`` below the requested length.
Templates and wording follow NVIDIA/RULER (``scripts/data/synthetic``) and, for ``passkey``, the
Landmark-Attention / LongLoRA pass-key test. Differences from RULER, on purpose:

* no few-shot example is prepended to cwe/fwe/vt (the runner owns prompt formatting);
* keys are adjective-noun pairs from built-in lists (RULER uses ``wonderwords``) and cwe words are
  pronounceable pseudo-words (CVCVCV), so nothing needs a download;
* the queried (first answer) needle sits at the sample's depth, spread evenly over the samples
  (``i / (n - 1)``); other needles (distractors, extra values/queries, later vt hops) take seeded
  random depths, as RULER places all of them.

Only ``tokenizer.encode(text, add_special_tokens=False)`` is used (see ``TokenizerLike``).
"""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator

from .haystack import (
    HaystackSource,
    TokenizerLike,
    _fill,
    count_tokens,
    get_haystack,
)

__all__ = [
    "Sample",
    "TaskSpec",
    "TASKS",
    "make_samples",
    "make_sample",
    "sample_depths",
    "needle_token_positions",
    "NEEDLE_TEMPLATE",
]

NEEDLE_TEMPLATE = "One of the special magic {type_v} for {key} is: {value}."
_NIAH_PREAMBLE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards."
)
_NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
_NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

_ADJECTIVES = (
    "abundant adorable agreeable ambitious ancient angry anxious aquatic arrogant ashamed brave "
    "bright broad bumpy calm careful cheerful chilly clever clumsy cloudy colossal cool crooked "
    "cuddly curious damp dazzling deep delightful dizzy dusty eager elegant enchanting evasive "
    "faithful fancy fierce filthy flaky fluffy foolish fragile friendly fuzzy gentle giant gifted "
    "glamorous gleaming graceful greasy grumpy handsome happy helpful hollow humble hungry icy "
    "immense jealous jittery jolly juicy kind lazy little lively lonely lucky magnificent melodic "
    "misty modern mushy mysterious narrow nervous nimble noisy obedient odd old orange panicky "
    "plain polite precious proud puzzled quaint quick quiet rapid rare ripe rotten rough round "
    "rustic salty scary shaggy shallow shiny silent silly sleepy slimy smooth soggy sparkling "
    "spicy spotless squeaky steep sticky stormy striped sturdy swift tame tasty tender thirsty "
    "tidy tiny tough tricky ugly uneven upbeat vast victorious vivacious wandering wealthy weary "
    "whimsical wide wiggly wise witty wooden worried zany zealous"
).split()
_NOUNS = (
    "account actor airport anchor animal apple arch arm army attic baby badge bakery balloon "
    "banana basket bath battle beach bear bed bee bell bicycle bird blanket boat bone book boot "
    "bottle box brain branch bread brick bridge brush bubble bucket butter button cabin cake "
    "camera camp candle canoe canvas card carpet castle cat cave chain chair chalk cheese cherry "
    "chicken church circle city clock cloud coast coat coffee comb comet copper corn cottage cow "
    "crayon crow crown cup curtain cushion desk diamond dinosaur doctor dog door dragon drawer "
    "drum duck eagle earth egg elbow engine eye fairy farm feather fence field finger fire fish "
    "flag flame flower flute fog forest fork fountain frog garden garlic gate ghost giraffe glass "
    "glove goat gold grape guitar hammer harbor hat hill horse house island jacket jelly jewel "
    "kettle key kitten kite knee knife ladder lake lamp lantern leaf lemon library lion lizard "
    "lock magnet map marble meadow mirror monkey moon mountain mouse mushroom needle nest ocean "
    "onion orchard owl oyster paint palace pancake parrot peach pearl pencil pepper piano pillow "
    "pirate planet plate pocket pond potato pumpkin puppet queen rabbit radio rainbow river robot "
    "rocket roof rose sail salad sandwich saucer scarf school scissors seed shadow sheep shell "
    "ship shoe silver skate sky snail snake sock soup spider spoon squirrel stamp star station "
    "stone storm stove street sugar sunflower swan sweater table teapot temple tent thunder tiger "
    "toast tomato tower town toy tractor train tree trumpet tulip tunnel turtle umbrella valley "
    "vase violin volcano wagon wall watch waterfall whale wheel whistle window wolf yacht zebra"
).split()


@dataclass
class Sample:
    """One prompt with its reference answers.

    ``context`` (instructions + haystack) and ``question`` are kept apart so a runner can wrap them
    in a chat template; ``prompt`` is the plain concatenation whose length was controlled.
    ``metadata["answer_prefix"]`` is RULER's answer prefix (appended after the assistant turn
    starts). Needle placements are in ``metadata["needles"]`` (char and token offsets).
    """

    task: str
    target_length: int
    depth: float | None
    context: str
    question: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    SEPARATOR = "\n"

    @property
    def prompt(self) -> str:
        """Context and question as one plain-text prompt (what the token length refers to)."""
        return self.context + self.SEPARATOR + self.question

    @property
    def answer_prefix(self) -> str:
        return str(self.metadata.get("answer_prefix", ""))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Sample fields: {sorted(unknown)}")
        kw = dict(d)
        kw["answers"] = list(kw.get("answers", []))
        kw["metadata"] = dict(kw.get("metadata", {}))
        return cls(**kw)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder, RULER's default haystack (None: no prose haystack, the
    ``haystack`` argument is ignored) and whether samples have a needle depth."""

    name: str
    build: Callable[["_Ctx"], Sample]
    default_haystack: str | None
    has_depth: bool
    description: str


@dataclass
class _Ctx:
    task: str
    tokenizer: TokenizerLike
    length: int
    depth: float | None
    seed: int
    index: int
    rng: random.Random
    source: HaystackSource | None
    haystack_name: str | None
    tolerance: float
    cache: dict[str, int] = field(default_factory=dict)

    def count(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def sub_rng(self, tag: str) -> random.Random:
        """A fresh generator for one purpose: rebuilding with another budget replays it exactly."""
        return random.Random(f"dashkv:{self.task}:{self.seed}:{self.index}:{tag}")

    def too_short(self, need: int, what: str) -> ValueError:
        return ValueError(
            f"length {self.length} is too small for task {self.task!r}: {what} take about "
            f"{need} tokens; use a length of at least {need + 16}"
        )


# --------------------------------------------------------------------------------------------
# value generators


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _unique(gen: Callable[[random.Random], str], rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        v = gen(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


_CONS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_words(rng: random.Random) -> Iterator[str]:
    """Endless unique pronounceable 6-letter words (CVCVCV). Equal lengths mean no word is a
    substring of another, which keeps substring scoring honest."""
    seen: set[str] = set()
    while True:
        w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(3))
        if w not in seen:
            seen.add(w)
            yield w


# --------------------------------------------------------------------------------------------
# length fitting and needle insertion


def _fit(
    ctx: _Ctx, build: Callable[[int], tuple[str, str, Any]], budget: int
) -> tuple[str, str, Any, int]:
    """Find a content budget whose prompt lands in [length*(1-tolerance), length] tokens.

    Returns the longest prompt tried that fits (normally within a third of the tolerance).

    ``build(budget)`` must be deterministic and roughly one token per budget unit; each try
    measures the whole prompt once, and the budget is corrected by the miss (2-3 tries usually).
    """
    slack = max(1, int(ctx.tolerance * ctx.length))
    # aim well inside the allowed window so the few-try loop rarely ends near its lower edge
    lo, target = ctx.length - max(1, slack // 3), ctx.length - max(1, slack // 6)
    best: tuple[str, str, Any, int] | None = None
    tried: set[int] = set()
    for _ in range(10):
        if budget < 1 or budget in tried:
            break
        tried.add(budget)
        context, question, payload = build(budget)
        n = ctx.count(context + Sample.SEPARATOR + question)
        if n <= ctx.length and (best is None or n > best[3]):
            best = (context, question, payload, n)
        if lo <= n <= ctx.length:
            break
        step = target - n
        budget += step if step != 0 else -1
    if best is None:
        raise ValueError(
            f"length {ctx.length} is too small for task {ctx.task!r}: could not fit the prompt"
        )
    return best


@dataclass
class _Needle:
    text: str
    depth: float
    info: dict[str, Any]


def _depth_grid(rng: random.Random, k: int) -> list[float]:
    """RULER draws needle depths from 40 evenly spaced points in [0, 1]."""
    grid = [i / 39 for i in range(40)]
    return [rng.choice(grid) for _ in range(k)]


def _needle_sample(
    ctx: _Ctx,
    *,
    preamble: str,
    question: str,
    answer_prefix: str,
    answers: list[str],
    needles: list[_Needle],
    extra: dict[str, Any] | None = None,
) -> Sample:
    """Fill the haystack to length and insert needles at their depths (between chunks)."""
    assert ctx.source is not None
    fixed = ctx.count(preamble + "\n" + Sample.SEPARATOR + question) + sum(ctx.count(n.text) + 1 for n in needles)
    if fixed + 16 > ctx.length:
        raise ctx.too_short(fixed, "the instructions, question and needles")
    head = preamble + "\n"
    order = sorted(range(len(needles)), key=lambda i: needles[i].depth)

    def build(budget: int) -> tuple[str, str, Any]:
        chunks, counts = _fill(ctx.source, ctx.tokenizer, budget, ctx.sub_rng("haystack"), ctx.cache)
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c)
        total = cum[-1]
        slots: dict[int, list[int]] = {}
        placed: dict[int, tuple[int, float]] = {}
        for i in order:
            target = needles[i].depth * total
            j = min(range(len(cum)), key=lambda j: (abs(cum[j] - target), j))
            slots.setdefault(j, []).append(i)
            placed[i] = (j, cum[j] / total if total else 0.0)
        parts: list[str] = []
        offsets: dict[int, int] = {}
        pos = len(head)
        for j in range(len(chunks) + 1):
            for i in slots.get(j, []):
                offsets[i] = pos
                parts.append(needles[i].text)
                pos += len(needles[i].text) + 1
            if j < len(chunks):
                parts.append(chunks[j])
                pos += len(chunks[j]) + 1
        context = head + " ".join(parts)
        return context, question, (offsets, placed, total)

    est = ctx.length - fixed
    context, question, (offsets, placed, total), n = _fit(ctx, build, est)
    prompt = context + Sample.SEPARATOR + question
    meta_needles = []
    for i, nd in enumerate(needles):
        off = offsets[i]
        assert context[off : off + len(nd.text)] == nd.text
        meta_needles.append(
            {
                "text": nd.text,
                "char_offset": off,
                "token_offset": ctx.count(prompt[:off]),
                "depth": nd.depth,
                "depth_actual": placed[i][1],
                **nd.info,
            }
        )
    meta: dict[str, Any] = {
        "answer_prefix": answer_prefix,
        "haystack": ctx.haystack_name,
        "prompt_tokens": n,
        "haystack_tokens": total,
        "haystack_token_start": ctx.count(head),
        "needles": meta_needles,
        "index": ctx.index,
    }
    meta.update(extra or {})
    return Sample(ctx.task, ctx.length, ctx.depth, context, question, answers, meta, ctx.seed)


# --------------------------------------------------------------------------------------------
# NIAH family


class _NeedleHaystack(HaystackSource):
    """RULER's 'needle' haystack: endless distractor needles with fresh keys and values."""

    def __init__(self, key_gen: Callable[[random.Random], str], val_gen: Callable[[random.Random], str],
                 type_v: str, exclude: set[str]) -> None:
        self.name = "needle"
        self.key_gen, self.val_gen, self.type_v, self.exclude = key_gen, val_gen, type_v, exclude

    def chunks(self, rng: random.Random) -> Iterator[str]:
        while True:
            k, v = self.key_gen(rng), self.val_gen(rng)
            if k in self.exclude or v in self.exclude:
                continue
            yield NEEDLE_TEMPLATE.format(type_v=self.type_v, key=k, value=v)


def _niah(
    *, key: str = "words", value: str = "numbers", num_k: int = 1, num_v: int = 1, num_q: int = 1,
    needle_haystack: bool = False,
) -> Callable[[_Ctx], Sample]:
    key_gen = _word_key if key == "words" else _uuid
    val_gen = _number if value == "numbers" else _uuid
    type_v = value  # "numbers" or "uuids", as in RULER's templates

    def build(ctx: _Ctx) -> Sample:
        rng = ctx.rng
        keys = _unique(key_gen, rng, num_k, set())
        seen: set[str] = set()
        values: list[list[str]] = []
        for _ in keys:  # values distinct across keys as well
            values.append(_unique(val_gen, rng, num_v, seen))
            seen.update(values[-1])
        queries = keys[:num_q]
        answers = [v for k, vs in zip(keys, values) if k in queries for v in vs]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        needles: list[_Needle] = []
        for k, vs in zip(keys, values):
            for v in vs:
                needles.append(_Needle(NEEDLE_TEMPLATE.format(type_v=type_v, key=k, value=v), 0.0,
                                       {"key": k, "value": v, "is_answer": k in queries}))
        # the first answer needle at the sample depth, the rest at RULER-style random depths
        assert ctx.depth is not None
        others = _depth_grid(rng, len(needles) - 1)
        needles[0].depth = ctx.depth
        for nd, d in zip(needles[1:], others):
            nd.depth = d
        if needle_haystack:
            ctx.source = _NeedleHaystack(key_gen, val_gen, type_v, set(keys) | {v for vs in values for v in vs})
            ctx.haystack_name = "needle"
        return _needle_sample(
            ctx,
            preamble=_NIAH_PREAMBLE.format(type_v=type_v),
            question=_NIAH_QUESTION.format(type_v=type_v, query=query),
            answer_prefix=_NIAH_ANSWER_PREFIX.format(type_v=type_v, query=query),
            answers=answers,
            needles=needles,
            extra={"keys": keys, "queries": queries},
        )

    return build


# --------------------------------------------------------------------------------------------
# passkey, variable tracking


def _passkey(ctx: _Ctx) -> Sample:
    key = str(ctx.rng.randint(10_000, 99_999))
    assert ctx.depth is not None
    return _needle_sample(
        ctx,
        preamble="There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize them. I will quiz you about the important information there.",
        question="What is the pass key?",
        answer_prefix=" The pass key is",
        answers=[key],
        needles=[_Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", ctx.depth, {"value": key})],
    )


def _vt(ctx: _Ctx, num_hops: int = 4) -> Sample:
    rng = ctx.rng
    names = _unique(lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), rng, num_hops + 1, set())
    value = str(rng.randint(10_000, 99_999))
    assert ctx.depth is not None
    later = sorted(ctx.depth + (1 - ctx.depth) * rng.random() for _ in range(num_hops))
    needles = [_Needle(f"VAR {names[0]} = {value}.", ctx.depth, {"variable": names[0], "hop": 0})]
    for h in range(1, num_hops + 1):
        needles.append(_Needle(f"VAR {names[h]} = VAR {names[h - 1]}.", later[h - 1],
                               {"variable": names[h], "hop": h}))
    return _needle_sample(
        ctx,
        preamble="Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, "
        f"{num_hops + 1} variables are assigned the value {value}, they are: ",
        answers=names,
        needles=needles,
        extra={"value": value},
    )


# --------------------------------------------------------------------------------------------
# aggregation tasks: cwe, fwe


def _cwe(ctx: _Ctx, num_cw: int = 10, max_freq_cw: int = 30, freq_ucw: int = 3) -> Sample:
    preamble = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.")
    question = f"Question: What are the {num_cw} most common words in the above list?"
    answer_prefix = f" Answer: The top {num_cw} words that appear most often in the list are:"
    stream = _pseudo_words(ctx.rng)
    common = [next(stream) for _ in range(num_cw)]
    probe = [next(stream) for _ in range(64)]  # also the first uncommon words
    per_entry = ctx.count(" ".join(f"{100 + i}. {w}" for i, w in enumerate(probe))) / len(probe)
    fixed = ctx.count(preamble + "\n" + Sample.SEPARATOR + question)
    entries = (ctx.length - fixed) / per_entry
    # RULER uses 30 repeats of each common word; short prompts get fewer, still > freq_ucw, so the
    # common words keep at most half of the list.
    freq_cw = min(max_freq_cw, int(entries * 0.5 / num_cw))
    min_entries = num_cw * (freq_ucw + 1) + num_cw * freq_ucw
    if freq_cw <= freq_ucw or entries < min_entries:
        raise ctx.too_short(fixed + int(min_entries * per_entry), "the instructions and a minimal word list")
    uncommon_pool = list(probe)

    def build(budget: int) -> tuple[str, str, Any]:
        n_unc = max(1, int((budget / per_entry - num_cw * freq_cw) / freq_ucw))
        while len(uncommon_pool) < n_unc:
            uncommon_pool.append(next(stream))
        words = common * freq_cw + uncommon_pool[:n_unc] * freq_ucw
        ctx.sub_rng("shuffle").shuffle(words)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return preamble + "\n" + body, question, n_unc

    context, question, n_unc, n = _fit(ctx, build, ctx.length - fixed)
    meta = {"answer_prefix": answer_prefix, "haystack": None, "prompt_tokens": n, "needles": [],
            "freq_common": freq_cw, "freq_uncommon": freq_ucw, "n_uncommon": n_unc, "index": ctx.index}
    return Sample(ctx.task, ctx.length, None, context, question, common, meta, ctx.seed)


ZETA2 = math.pi ** 2 / 6


def _fwe(ctx: _Ctx, alpha: float = 2.0, word_len: int = 6) -> Sample:
    preamble = ("Read the following coded text and track the frequency of each coded word. "
                "Find the three most frequently appeared coded words.")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
    answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    rng = ctx.rng
    vocab_size = max(100, ctx.length // 50)  # RULER: max_len // 50
    vocab = _unique(lambda r: "".join(r.choices(string.ascii_lowercase, k=word_len)), rng, vocab_size, set())
    vocab[0] = "...."  # RULER: the top-ranked "word" is noise the question says to ignore
    per_word = ctx.count(" ".join(vocab[1:65])) / 64
    # 1/zeta(2) = 61% of the words are the dots, which cost fewer tokens than a coded word
    dots = ctx.count(" ".join(["...."] * 64)) / 64
    mix = dots / ZETA2 + per_word * (1 - 1 / ZETA2)
    fixed = ctx.count(preamble + "\n" + Sample.SEPARATOR + question)
    min_words = 120  # below this the 4th and 5th ranks can tie
    if (ctx.length - fixed) / mix < min_words:
        raise ctx.too_short(fixed + int(min_words * mix), "the instructions and a minimal coded text")

    def build(budget: int) -> tuple[str, str, Any]:
        num_words = budget / mix
        counts = [int(num_words * (k ** -alpha) / ZETA2) for k in range(1, vocab_size + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        ctx.sub_rng("shuffle").shuffle(words)
        return preamble + "\n" + " ".join(words), question, counts

    context, question, counts, n = _fit(ctx, build, ctx.length - fixed)
    if not counts[1] > counts[2] > counts[3] > counts[4]:
        raise ctx.too_short(n, "a coded text with an unambiguous top three")
    meta = {"answer_prefix": answer_prefix, "haystack": None, "prompt_tokens": n, "needles": [],
            "counts": {w: c for w, c in zip(vocab[:6], counts[:6])}, "index": ctx.index}
    return Sample(ctx.task, ctx.length, None, context, question, vocab[1:4], meta, ctx.seed)


# --------------------------------------------------------------------------------------------
# registry and entry points

TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("niah_single_1", _niah(), "noise", True, "noise haystack, word key, 7-digit number"),
        TaskSpec("niah_single_2", _niah(), "essays", True, "essay haystack, word key, 7-digit number"),
        TaskSpec("niah_single_3", _niah(value="uuids"), "essays", True, "essay haystack, word key, UUID"),
        TaskSpec("niah_multikey_1", _niah(num_k=4), "essays", True,
                 "4 needles with different keys in essays, one asked"),
        TaskSpec("niah_multikey_2", _niah(needle_haystack=True), None, True,
                 "haystack made of distractor needles, word keys, numbers"),
        TaskSpec("niah_multikey_3", _niah(key="uuids", value="uuids", needle_haystack=True), None, True,
                 "haystack made of distractor needles, UUID keys and values"),
        TaskSpec("niah_multivalue", _niah(num_v=4), "essays", True, "one key with 4 values, all asked"),
        TaskSpec("niah_multiquery", _niah(num_k=4, num_q=4), "essays", True, "4 keys asked at once"),
        TaskSpec("vt", _vt, "noise", True, "variable tracking: one chain of 5 variables"),
        TaskSpec("cwe", _cwe, None, False, "common-word extraction: the 10 most repeated words"),
        TaskSpec("fwe", _fwe, None, False, "frequent-word extraction: 3 most frequent coded words (Zipf)"),
        TaskSpec("passkey", _passkey, "noise", True, "pass key in filler text"),
    ]
}


def _check_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[task]


def sample_depths(n_samples: int) -> list[float]:
    """Depths spread evenly over [0, 1]: i / (n - 1); a single sample goes to the middle."""
    if n_samples == 1:
        return [0.5]
    return [i / (n_samples - 1) for i in range(n_samples)]


def _validate(task: str, tokenizer: TokenizerLike, length: int, tolerance: float) -> TaskSpec:
    spec = _check_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError("tokenizer must have encode(text, add_special_tokens=False) -> list[int]")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    return spec


def make_sample(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    *,
    seed: int = 0,
    index: int = 0,
    depth: float | None = 0.5,
    haystack: str | HaystackSource | None = None,
    tolerance: float = 0.03,
) -> Sample:
    """Build one sample; ``(task, length, seed, index, depth, haystack)`` fully determine it."""
    spec = _validate(task, tokenizer, length, tolerance)
    return _make(spec, tokenizer, length, seed, index, depth, haystack, tolerance)


def _make(spec: TaskSpec, tokenizer: TokenizerLike, length: int, seed: int, index: int,
          depth: float | None, haystack: str | HaystackSource | None, tolerance: float,
          source: HaystackSource | None = None) -> Sample:
    if spec.has_depth:
        depth = 0.5 if depth is None else float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    else:
        depth = None
    if source is None and spec.default_haystack is not None:
        source = get_haystack(haystack if haystack is not None else spec.default_haystack)
    ctx = _Ctx(
        task=spec.name, tokenizer=tokenizer, length=length, depth=depth, seed=seed, index=index,
        rng=random.Random(f"dashkv:{spec.name}:{seed}:{index}"), source=source,
        haystack_name=source.name if source is not None else None, tolerance=tolerance,
    )
    return spec.build(ctx)


def make_samples(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    n_samples: int,
    *,
    seed: int = 0,
    haystack: str | HaystackSource | None = None,
    tolerance: float = 0.03,
) -> list[Sample]:
    """``n_samples`` prompts of ``length`` tokens (within ``tolerance`` below) for ``task``.

    ``haystack`` (a :func:`get_haystack` spec) replaces the prose haystack of the tasks that have
    one (niah_single_*, niah_multikey_1, niah_multivalue, niah_multiquery, vt, passkey); None means
    RULER's default per task. niah_multikey_2/3, cwe and fwe build their own haystacks and ignore
    it. Depths are ``i / (n - 1)``. Deterministic for ``seed``.
    """
    spec = _validate(task, tokenizer, length, tolerance)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    source = None
    if spec.default_haystack is not None:
        source = get_haystack(haystack if haystack is not None else spec.default_haystack)
    depths = sample_depths(n_samples) if spec.has_depth else [None] * n_samples
    return [
        _make(spec, tokenizer, length, seed, i, d, haystack, tolerance, source)
        for i, d in enumerate(depths)
    ]


def needle_token_positions(sample: Sample, tokenizer: TokenizerLike) -> list[int]:
    """Token offset of each needle in ``sample.prompt``, re-measured with ``tokenizer``.

    Lets tests and analyses check depths independently of what generation recorded.
    """
    prompt = sample.prompt
    return [count_tokens(tokenizer, prompt[: n["char_offset"]]) for n in sample.metadata.get("needles", [])]
