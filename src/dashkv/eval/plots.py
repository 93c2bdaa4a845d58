"""Plots of `dashkv eval` summaries: accuracy vs budget (per task and length) and vs context length."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

__all__ = ["plot_accuracy_vs_budget", "plot_accuracy_vs_length"]

_FULL = "full"
_DENSE = "dense"
_STYLE = {"dashkv": dict(lw=2.4, marker="o", zorder=5), "oracle": dict(ls=":", marker="^")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budgets(agg: dict[tuple, dict[str, float]]) -> list[str]:
    from .runner import _budget_sort

    return [b for b in _budget_sort(k[3] for k in agg) if b != _FULL]


def _value(task: str, a: dict[str, float]) -> float:
    return a["ppl"] if task == "perplexity" else 100 * a["score"]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    tmp.replace(path)
    return path


def plot_accuracy_vs_budget(agg: dict[tuple, dict[str, float]], path: Path, methods: Sequence[str]) -> Path:
    """One panel per (task, length): score per method over the budgets (largest first); dense dashed."""
    plt = _plt()
    tasks = list(dict.fromkeys(k[0] for k in agg))
    lengths = sorted({k[1] for k in agg})
    budgets = _budgets(agg)
    panels = [(t, n) for t in tasks for n in lengths if any(k[0] == t and k[1] == n for k in agg)]
    cols = min(len(lengths), 4) or 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, n) in zip(axes.flat, panels):
        x = list(range(len(budgets)))
        for m in methods:
            if m == _DENSE:
                a = agg.get((task, n, m, _FULL))
                if a is not None:
                    ax.axhline(_value(task, a), color="black", ls="--", lw=1.2, label="dense")
                continue
            ys = [agg.get((task, n, m, b)) for b in budgets]
            if all(y is None for y in ys):
                continue
            ax.plot([xi for xi, y in zip(x, ys) if y], [_value(task, y) for y in ys if y], label=m,
                    **_STYLE.get(m, dict(marker=".")))
        ax.set_xticks(x, budgets)
        ax.set_title(f"{task} @ {n}", fontsize=10)
        ax.set_xlabel("budget")
        ax.set_ylabel("perplexity" if task == "perplexity" else "accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _finish(fig, axes, path, legend_y=1.02, top=0.95)


def plot_accuracy_vs_length(agg: dict[tuple, dict[str, float]], path: Path, methods: Sequence[str]) -> Path:
    """One panel per budget: accuracy averaged over the accuracy tasks, per method, over context length."""
    plt = _plt()
    tasks = [t for t in dict.fromkeys(k[0] for k in agg) if t != "perplexity"]
    lengths = sorted({k[1] for k in agg})
    budgets = _budgets(agg) or [_FULL]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.4), squeeze=False)

    def mean_at(m: str, b: str, n: int) -> float | None:
        got = [agg[(t, n, m, b)]["score"] for t in tasks if (t, n, m, b) in agg]
        return 100 * sum(got) / len(got) if got and len(got) == len(tasks) else None

    for ax, b in zip(axes.flat, budgets):
        for m in methods:
            ys = [mean_at(m, _FULL if m == _DENSE else b, n) for n in lengths]
            pts = [(n, y) for n, y in zip(lengths, ys) if y is not None]
            if not pts:
                continue
            style = dict(color="black", ls="--", marker="s") if m == _DENSE else _STYLE.get(m, dict(marker="."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_title(f"budget {b}, mean over {len(tasks)} task(s)", fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    return _finish(fig, axes, path, legend_y=1.05, top=0.92)


def _finish(fig, axes, path, legend_y: float, top: float):
    """One legend for all panels above them, then save and close the figure."""
    plt = _plt()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), bbox_to_anchor=(0.5, legend_y))
    fig.tight_layout(rect=(0, 0, 1, top))
    out = _save(fig, path)
    plt.close(fig)
    return out
