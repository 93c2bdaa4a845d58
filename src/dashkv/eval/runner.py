"""`dashkv eval`: every method on the same prompts, at equal budget, resumable.

Cost model: prefill is dense and identical for every method, so each sample is prefilled ONCE (with
the prompt's last token held back) while capturing what the policies need (K, V per layer; H2O's
accumulated prefill attention and SnapKV's observation-window votes, computed once, chunked). Every
(method, budget) then decodes from its own copy of that prefilled cache: managed layers are refilled
through `DashKVLayer.update`, so key codes are encoded by that method's encoders, and the policy's
prefill statistics are copied into the layer state. Greedy decoding feeds the held-back prompt token
first, so *every* generated token, the first included, comes from the method's sparse decode path.
"dense" runs the unmodified model (DASH-KV disabled) from a plain DynamicCache copy.

Outputs under OUT: results.jsonl (one line per task, length, sample, method, budget; rows already
there are skipped on restart), summary.csv, summary.md, accuracy_vs_budget.png,
accuracy_vs_length.png.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..config import DashKVConfig, parse_budget, resolve_bits
from ..selection import METHODS, POLICIES, SelectionPolicy, SnapKVPolicy
from .longbench import LONGBENCH_TASKS, MAX_NEW_TOKENS_LB, make_longbench_sample
from .fidelity import (DEFAULT_POSITIONS, FIDELITY_KINDS, FIDELITY_TASKS, compare_logprobs, make_fidelity_documents,
                       teacher_forced_logprobs)
from .perplexity import DEFAULT_CONTINUATION, PERPLEXITY_TASK, make_documents, teacher_forced_nll
from .scoring import score_sample
from .tasks import TASKS, Sample, make_sample, sample_depths

__all__ = [
    "EvalPlan", "validate_plan", "eval_command", "run_eval", "prefill_once", "Prefilled", "decode_method",
    "greedy_decode", "build_prompt_ids", "load_results", "row_key", "write_summary", "VALID_TASKS",
    "MAX_NEW_TOKENS", "budget_label",
]

VALID_TASKS = tuple(TASKS) + tuple(LONGBENCH_TASKS) + (PERPLEXITY_TASK,) + FIDELITY_TASKS
#: Methods the evaluation knows: the selection policies, plus "simhash_asym" (random hyperplanes scored
#: with the asymmetric scorer; the policy arrives with the reliability branch, see `validate_plan`).
EVAL_METHODS = tuple(dict.fromkeys(METHODS + ("simhash_asym",)))
#: Methods that score with random-hyperplane codes (built once per run, seed 0).
SIMHASH_METHODS = ("simhash", "simhash_asym")
LEARNED_METHODS = ("dashkv", "dashkv_rerank")  # methods that decode with the calibrated encoders
PREFILL_DTYPES = ("fp32", "bf16")
DENSE = "dense"
FULL = "full"  # budget label of the dense rows

#: Tokens generated per answer (RULER uses 128 for niah, 30 vt, 120 cwe, 50 fwe; these fit the answers).
MAX_NEW_TOKENS = {
    "niah_single_1": 14, "niah_single_2": 14, "niah_single_3": 40,
    "niah_multikey_1": 14, "niah_multikey_2": 14, "niah_multikey_3": 40,
    "niah_multivalue": 56, "niah_multiquery": 56,
    "vt": 40, "cwe": 80, "fwe": 24, "passkey": 12, **MAX_NEW_TOKENS_LB,
}
#: Tasks with one short answer: stop at the first newline after some text.
NEWLINE_STOP = frozenset({"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                          "niah_multikey_2", "niah_multikey_3", "passkey",
                          # LongBench-style answers are one number on the first line (LongBench itself does not
                          # stop there; its scorer reads every number, so later lines could only lower the score)
                          "lb_passage_retrieval", "lb_passage_count",
                          # the few-shot label is read from the first line only (LongBench's trec post-processing)
                          "lb_fewshot"})


# ---- plan and validation ---------------------------------------------------------------------------
def budget_label(b: float | int) -> str:
    """Canonical label: token counts as digits, fractions as 1/16 where exact, else a decimal."""
    if isinstance(b, int):
        return str(b)
    if b == 1.0:
        return "1"
    f = Fraction(b).limit_denominator(4096)
    if abs(float(f) - b) < 1e-12 and f.numerator == 1:
        return f"1/{f.denominator}"
    return f"{b:.6g}"


@dataclass
class EvalPlan:
    model: str
    encoders: str | None
    methods: list[str]
    budgets: list[float | int]
    tasks: list[str]
    lengths: list[int]
    samples: int
    haystack: str | None
    out: Path
    seed: int = 0
    bits: int = 64
    max_new_tokens: int | None = None  # None: per task (MAX_NEW_TOKENS)
    continuation: int = DEFAULT_CONTINUATION
    chat: bool = True
    progress: bool = True
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: more (methods, budgets) on the same prefills: "dense,dashkv,oracle,snapkv@1/8,1/32"
    also: list[tuple[list[str], list[float | int]]] = field(default_factory=list)
    prefill_dtype: str = "fp32"
    positions: int = DEFAULT_POSITIONS  # teacher-forced positions per fidelity document

    @property
    def all_methods(self) -> list[str]:
        return list(dict.fromkeys(self.methods + [m for ms, _ in self.also for m in ms]))

    @property
    def sparse_methods(self) -> list[str]:
        return [m for m in self.all_methods if m != DENSE]

    @property
    def all_budgets(self) -> list[float | int]:
        return list(dict.fromkeys(self.budgets + [b for _, bs in self.also for b in bs]))

    def cells(self) -> list[tuple[str, str]]:
        """(method, budget label) decoded per sample: dense once, every other method per budget, then the
        `also` cells (deduplicated), all from the same prefill."""
        groups = [(self.methods, self.budgets)] + list(self.also)
        out = [(DENSE, FULL)] if DENSE in self.all_methods else []
        for methods, budgets in groups:
            out += [(m, budget_label(b)) for m in methods if m != DENSE for b in budgets]
        return list(dict.fromkeys(out))

    def config(self, budget: float | int, method: str | None = None) -> DashKVConfig:
        """The decode configuration of `method` at `budget`. "simhash" always scores by symmetric Hamming
        distance and "simhash_asym" by the asymmetric scorer, on every path: the fused kernel takes the
        scorer from this (enabling) configuration, not from the policy."""
        # min_context 0: the evaluation measures selection at every length (min_context is a speed knob)
        cfg = DashKVConfig(**{"min_context": 0, **self.config_overrides, "budget": budget, "bits": self.bits})
        if method == "simhash":
            cfg = DashKVConfig(**{**cfg.to_dict(), "scorer": "hamming", "adaptive": False})
        elif method == "simhash_asym":
            cfg = DashKVConfig(**{**cfg.to_dict(), "scorer": "asymmetric", "adaptive": False})
        return cfg


def _items(value: Any, what: str) -> list[str]:
    if value is None:
        raise ValueError(f"--{what} is empty")
    items = [str(x).strip() for x in (value.split(",") if isinstance(value, str) else value)]
    items = [x for x in items if x]
    if not items:
        raise ValueError(f"--{what} is empty")
    return list(dict.fromkeys(items))  # de-duplicate, keep order


def _parse_budget(text: str) -> float | int:
    try:
        b = parse_budget(text)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a fraction (1/16, 0.0625) or a token count (512)") from None
    if isinstance(b, int):
        if b < 1:
            raise ValueError(f"budget {text!r} is out of range: a token count must be >= 1")
        return b
    if not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise ValueError(f"budget {text!r} is out of range: a fraction must be in (0, 1] (or give a token count)")
    return b


def _model_source(name: str) -> Path:
    """The directory holding the model's config and tokenizer (alias / .gguf: the cached conversion)."""
    from ..errors import DashKVError
    from ..models import DEFAULT_MODEL_ALIASES, _converted_dir, default_gguf_path

    if name.lower() in DEFAULT_MODEL_ALIASES:
        return _converted_dir(default_gguf_path(), None)
    path = Path(name).expanduser()
    if not path.exists():
        raise DashKVError(f"model not found: {path} (expected 'smollm2-135m', a .gguf file or a model directory)")
    return _converted_dir(path, None) if path.is_file() else path


def _tokenizer_only(name: str) -> Any:
    """The model's tokenizer without its weights (None if it cannot be read: checks that need it are skipped)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(_model_source(name)), local_files_only=True)
    except Exception:
        return None


#: tasks whose text must not repeat inside one prompt: the prose corpus must hold a whole window
_PROSE_WINDOW_TASKS = ("fidelity_prose", PERPLEXITY_TASK, "lb_passage_retrieval", "lb_passage_count")


def _check_inputs_with_tokenizer(tokenizer: Any, tasks: list[str], lengths: list[int], haystack: str | None,
                                 positions: int, cont: int, chat: bool = True, max_new: int | None = None) -> None:
    """Cheap checks that need the tokenizer (no weights): the haystack holds enough text, and sample 0
    of every task builds at the shortest length (a length too small for a task fails here, clearly)."""
    from .haystack import TextHaystack, get_haystack

    longest = max(lengths)
    prose = [t for t in tasks if t in _PROSE_WINDOW_TASKS or (t in TASKS and TASKS[t].default_haystack == "essays")]
    if haystack is not None and any(t in TASKS and TASKS[t].default_haystack for t in tasks):
        prose.append(haystack)
    if prose:
        src = get_haystack(haystack or "essays")
        window_tasks = [t for t in tasks if t in _PROSE_WINDOW_TASKS]
        if window_tasks and not isinstance(src, TextHaystack):
            raise ValueError(f"task {window_tasks[0]!r} needs a prose haystack (essays, jargon, files:PATH), "
                             f"not {src.name!r}")
        if isinstance(src, TextHaystack):
            text = " ".join(src.sentences[: 40 * longest])  # ample: a sentence is > 1 token
            n = len(tokenizer.encode(text[: 12 * longest], add_special_tokens=False))
            if n < longest:
                raise ValueError(f"haystack {src.name!r} is too short: about {n} tokens of text, but the longest "
                                 f"length asked is {longest} tokens (its text would repeat inside a prompt); "
                                 f"give more text or a shorter --lengths")
    shortest = min(lengths)
    for task in tasks:
        if task in FIDELITY_TASKS or task == PERPLEXITY_TASK:
            continue
        # LongBench-style pools are finite (lb_fewshot's examples fill ~8K tokens): check the longest too
        for length in sorted({shortest, longest}) if task in LONGBENCH_TASKS else [shortest]:
            try:
                if task in LONGBENCH_TASKS:  # at the length the run builds it (template, prefix, answer off)
                    inner = length - _overhead(tokenizer, task, chat, max_new or MAX_NEW_TOKENS.get(task, 32))
                    make_longbench_sample(task, tokenizer, inner, index=0, haystack=haystack,
                                          depth=0.5 if LONGBENCH_TASKS[task].has_depth else None)
                else:
                    make_sample(task, tokenizer, length - 64, index=0, haystack=haystack)
            except ValueError as exc:
                raise ValueError(f"task {task!r} at length {length}: {exc}") from None


def _model_config(name: str) -> Any:
    """The model's transformers config, read without loading weights (alias: the cached conversion)."""
    from transformers import AutoConfig

    from ..errors import DashKVError
    from ..models import DEFAULT_MODEL_ALIASES, _converted_dir, default_gguf_path

    if name.lower() in DEFAULT_MODEL_ALIASES:
        source = _converted_dir(default_gguf_path(), None)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DashKVError(f"model not found: {path} (expected 'smollm2-135m', a .gguf file or a model directory)")
        source = _converted_dir(path, None) if path.is_file() else path
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:
        raise DashKVError(f"could not read the model config of {name}: {exc}") from exc


def _check_methods(methods: list[str]) -> None:
    bad = [m for m in methods if m not in EVAL_METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; valid methods: {', '.join(EVAL_METHODS)}")
    for m in methods:
        if m != DENSE and m not in POLICIES:
            raise ValueError(f"method {m!r} is not available in this build (dashkv.selection has no {m!r} policy "
                             f"yet); drop it from --methods")


def _parse_also(specs: Any) -> list[tuple[list[str], list[float | int]]]:
    """--also "METHODS@BUDGETS" (repeatable): more cells on the same prefills."""
    out = []
    for spec in ([specs] if isinstance(specs, str) else list(specs or [])):
        if "@" not in spec:
            raise ValueError(f"--also {spec!r}: expected METHODS@BUDGETS, e.g. dense,dashkv,oracle@1/8,1/32")
        m, b = spec.split("@", 1)
        methods = _items(m, "also")
        _check_methods(methods)
        out.append((methods, list(dict.fromkeys(_parse_budget(x) for x in _items(b, "also")))))
    return out


def validate_plan(args: Any) -> EvalPlan:
    """Check every argument before any model work; raise ValueError with one clear line."""
    methods = _items(getattr(args, "methods", None), "methods")
    _check_methods(methods)
    also = _parse_also(getattr(args, "also", None))
    prefill_dtype = str(getattr(args, "prefill_dtype", "fp32") or "fp32")
    if prefill_dtype not in PREFILL_DTYPES:
        raise ValueError(f"--prefill-dtype {prefill_dtype!r}: choose {' or '.join(PREFILL_DTYPES)}")
    positions = getattr(args, "positions", None) or DEFAULT_POSITIONS
    if not isinstance(positions, int) or positions < 1:
        raise ValueError(f"--positions must be an integer >= 1, got {positions!r}")
    tasks = _items(getattr(args, "tasks", None), "tasks")
    bad = [t for t in tasks if t not in VALID_TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r}; valid tasks: {', '.join(VALID_TASKS)}")
    budgets = [_parse_budget(b) for b in _items(getattr(args, "budgets", "1/16"), "budgets")]
    budgets = list(dict.fromkeys(budgets))
    lengths = []
    for text in _items(getattr(args, "lengths", None), "lengths"):
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"length {text!r} is not an integer number of tokens") from None
        if n < 1:
            raise ValueError(f"length {n} must be >= 1 token")
        lengths.append(n)
    samples = getattr(args, "samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"--samples must be an integer >= 1, got {samples!r}")
    bits = int(resolve_bits(getattr(args, "bits", None), getattr(args, "encoders", None)))
    DashKVConfig(bits=bits)  # raises on bad bits
    mnt = getattr(args, "max_new_tokens", None)
    if mnt is not None and int(mnt) < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {mnt}")
    cont = int(getattr(args, "continuation", DEFAULT_CONTINUATION) or DEFAULT_CONTINUATION)
    haystack = getattr(args, "haystack", None)
    if haystack in (None, "", "default"):
        haystack = None
    else:
        from .haystack import get_haystack

        get_haystack(haystack)  # cheap: checks the data exists
    out = getattr(args, "out", None)
    if not out:
        raise ValueError("--out is required")
    model = str(getattr(args, "model", "smollm2-135m"))
    encoders = getattr(args, "encoders", None)
    if encoders is not None and not Path(encoders).is_dir():
        raise ValueError(f"encoders directory {encoders} does not exist")

    # the model's limits: read its config only (no weights)
    from ..models import DEFAULT_MODEL_ALIASES, model_shape

    shape = model_shape(_model_config(model))
    limit = shape.max_position_embeddings
    for n in lengths:
        if limit and n > limit:
            raise ValueError(f"length {n} exceeds the model's maximum context of {limit} tokens "
                             f"(max_position_embeddings of {model})")
    if PERPLEXITY_TASK in tasks and min(lengths) <= cont + 1:
        raise ValueError(f"length {min(lengths)} is too short for the perplexity task "
                         f"(continuation of {cont} tokens)")
    if any(t in FIDELITY_TASKS for t in tasks) and min(lengths) <= positions + 1:
        raise ValueError(f"length {min(lengths)} is too short for the fidelity tasks ({positions} scored positions)")
    all_methods = list(dict.fromkeys(methods + [m for ms, _ in also for m in ms]))
    qbits = getattr(args, "query_bits", None)
    defaults = DashKVConfig().to_dict()
    overrides: dict[str, Any] = {}
    for name, kind in OVERRIDE_FIELDS.items():
        value = getattr(args, name, None)
        if value and name != "group_score" and kind(value) != defaults.get(name):
            overrides[name] = kind(value)
    group_score = getattr(args, "group_score", None)
    if group_score:
        try:
            resolved = DashKVConfig(**overrides).effective_group_score
        except ValueError:
            resolved = None  # reported below with the override that caused it
        if group_score != resolved:  # what the configuration would rank by anyway is no override
            overrides["group_score"] = group_score
    if overrides:
        try:
            DashKVConfig(**overrides)
        except ValueError as e:
            raise ValueError(f"--query-bits / --lowprec-fraction / --successors / --group-score / --rerank-bits: {e}") from None
    if qbits and "dashkv_rerank" not in all_methods and not any(m in ("dashkv", "simhash_asym") for m in all_methods):
        raise ValueError("--query-bits changes the asymmetric code scan only: add dashkv, dashkv_rerank or "
                         "simhash_asym to --methods")
    if any(m in LEARNED_METHODS for m in all_methods) and encoders is None:
        from ..hf import _DEFAULT_ENCODERS

        default_dir = _DEFAULT_ENCODERS / f"smollm2-135m-b{bits}"
        if model.lower() not in DEFAULT_MODEL_ALIASES or not default_dir.is_dir():
            raise ValueError(f"method 'dashkv' needs encoders: pass --encoders DIR (from `dashkv calibrate`) or "
                             f"drop dashkv from --methods (no shipped encoders at {default_dir} for {model})")
    if encoders is not None:
        from ..encoders import HashEncoders

        HashEncoders.from_pretrained(encoders).check_compatible(shape, bits=bits)
    tokenizer = _tokenizer_only(model)
    if tokenizer is not None:
        _check_inputs_with_tokenizer(tokenizer, tasks, lengths, haystack, positions, cont,
                                     chat=not getattr(args, "no_chat", False),
                                     max_new=None if mnt is None else int(mnt))
    return EvalPlan(model=model, encoders=encoders, methods=methods, budgets=budgets, tasks=tasks, lengths=lengths,
                    samples=samples, haystack=haystack, out=Path(out), seed=int(getattr(args, "seed", 0) or 0),
                    bits=bits, max_new_tokens=None if mnt is None else int(mnt), continuation=cont,
                    chat=not getattr(args, "no_chat", False), progress=not getattr(args, "quiet", False),
                    also=also, prefill_dtype=prefill_dtype, positions=positions,
                    config_overrides=overrides)


# ---- prompts ---------------------------------------------------------------------------------------
def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt_ids(tokenizer: Any, sample: Sample, chat: bool = True) -> list[int]:
    """Token ids of the prompt: chat template around context + question (if the tokenizer has one),
    then RULER's answer prefix opening the assistant turn."""
    prefix = sample.answer_prefix
    if chat and _has_chat_template(tokenizer) and not sample.metadata.get("no_chat"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True,
                                             tokenize=False)
        text += prefix.lstrip()
    else:
        text = sample.prompt + prefix
    return list(tokenizer.encode(text, add_special_tokens=False))


def _overhead(tokenizer: Any, task: str, chat: bool, max_new: int) -> int:
    """Tokens the template, answer prefix and answer add on top of the sample (RULER subtracts them too)."""
    probe = Sample(task, 0, None, "", "", ["x"], {"answer_prefix": _answer_prefix_guess(task)})
    return len(build_prompt_ids(tokenizer, probe, chat)) + max_new + 4


def _answer_prefix_guess(task: str) -> str:
    # the longest RULER answer prefixes are ~25 tokens; measured exactly once a sample exists
    return " The special magic numbers for whimsical-watermelon-xxxxxxxx mentioned in the provided text are"


def _complete(task: str, answers: Sequence[str] | None):
    """Early exit once the string-match score is 1: more text can only add matches, so the score of the
    truncated prediction equals that of the full generation (saves the tokens after a correct answer)."""
    if not answers:
        return None
    if task == "lb_code":  # the scorer reads the first code line: stop once that line is complete
        return _first_code_line_done
    if task in LONGBENCH_TASKS:  # more numbers can lower LongBench's scores: no early exit by score
        return None
    return lambda text: score_sample(task, text, answers) >= 1.0


def _first_code_line_done(text: str) -> bool:
    """True once a line that LongBench's code_sim_score would pick is followed by a newline."""
    lines = text.lstrip("\n").split("\n")
    for line in lines[:-1]:  # complete lines only
        if "`" not in line and "#" not in line and "//" not in line:
            return True
    return False


def _max_new(plan: EvalPlan, task: str) -> int:
    if task == PERPLEXITY_TASK:
        return plan.continuation
    if task in FIDELITY_TASKS:
        return plan.positions
    return plan.max_new_tokens or MAX_NEW_TOKENS.get(task, 32)


# ---- prefill once, with the statistics every policy needs ------------------------------------------
class _PrefillCapture(SelectionPolicy):
    """Not a selection policy: rides the prefill's `on_prefill` hook to record H2O / SnapKV statistics."""

    name = "capture"

    def __init__(self, config: DashKVConfig, want_acc: bool, want_votes: bool):
        super().__init__(config)
        self.want_acc, self.want_votes = want_acc, want_votes

    @torch.autocast("cpu", enabled=False)
    def on_prefill(self, state, query, keys, scaling, start):
        if self.want_acc or self.want_votes:
            acc, tail = prefill_attention_stats(query, keys, scaling, start, want_acc=self.want_acc,
                                                last=SnapKVPolicy.observe_window if self.want_votes else None)
            if acc is not None:
                state.stats["acc"] = acc
            if tail is not None:
                state.stats["votes"] = SnapKVPolicy.pool_votes(tail, min(SnapKVPolicy.observe_window,
                                                                         query.shape[2]))

    def score(self, state, query, keys, scaling):  # pragma: no cover - never selects
        raise RuntimeError("the prefill capture policy does not select")


def prefill_attention_stats(query: torch.Tensor, keys: torch.Tensor, scaling: float, start: torch.Tensor | None,
                            *, want_acc: bool, last: int | None, chunk: int | None = None
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One chunked causal pass: attention summed per key over all prompt queries (H2O, when `want_acc`)
    and over the last `last` queries (SnapKV's observation window, unpooled). Each chunk of queries
    reads only the keys it can see and masks only its diagonal block, in place, so the pass costs about
    half an N x N matrix and three memory sweeps over it."""
    b, hq, lq, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    off = n - lq
    if chunk is None:  # ~240 MB of probabilities per chunk at most
        chunk = max(64, min(1024, int(6e7 // max(1, b * hq * n))))
    tail_start = lq if last is None else max(0, lq - last)
    first = 0 if want_acc else tail_start
    acc = torch.zeros(b, hkv, n) if want_acc else None
    tail = torch.zeros(b, hkv, n) if last is not None else None
    kf = keys.float()
    invalid = None if start is None else torch.arange(n)[None, :] < start[:, None]  # (B, N) left padding
    for s in range(first, lq, chunk):
        e = min(lq, s + chunk)
        kend = e + off
        q = query[:, :, s:e].float().reshape(b, hkv, g * (e - s), d) * scaling
        p = torch.matmul(q, kf[:, :, :kend].transpose(-1, -2)).view(b, hkv, g, e - s, kend)
        tri = torch.ones(e - s, e - s, dtype=torch.bool).triu_(1)  # future keys inside the diagonal block
        p[..., s + off:kend].masked_fill_(tri, float("-inf"))
        if invalid is not None:
            p.masked_fill_(invalid[:, None, None, None, :kend], float("-inf"))
        p.sub_(p.amax(-1, keepdim=True)).exp_()
        p.div_(p.sum(-1, keepdim=True))
        if invalid is not None:
            p.nan_to_num_(0.0)
        if acc is not None:
            acc[..., :kend] += p.sum((2, 3))
        if tail is not None and e > tail_start:
            tail[..., :kend] += p[:, :, :, max(0, tail_start - s):].sum((2, 3))
    return acc, tail


def snapkv_pool(votes: torch.Tensor) -> torch.Tensor:
    """SnapKV's votes from the window attention sums, exactly as `SnapKVPolicy.on_prefill`."""
    return SnapKVPolicy.pool_votes(votes)


@dataclass
class Prefilled:
    """A prefilled prompt (all but its last token): per layer the K/V (full-attention layers) or the
    layer object itself (sliding-window layers), plus H2O / SnapKV statistics per managed layer."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    other: dict[int, Any]
    stats: dict[int, dict[str, torch.Tensor]]
    last_id: int
    tokens: int  # prefilled tokens
    seconds: float
    cpu_seconds: float = 0.0  # process CPU time of the prefill and its capture


@torch.inference_mode()
def prefill_once(model: Any, ids: Sequence[int], methods: Iterable[str], bits: int = 64,
                 config_overrides: dict[str, Any] | None = None, dtype: str = "fp32") -> Prefilled:
    """Dense prefill of `ids[:-1]` through the DASH-KV attention path, capturing what `methods` need.

    dtype "bf16": the prefill's matmuls run under CPU autocast to bfloat16 (AMX where present); the
    cached K/V are stored back as float32, so every decode step is fp32 as with an fp32 prefill. The
    H2O / SnapKV statistics are computed in fp32 either way (autocast is off inside the capture)."""
    from .. import hf
    from ..cache import DashKVLayer

    methods = set(methods)
    cfg = DashKVConfig(budget=1.0, bits=bits, **(config_overrides or {}))
    handle = hf.enable(model, None, cfg, method="streaming")
    handle.policy = _PrefillCapture(cfg, want_acc="h2o" in methods, want_votes="snapkv" in methods)
    if dtype not in PREFILL_DTYPES:
        raise ValueError(f"prefill dtype {dtype!r}: choose {' or '.join(PREFILL_DTYPES)}")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        cache = handle.new_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(input_ids=torch.tensor([list(ids[:-1])]), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        hf.disable(model)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    kv, other, stats = {}, {}, {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DashKVLayer):
            kv[i] = (layer.keys.float(), layer.values.float())
            if layer.managed:  # dense layers keep K/V in place too, but no policy statistics
                stats[i] = dict(layer.state.stats)
        elif type(layer).__name__ == "DynamicLayer":
            kv[i] = (layer.keys.float(), layer.values.float())
        else:
            for name in ("keys", "values"):  # sliding-window layers: fp32 like the rest
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                    setattr(layer, name, t.float())
            other[i] = layer
    return Prefilled(kv, other, stats, int(ids[-1]), len(ids) - 1, seconds, cpu_seconds)


def _fill_cache(cache: Any, pre: Prefilled) -> None:
    from ..cache import DashKVLayer

    for i in range(len(cache.layers)):
        dst = cache.layers[i]
        if i in pre.kv:
            k, v = pre.kv[i]
            dst.update(k, v)  # DashKVLayer: encodes this method's key codes; DynamicLayer: copies
            if isinstance(dst, DashKVLayer):
                dst.state.stats.update({name: t.clone() for name, t in pre.stats.get(i, {}).items()})
        else:
            cache.layers[i] = copy.deepcopy(pre.other[i])


def _newline_after_content(text: str) -> bool:
    """True once a newline follows some letter or digit (a leading ':' or blank line is not an answer)."""
    m = re.search(r"[0-9A-Za-z]", text)
    return m is not None and "\n" in text[m.end():]


@torch.inference_mode()
def greedy_decode(model: Any, cache: Any, last_id: int, max_new_tokens: int, stop_ids: Iterable[int] = (),
                  tokenizer: Any = None, newline_stop: bool = False, done: Any = None) -> list[int]:
    """Greedy tokens after feeding `last_id` into `cache`; stops at a stop id, a newline (after some
    text, with `newline_stop`), when `done(text)` says the answer is complete, or after `max_new_tokens`.
    Stop ids are not returned."""
    stop = set(stop_ids)
    out: list[int] = []
    prev = last_id
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([[prev]]), cache=cache, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        if tokenizer is not None and (newline_stop or done is not None):
            text = tokenizer.decode(out, skip_special_tokens=True)
            if (newline_stop and _newline_after_content(text)) or (done is not None and done(text)):
                break
        prev = nxt
    return out


@dataclass
class DecodeResult:
    tokens: list[int]
    read_fraction: float
    seconds: float
    nll: list[float] | None = None
    logprobs: torch.Tensor | None = None  # (T, V), teacher-forced with logprobs=True


def decode_method(model: Any, pre: Prefilled, method: str, config: DashKVConfig, encoders: Any = None, *,
                  max_new_tokens: int = 16, stop_ids: Iterable[int] = (), tokenizer: Any = None,
                  newline_stop: bool = False, targets: Sequence[int] | None = None, track: bool = True,
                  done: Any = None, logprobs: bool = False) -> tuple[DecodeResult, Any]:
    """Decode one method from a fresh copy of the prefilled cache. `targets`: teacher-forced NLL instead
    of greedy generation. Returns the result and the handle (None for dense; already disabled)."""
    from transformers.cache_utils import DynamicCache

    from .. import hf

    handle = None
    if method == DENSE:
        hf.disable(model)
        cache = DynamicCache(config=model.config)
    else:
        handle = hf.enable(model, encoders, config, method=method, track=track)
        cache = handle.new_cache()
    try:
        _fill_cache(cache, pre)
        t0 = time.perf_counter()
        lp = None
        if targets is not None and logprobs:
            lp = teacher_forced_logprobs(model, cache, pre.last_id, targets)
            t = torch.tensor(list(targets), dtype=torch.long)
            nll = (-lp.gather(-1, t[:, None])[:, 0]).tolist()
            tokens: list[int] = []
        elif targets is not None:
            nll = teacher_forced_nll(model, cache, pre.last_id, targets)
            tokens = []
        else:
            nll = None
            tokens = greedy_decode(model, cache, pre.last_id, max_new_tokens, stop_ids, tokenizer, newline_stop,
                                   done)
        seconds = time.perf_counter() - t0
    finally:
        if handle is not None:
            hf.disable(model)
    frac = 1.0 if handle is None or handle.stats is None else handle.stats.fraction
    return DecodeResult(tokens, frac, seconds, nll, lp), handle


def _fidelity_decode(model: Any, pre: Prefilled, method: str, config: DashKVConfig, encoders: Any,
                     targets: Sequence[int]) -> tuple[torch.Tensor, DecodeResult]:
    """Teacher-forced (T, V) log-probabilities of one method from a fresh copy of the prefill."""
    res, _ = decode_method(model, pre, method, config, encoders, targets=targets, logprobs=True)
    return res.logprobs, res


# ---- results file ------------------------------------------------------------------------------------
KEY_FIELDS = ("model", "seed", "task", "length", "index", "method", "budget")


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(str(row[f]) for f in KEY_FIELDS)


def load_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl; a torn last line (a killed run) is cut off so appends stay valid."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    rows = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- the run -----------------------------------------------------------------------------------------
def stop_ids(tokenizer: Any, model: Any) -> set[int]:
    """End-of-answer token ids: the tokenizer's and the model's EOS and the usual chat end markers."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return ids


def _encoders_for(plan: EvalPlan, model: Any) -> dict[str, Any]:
    """Encoders per code-using method, built once (not at every enable)."""
    from ..encoders import HashEncoders
    from ..hf import default_encoders
    from ..models import model_shape

    shape = model_shape(model)
    out: dict[str, Any] = {}
    learned = [m for m in LEARNED_METHODS if m in plan.all_methods]
    if learned:
        enc = HashEncoders.from_pretrained(plan.encoders) if plan.encoders else default_encoders(shape, plan.bits)
        if enc is None:
            raise ValueError("method 'dashkv' needs encoders for this model: pass --encoders DIR")
        out.update({m: enc for m in learned})
    wanted = [m for m in SIMHASH_METHODS if m in plan.all_methods]
    if wanted:
        cfg = plan.config(1.0)
        layers = [i for i in shape.full_attention_layers if i not in cfg.dense_layers]
        enc = HashEncoders.simhash(shape.to_dict(), plan.bits, layers, seed=0)
        out.update({m: enc for m in wanted})  # the same hyperplanes for both scorers
    return out


def _check_same_encoders(rows: list[dict[str, Any]], digests: dict[str, str | None], path: Path) -> None:
    """Refuse to resume a sweep whose rows of a learned method were decoded with other encoder weights than
    this run's for that method (`digests`: method -> weights sha256, None for encoders built in memory,
    compared as "unrecorded"): one table must not mix two encoder sets under one method name."""
    for method, digest in digests.items():
        now = digest or "unrecorded"
        other = {r.get("encoders_sha256") or "unrecorded" for r in rows if r.get("method") == method} - {now}
        if other:
            raise ValueError(f"{path} has {method} rows decoded with other encoder weights (sha256 "
                             f"{sorted(other)[0][:12]}..., now {now[:12]}...): write this run to a new --out "
                             "directory")


#: configuration fields `dashkv eval` may override for every method (`--query-bits ...`), with their types:
#: rows made with other values are other methods in the tables, and a sweep keeps one set of them
OVERRIDE_FIELDS = {"query_bits": int, "lowprec_fraction": float, "successors": int, "group_score": str,
                   "rerank_bits": int}


#: What DASH-KV's candidate sets ranked by before `group_score` defaulted to None (probability where it
#: combines; stop 22): the group score of rows whose record and sweep do not say.
LEGACY_GROUP_SCORE = "sum"
#: Methods whose selection the group score can change (the code scans), with the fields their policy forces.
GROUP_SCORED = {"dashkv": {}, "dashkv_rerank": {}, "simhash_asym": {}, "simhash": {"scorer": "hamming"}}


def sweep_config(results: Path) -> dict[str, Any] | None:
    """The DashKVConfig fields a sweep's run.json (beside `results`) recorded, or None without one."""
    try:
        cfg = json.loads((results.parent / "run.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def row_overrides(method: str, recorded: dict[str, Any] | None, sweep: dict[str, Any] | None) -> dict[str, Any]:
    """The configuration overrides a row was decoded with, against today's defaults, so that a table never
    averages two configurations and never splits one.

    `recorded`: the row's own `config_overrides` (rows since stop 21), else the fields the sweep's run.json
    (`sweep`) set away from their defaults. The group score of a method it changes (`GROUP_SCORED`) comes
    from the record, else the run.json, else `LEGACY_GROUP_SCORE` (rows from before run.json had it); it is
    an override only where it differs from what today's default resolves to with the other overrides.
    Dense rows have none; other methods never carry a group score."""
    if method == DENSE:
        return {}
    default = DashKVConfig().to_dict()
    if recorded:
        ov = dict(recorded)
    else:
        ov = {k: sweep[k] for k in OVERRIDE_FIELDS if k in (sweep or {}) and sweep[k] != default.get(k)}
    group_score = ov.pop("group_score", None)
    if method in GROUP_SCORED:
        if group_score is None:
            group_score = (sweep or {}).get("group_score", LEGACY_GROUP_SCORE) if sweep is not None \
                else LEGACY_GROUP_SCORE
        forced = {**ov, **GROUP_SCORED[method]}
        if group_score is not None and group_score != DashKVConfig(**forced).effective_group_score:
            ov["group_score"] = group_score
    return ov


def _check_same_depths(rows: list[dict[str, Any]], plan: "EvalPlan", path: Path) -> None:
    """Refuse to resume a sweep whose done rows put their needles elsewhere: a sample's depth is i / (n - 1)
    with n = --samples, so resuming with another --samples would mix two prompt sets under one index (the
    stop-22 finding: smollm2-ruler-4k's samples 0-9 are a 10-sample run's, 10-19 a 20-sample run's)."""
    from .tasks import sample_depths

    expected = sample_depths(plan.samples)
    for r in rows:
        depth, index = r.get("depth"), r.get("index")
        if depth is None or not isinstance(index, int) or not 0 <= index < plan.samples:
            continue
        if abs(float(depth) - expected[index]) > 1e-9:
            raise ValueError(f"{path}: its {r.get('task')} sample #{index} has its needle at depth {float(depth):.3f}, "
                             f"--samples {plan.samples} puts it at {expected[index]:.3f} (depths are i / (samples - 1)): "
                             "resume with the sweep's own --samples, or write this run to a new --out directory")


def _check_same_overrides(rows: list[dict[str, Any]], plan: "EvalPlan", path: Path) -> None:
    """Refuse to resume a sweep made with other configuration overrides (`--group-score`, `--query-bits`,
    ...): its done rows would be skipped as if they had been decoded with this run's configuration."""
    if not rows:
        return
    sweep = sweep_config(path)
    today = DashKVConfig(**plan.config_overrides).to_dict()
    first: dict[str, dict[str, Any]] = {}  # one row per method: the group score touches some methods only
    for r in rows:
        if r.get("method") != DENSE:  # dense rows do not depend on the overrides
            first.setdefault(r.get("method", ""), r)
    for method, row in first.items():
        before = row_overrides(method, row.get("config_overrides"), sweep)
        now = row_overrides(method, plan.config_overrides, today)
        if before != now:
            raise ValueError(f"{path}: its {method} rows were made with configuration overrides {before or 'none'}, "
                             f"this run has {now or 'none'}: write this run to a new --out directory")


def run_eval(model: Any, tokenizer: Any, plan: EvalPlan, encoders: dict[str, Any] | None = None,
             summary: bool = True) -> list[dict[str, Any]]:
    """Run every missing row of `plan` (appending to OUT/results.jsonl) and write the summaries."""
    plan.out.mkdir(parents=True, exist_ok=True)
    results_path = plan.out / "results.jsonl"
    rows = load_results(results_path)
    done = {row_key(r) for r in rows}
    encoders = _encoders_for(plan, model) if encoders is None else encoders
    digests = {m: getattr(encoders[m], "weights_sha256", None) for m in LEARNED_METHODS if m in encoders}
    _check_same_encoders(rows, digests, results_path)
    _check_same_overrides(rows, plan, results_path)
    _check_same_depths(rows, plan, results_path)
    stop = stop_ids(tokenizer, model)
    try:
        from ..models import model_shape

        model_limit = model_shape(model).max_position_embeddings  # prompts + answers stay inside it
    except Exception:  # a stand-in model without a config: the sample length is the only limit
        model_limit = None
    cells = plan.cells()
    invocation = {
        "model": plan.model, "encoders": plan.encoders, "methods": plan.methods,
        "budgets": [budget_label(b) for b in plan.budgets],
        "also": [[ms, [budget_label(b) for b in bs]] for ms, bs in plan.also], "tasks": plan.tasks,
        "lengths": plan.lengths, "samples": plan.samples, "haystack": plan.haystack, "seed": plan.seed,
        "bits": plan.bits, "prefill_dtype": plan.prefill_dtype, "positions": plan.positions,
        "argv": sys.argv, "config": plan.config(1.0).to_dict()}
    (plan.out / "run.json").write_text(json.dumps(invocation, indent=2) + "\n")

    def key(task, length, index, method, blabel):
        return (plan.model, str(plan.seed), task, str(length), str(index), method, blabel)

    work = []  # (task, length, index, pending cells)
    total = done_in_plan = 0
    for i in range(plan.samples):  # sample index outermost: a partial run covers every task and length
        for task in plan.tasks:
            for length in plan.lengths:
                pending = [c for c in cells if key(task, length, i, *c) not in done]
                total += len(cells)
                done_in_plan += len(cells) - len(pending)
                if pending:
                    work.append((task, length, i, pending))
    budgets = {budget_label(b): b for b in plan.all_budgets}
    bar = None
    if plan.progress and work:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done_in_plan, desc="dashkv eval", unit="row", dynamic_ncols=True,
                   file=sys.stderr)
    sample_cache: dict[tuple[str, int], Any] = {}
    try:
        for task, length, index, pending in work:
            max_new = _max_new(plan, task)
            if task in FIDELITY_TASKS:
                ck = (task, length)
                if ck not in sample_cache:
                    sample_cache[ck] = make_fidelity_documents(tokenizer, FIDELITY_KINDS[task], length, plan.samples,
                                                               seed=plan.seed, positions=plan.positions,
                                                               haystack=plan.haystack)
                doc = sample_cache[ck][index]
                ids, targets, answers = doc.context_ids, doc.target_ids, []
                meta = {"start": doc.start, "source": doc.source}
                depth = None
            elif task == PERPLEXITY_TASK:
                ck = (task, length)
                if ck not in sample_cache:
                    sample_cache[ck] = make_documents(tokenizer, length, plan.samples, seed=plan.seed,
                                                      continuation=plan.continuation, haystack=plan.haystack)
                doc = sample_cache[ck][index]
                ids, targets, answers, meta = doc.context_ids, doc.target_ids, [], {"start": doc.start,
                                                                                     "source": doc.source}
                depth = None
            else:
                make = make_longbench_sample if task in LONGBENCH_TASKS else make_sample
                spec = LONGBENCH_TASKS[task] if task in LONGBENCH_TASKS else TASKS[task]
                depth = sample_depths(plan.samples)[index] if spec.has_depth else None
                inner = length - _overhead(tokenizer, task, plan.chat, max_new)
                sample = make(task, tokenizer, inner, seed=plan.seed, index=index, depth=depth, haystack=plan.haystack)
                ids = build_prompt_ids(tokenizer, sample, plan.chat)
                # the last answer token is fed back too: at the model's own limit one position stays free
                limit = min(length, (model_limit or length + 1) - 1)
                excess = len(ids) + max_new - limit
                shrink = 0
                for _ in range(4):  # the template/prefix guess was short: shrink the sample until it fits
                    if excess <= 0:
                        break
                    shrink += excess + 8
                    sample = make(task, tokenizer, inner - shrink, seed=plan.seed, index=index, depth=depth,
                                  haystack=plan.haystack)
                    ids = build_prompt_ids(tokenizer, sample, plan.chat)
                    excess = len(ids) + max_new - limit
                if excess > 0:
                    raise ValueError(f"{task} at length {length}, sample {index}: the prompt ({len(ids)} tokens) "
                                     f"and its {max_new} answer tokens do not fit in {length}")
                targets, answers = None, sample.answers
                meta = {"needle_depth": sample.metadata.get("needles", [{}])[0].get("depth_actual")
                        if sample.metadata.get("needles") else sample.metadata.get("depth_actual")}
            if bar is not None:
                bar.set_postfix_str(f"{task} {length} #{index} prefill {len(ids)} tok")
            pre = prefill_once(model, ids, [m for m, _ in pending], plan.bits, plan.config_overrides,
                               dtype=plan.prefill_dtype)
            reference = None
            if task in FIDELITY_TASKS:  # full attention's distributions, the reference of every method
                pending = [(DENSE, FULL)] + [c for c in pending if c[0] != DENSE] if (DENSE, FULL) in pending \
                    else pending
                if bar is not None:
                    bar.set_postfix_str(f"{task} {length} #{index} dense reference")
                reference, ref_res = _fidelity_decode(model, pre, DENSE, plan.config(1.0), None, targets)
            for method, blabel in pending:
                if bar is not None:
                    bar.set_postfix_str(f"{task} {length} #{index} {method} {blabel}")
                config = plan.config(1.0 if method == DENSE else budgets[blabel], method)
                cpu0 = time.process_time()
                if reference is not None:
                    if method == DENSE:
                        logprobs, res = reference, ref_res
                    else:
                        logprobs, res = _fidelity_decode(model, pre, method, config, encoders.get(method), targets)
                    fid = compare_logprobs(reference, logprobs, targets)
                else:
                    res, _ = decode_method(model, pre, method, config, encoders.get(method), max_new_tokens=max_new,
                                           stop_ids=stop, tokenizer=tokenizer, newline_stop=task in NEWLINE_STOP,
                                           targets=targets, done=_complete(task, answers))
                row: dict[str, Any] = {
                    "model": plan.model, "seed": plan.seed, "task": task, "length": length, "index": index,
                    "method": method, "budget": blabel,
                    "budget_value": None if method == DENSE else budgets[blabel],
                    "prompt_tokens": len(ids), "depth": depth,
                    "read_fraction": round(res.read_fraction, 6),
                    "prefill_s": round(pre.seconds, 3), "decode_s": round(res.seconds, 3),
                    "prefill_cpu_s": round(pre.cpu_seconds, 3), "cpu_s": round(time.process_time() - cpu0, 3),
                    "bits": plan.bits, "haystack": plan.haystack, "encoders": plan.encoders,
                    "encoders_sha256": digests.get(method),
                    "prefill_dtype": plan.prefill_dtype, **meta,
                }
                if plan.config_overrides and method != DENSE:  # a table keeps these rows apart
                    row["config_overrides"] = dict(plan.config_overrides)
                if reference is not None:
                    row.update(prediction=None, answers=None, new_tokens=fid.positions, positions=fid.positions,
                               agree=fid.agree, agreement=fid.agreement, kl_sum=fid.kl_sum, kl=fid.kl,
                               nll=fid.nll_sum / fid.positions, dense_nll=fid.dense_nll_sum / fid.positions,
                               score=fid.agreement)
                elif targets is not None:
                    mean_nll = sum(res.nll) / len(res.nll)
                    row.update(prediction=None, answers=None, new_tokens=len(res.nll), nll=mean_nll,
                               score=mean_nll, ppl=math.exp(mean_nll))
                else:
                    pred = tokenizer.decode(res.tokens, skip_special_tokens=True)
                    row.update(prediction=pred, answers=answers, new_tokens=len(res.tokens),
                               score=score_sample(task, pred, answers))
                _append_row(results_path, row)
                rows.append(row)
                done.add(row_key(row))
                if bar is not None:
                    bar.update(1)
            del pre, reference
    finally:
        if bar is not None:
            bar.close()
    if summary:
        write_summary(rows, plan.out, plan)
    return rows


def eval_command(args: Any) -> int:
    plan = validate_plan(args)  # everything checked before the model loads
    from ..models import load_model

    # One intra-op thread by default: on a shared 2-core machine two OpenMP threads that get descheduled
    # spin at every barrier (measured: decode 6-8x slower, prefill 15-25% slower than one thread).
    threads = getattr(args, "threads", None) or int(os.environ.get("DASHKV_EVAL_THREADS", "1"))
    torch.set_num_threads(max(1, threads))

    model, tokenizer = load_model(plan.model)
    torch.set_grad_enabled(False)
    rows = run_eval(model, tokenizer, plan)
    print(f"dashkv eval: {len(rows)} rows in {plan.out / 'results.jsonl'}; summary in {plan.out / 'summary.md'}",
          file=sys.stderr)
    md = plan.out / "summary.md"
    if md.exists():
        print(md.read_text())
    return 0


# ---- summaries ------------------------------------------------------------------------------------------
def _aggregate(rows: list[dict[str, Any]], plan: EvalPlan | None) -> dict[tuple, dict[str, float]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if plan is not None and (r.get("model") != plan.model or int(r.get("seed", 0)) != plan.seed):
            continue
        groups.setdefault((r["task"], int(r["length"]), r["method"], r["budget"]), []).append(r)
    agg = {}
    for k, rs in groups.items():
        n = len(rs)
        agg[k] = {
            "n": n,
            "score": sum(float(r["score"]) for r in rs) / n,
            "read_fraction": sum(float(r["read_fraction"]) for r in rs) / n,
            "decode_s": sum(float(r["decode_s"]) for r in rs) / n,
            "new_tokens": sum(int(r["new_tokens"]) for r in rs) / n,
            "prefill_s": sum(float(r["prefill_s"]) for r in rs) / n,
        }
        if k[0] == PERPLEXITY_TASK:
            agg[k]["ppl"] = math.exp(agg[k]["score"])
        if k[0] in FIDELITY_TASKS:  # pooled over positions: every scored position weighs the same
            pos = sum(int(r["positions"]) for r in rs)
            agg[k]["positions"] = pos
            agg[k]["score"] = sum(int(r["agree"]) for r in rs) / pos
            agg[k]["kl"] = sum(float(r["kl_sum"]) for r in rs) / pos
    return agg


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    pref = [v for v in preferred if v in values]
    return pref + sorted(v for v in values if v not in pref)


def _budget_sort(labels: Iterable[str]) -> list[str]:
    def val(b: str) -> float:
        if b == FULL:
            return float("inf")
        v = parse_budget(b)
        return float(v) if isinstance(v, float) else 1e9 + v
    return sorted(set(labels), key=val, reverse=True)


def write_summary(rows: list[dict[str, Any]], out: Path, plan: EvalPlan | None = None) -> dict[str, Path]:
    """summary.csv, summary.md and the two plots from result rows."""
    out = Path(out)
    agg = _aggregate(rows, plan)
    paths = {"csv": out / "summary.csv", "md": out / "summary.md"}
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write("task,length,method,budget,n,score,read_fraction,decode_s,new_tokens,prefill_s\n")
        for (task, length, method, blabel), a in sorted(agg.items()):
            f.write(f"{task},{length},{method},{blabel},{a['n']},{a['score']:.6f},{a['read_fraction']:.6f},"
                    f"{a['decode_s']:.4f},{a['new_tokens']:.2f},{a['prefill_s']:.3f}\n")
    paths["md"].write_text(summary_markdown(agg, plan))
    try:
        from .plots import plot_accuracy_vs_budget, plot_accuracy_vs_length

        paths["budget_png"] = plot_accuracy_vs_budget(agg, out / "accuracy_vs_budget.png", _method_order(agg, plan))
        paths["length_png"] = plot_accuracy_vs_length(agg, out / "accuracy_vs_length.png", _method_order(agg, plan))
    except ImportError as exc:  # matplotlib missing: tables still written
        print(f"dashkv eval: plots skipped ({exc})", file=sys.stderr)
    return paths


def _method_order(agg, plan) -> list[str]:
    return _order((k[2] for k in agg), plan.methods if plan else METHODS)


def summary_markdown(agg: dict[tuple, dict[str, float]], plan: EvalPlan | None = None) -> str:
    """Per task x length: one row per method, one column per budget (dense once, in 'full'), then the
    average over the accuracy tasks. Scores are RULER's string match x 100; perplexity is exp(mean NLL)."""
    methods = _method_order(agg, plan)
    tasks = _order((k[0] for k in agg), plan.tasks if plan else list(VALID_TASKS))
    lengths = sorted({k[1] for k in agg})
    budgets = [b for b in _budget_sort(k[3] for k in agg) if b != FULL]
    lines = ["# dashkv eval summary", ""]
    if plan is not None:
        lines += [f"model `{plan.model}`, seed {plan.seed}, bits {plan.bits}, encoders "
                  f"`{plan.encoders or 'shipped default'}`, haystack `{plan.haystack or 'RULER default per task'}`", ""]
    lines += ["Accuracy: RULER string match x 100 (mean over samples). Perplexity: exp(mean NLL) of the continuation, "
              "lower is better. Budget = tokens each decode step reads per KV head in managed layers (sinks, "
              "window and candidates included); `read` = measured fraction of the context read.", ""]

    def cell(task, length, method, b) -> str:
        a = agg.get((task, length, method, b))
        if a is None:
            return ""
        if task == PERPLEXITY_TASK:
            return f"{a['ppl']:.3f}"
        if task in FIDELITY_TASKS:
            return f"{100 * a['score']:.1f} / {a['kl']:.4f}"
        return f"{100 * a['score']:.1f}"

    cols = [FULL] + budgets
    head = "| method | " + " | ".join(("dense (full)" if c == FULL else c) for c in cols) + " | n |"
    sep = "|---|" + "---:|" * (len(cols) + 1)
    acc_tasks = [t for t in tasks if t != PERPLEXITY_TASK and t not in FIDELITY_TASKS and t not in LONGBENCH_TASKS]
    for length in lengths:
        lines += [f"## context {length}", ""]
        for task in tasks:
            present = [m for m in methods if any((task, length, m, c) in agg for c in cols)]
            if not present:
                continue
            unit = ("perplexity" if task == PERPLEXITY_TASK else
                    "top-1 agreement with full attention % / mean KL(full || method) nats" if task in FIDELITY_TASKS
                    else "accuracy")
            lines += [f"### {task} ({unit})", "", head, sep]
            for m in present:
                ns = [agg[(task, length, m, c)]["n"] for c in cols if (task, length, m, c) in agg]
                lines.append(f"| {m} | " + " | ".join(cell(task, length, m, c) for c in cols) + f" | {min(ns)} |")
            lines.append("")
        if len(acc_tasks) > 0:
            lines += [f"### average over tasks ({', '.join(acc_tasks)})", "", head, sep]
            for m in methods:
                vals = []
                for c in cols:
                    got = [agg[(t, length, m, c)]["score"] for t in acc_tasks if (t, length, m, c) in agg]
                    vals.append(f"{100 * sum(got) / len(got):.1f}" if len(got) == len(acc_tasks) else "")
                if any(vals):
                    lines.append(f"| {m} | " + " | ".join(vals) + " | |")
            lines.append("")
        lines += [f"### cost at context {length} (mean per sample)", "",
                  "| method | budget | read | decode s | new tokens | s / token |", "|---|---|---:|---:|---:|---:|"]
        for m in methods:
            for c in cols:
                got = [agg[(t, length, m, c)] for t in tasks if (t, length, m, c) in agg]
                if not got:
                    continue
                dec = sum(a["decode_s"] for a in got) / len(got)
                tok = sum(a["new_tokens"] for a in got) / len(got)
                read = sum(a["read_fraction"] for a in got) / len(got)
                lines.append(f"| {m} | {c} | {100 * read:.1f}% | {dec:.2f} | {tok:.1f} | "
                             f"{dec / max(tok, 1):.3f} |")
        pre = [a["prefill_s"] for k, a in agg.items() if k[1] == length]
        if pre:
            lines += ["", f"prefill (dense, once per sample, shared by all methods): "
                          f"{sum(pre) / len(pre):.1f} s mean", ""]
    return "\n".join(lines) + "\n"
