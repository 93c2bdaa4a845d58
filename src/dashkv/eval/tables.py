"""Every accuracy/fidelity table of the evaluation, made from committed result rows by one command:

    python -m dashkv.eval.tables results/eval > results/eval/TABLES.md

Reads every ``results.jsonl`` under the given directories (one directory per sweep), so a table can be
audited against the rows it came from. Tables, per model and context length:

* RULER-style accuracy per task family (niah, vt, aggregation = cwe + fwe, passkey) and averaged over
  the families present, per method and budget, with the number of samples and a 95% interval;
* LongBench-style scores per task (LongBench's metrics x 100), same layout;
* teacher-forced fidelity per text kind: top-1 agreement with full attention and mean KL(full || method);
* what the rows cost: CPU seconds of prefills (once per sample) and decodes.

Intervals: Wilson score interval for a proportion at the mean score with n = number of samples. For
0/1 scores (single-answer tasks) it is the exact Wilson interval; for partial scores and averages over
tasks it is an approximation (samples treated as Bernoulli trials at the mean), wider than a bootstrap.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from .fidelity import FIDELITY_TASKS
from .longbench import LONGBENCH_TASKS
from .runner import FULL, _budget_sort, load_results, row_overrides, sweep_config

__all__ = ["load_rows", "family", "wilson", "make_tables", "main", "METHOD_ORDER"]

METHOD_ORDER = ("dense", "dashkv", "dashkv_rerank", "oracle", "simhash", "simhash_asym", "snapkv", "quest", "h2o", "streaming")
METHOD_NAMES = {"dense": "dense (full attention)", "dashkv": "DASH-KV", "dashkv_rerank": "DASH-KV + int8 re-rank", "oracle": "oracle top-k",
                "simhash": "SimHash (Hamming)", "simhash_asym": "SimHash (asymmetric)", "snapkv": "SnapKV",
                "quest": "Quest", "h2o": "H2O", "streaming": "StreamingLLM"}
FAMILIES = ("niah", "vt", "aggregation", "passkey")


def family(task: str) -> str | None:
    """RULER family of a task; None for tasks that are not RULER-style accuracy tasks."""
    if task.startswith("niah_"):
        return "niah"
    if task in ("cwe", "fwe"):
        return "aggregation"
    if task in ("vt", "passkey"):
        return task
    return None


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion p over n trials."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = min(1.0, max(0.0, p))
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of every results.jsonl under `paths` (files or directories), each tagged with its sweep and
    with the configuration overrides it was decoded with against today's defaults (`row_overrides`)."""
    rows: list[dict[str, Any]] = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob("results.jsonl"))
        for f in files:
            sweep = sweep_config(f)
            for r in load_results(f):
                r["_sweep"] = f.parent.name
                overrides = row_overrides(r.get("method", ""), r.get("config_overrides"), sweep)
                if overrides:
                    r["config_overrides"] = overrides
                else:
                    r.pop("config_overrides", None)
                rows.append(r)
    return rows


LEARNED = ("dashkv", "dashkv_rerank")  # methods decoding with calibrated encoders


def _base(method: str) -> str:
    return method.split("[", 1)[0].split("@", 1)[0]


def _name(method: str) -> str:
    """Table label; a method tagged with its encoder set (`_tag_encoder_sets`) names the set, one tagged
    with configuration overrides (`_tag_variants`) names them."""
    head, _, variant = method.partition("[")
    base, _, tag = head.partition("@")
    name = METHOD_NAMES.get(base, base)
    name = f"{name} (encoders {tag})" if tag else name
    return f"{name} [{variant.rstrip(']')}]" if variant else name


def _tag_variants(rows: list[dict[str, Any]]) -> None:
    """Rows decoded with configuration overrides (`config_overrides`: `dashkv eval --group-score ...`)
    become their own method, `<method>[field=value,...]`, so no cell averages two configurations."""
    for r in rows:
        ov = r.get("config_overrides") or {}
        if ov and r["method"] != "dense":
            r["method"] = f"{r['method']}[{','.join(f'{k}={v}' for k, v in sorted(ov.items()))}]"


def _tag_encoder_sets(rows: list[dict[str, Any]]) -> None:
    """Where one model's learned-method rows were decoded with more than one encoder set (the rows'
    `encoders_sha256`), each set becomes its own method, `dashkv@<digest[:8]>`: a table never averages
    two sets, and a later sweep's row never replaces another set's row of the same sample."""
    sets: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["method"] in LEARNED:
            sets[r["model"]].add(r.get("encoders_sha256") or "unrecorded")
    for r in rows:
        if r["method"] in LEARNED and len(sets[r["model"]]) > 1:
            r["method"] = f"{r['method']}@{(r.get('encoders_sha256') or 'unrecorded')[:8]}"


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in rows}
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(present, key=lambda m: (order.get(_base(m), len(order)), m))


def _budgets(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [FULL] + [b for b in _budget_sort({r["budget"] for r in rows}) if b != FULL]


def _cell(scores: list[float]) -> str:
    if not scores:
        return ""
    n = len(scores)
    m = sum(scores) / n
    lo, hi = wilson(m, n)
    return f"{100 * m:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({n})"


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, seed, task, length, sample, method, budget): a later sweep's row wins."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        seen[(r["model"], str(r["seed"]), r["task"], int(r["length"]), int(r["index"]), r["method"], r["budget"])] = r
    return list(seen.values())


def _accuracy_tables(rows: list[dict[str, Any]], out: list[str]) -> None:
    by_len: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if family(r["task"]) is not None:
            by_len[int(r["length"])].append(r)
    for length in sorted(by_len):
        rs = by_len[length]
        fams = [f for f in FAMILIES if any(family(r["task"]) == f for r in rs)]
        tasks = sorted({r["task"] for r in rs})
        out += [f"### RULER-style accuracy, context {length}", "",
                f"Tasks: {', '.join(tasks)}. Cell: mean string-match accuracy x 100 [95% interval] (samples). "
                "The average weighs each family equally (the mean of the family means); its n is all samples.", ""]
        budgets = _budgets(rs)
        head = "| method | budget | " + " | ".join(fams) + " | average |"
        out += [head, "|---|---|" + "---:|" * (len(fams) + 1)]
        for m in _methods(rs):
            for b in budgets:
                cell_rows = [r for r in rs if r["method"] == m and r["budget"] == b]
                if not cell_rows:
                    continue
                cols, means, n_all = [], [], 0
                for f in fams:
                    sc = [float(r["score"]) for r in cell_rows if family(r["task"]) == f]
                    cols.append(_cell(sc))
                    if sc:
                        # a family's mean is the mean over its tasks of the task means
                        per_task: dict[str, list[float]] = defaultdict(list)
                        for r in cell_rows:
                            if family(r["task"]) == f:
                                per_task[r["task"]].append(float(r["score"]))
                        means.append(sum(sum(v) / len(v) for v in per_task.values()) / len(per_task))
                        n_all += len(sc)
                avg = ""
                if len(means) == len(fams):
                    mu = sum(means) / len(means)
                    lo, hi = wilson(mu, n_all)
                    avg = f"{100 * mu:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({n_all})"
                out.append(f"| {_name(m)} | {'full' if b == FULL else b} | " + " | ".join(cols)
                           + f" | {avg} |")
        out.append("")
        _dashkv_verdict(rs, out, key=lambda r: family(r["task"]))


def _dashkv_verdict(rs: list[dict[str, Any]], out: list[str], key) -> None:
    """Say where DASH-KV loses: to dense, and to the best baseline at the same budget, per group."""
    dense = defaultdict(list)
    for r in rs:
        if r["method"] == "dense":
            dense[key(r)].append(float(r["score"]))
    lines = []
    for b, g, ours in [(b, g, o) for b in _budgets(rs) if b != FULL for g in sorted({key(r) for r in rs})
                       for o in _methods(rs) if _base(o) == "dashkv"]:
            d = [float(r["score"]) for r in rs if r["method"] == ours and r["budget"] == b and key(r) == g]
            if not d:
                continue
            mine = sum(d) / len(d)
            notes = []
            if dense.get(g):
                ref = sum(dense[g]) / len(dense[g])
                if mine < ref:
                    notes.append(f"below dense by {100 * (ref - mine):.1f} points")
            best = None
            for m in [x for x in _methods(rs) if _base(x) not in ("dense", "dashkv", "oracle")]:  # fixed order: ties too
                sc = [float(r["score"]) for r in rs if r["method"] == m and r["budget"] == b and key(r) == g]
                if sc and (best is None or sum(sc) / len(sc) > best[1]):
                    best = (m, sum(sc) / len(sc))
            if best is not None and best[1] > mine:
                notes.append(f"below {_name(best[0])} by {100 * (best[1] - mine):.1f} points")
            if notes:
                lines.append(f"- {_name(ours)} loses on {g} at {b}: " + "; ".join(notes) + f" (n = {len(d)}).")
    if lines:
        out += lines + [""]


def _longbench_tables(rows: list[dict[str, Any]], out: list[str]) -> None:
    by_len: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] in LONGBENCH_TASKS:
            by_len[int(r["length"])].append(r)
    for length in sorted(by_len):
        rs = by_len[length]
        tasks = [t for t in LONGBENCH_TASKS if any(r["task"] == t for r in rs)]
        out += [f"### LongBench-style scores, context {length}", "",
                "Cell: LongBench's metric x 100 (lb_code: edit similarity; retrieval / count: share of right "
                "numbers; fewshot: classification score) [95% interval, approximate for partial scores] (samples).", "",
                "| method | budget | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
        for m in _methods(rs):
            for b in _budgets(rs):
                cell_rows = [r for r in rs if r["method"] == m and r["budget"] == b]
                if cell_rows:
                    out.append(f"| {_name(m)} | {'full' if b == FULL else b} | " + " | ".join(
                        _cell([float(r["score"]) for r in cell_rows if r["task"] == t]) for t in tasks) + " |")
        out.append("")
        _dashkv_verdict(rs, out, key=lambda r: r["task"])


def _fidelity_tables(rows: list[dict[str, Any]], out: list[str]) -> None:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["task"] in FIDELITY_TASKS:
            groups[(r["task"], int(r["length"]))].append(r)
    if not groups:
        return
    out += ["### Teacher-forced fidelity", "",
            "Per scored position of held-out text (after a dense prefill, the true continuation fed one token at a "
            "time): top-1 agreement with full attention (%) / mean KL(full || method) in nats; pooled over "
            "positions. `docs` = documents, `pos` = positions.", ""]
    budgets = [b for b in _budgets(rows) if b != FULL and any(r["budget"] == b for rs in groups.values() for r in rs)]
    out += ["| text | context | method | " + " | ".join(budgets) + " | docs | pos |",
            "|---|---:|---|" + "---:|" * (len(budgets) + 2)]
    for (task, length) in sorted(groups):
        rs = groups[(task, length)]
        for m in _methods(rs):
            if m == "dense":
                continue
            cells, docs, pos = [], set(), 0
            for b in budgets:
                cr = [r for r in rs if r["method"] == m and r["budget"] == b]
                if not cr:
                    cells.append("")
                    continue
                p = sum(int(r["positions"]) for r in cr)
                cells.append(f"{100 * sum(int(r['agree']) for r in cr) / p:.1f} / "
                             f"{sum(float(r['kl_sum']) for r in cr) / p:.4f}")
                docs |= {int(r["index"]) for r in cr}
                pos = max(pos, p)
            out.append(f"| {task.split('_', 1)[1]} | {length} | {_name(m)} | " + " | ".join(cells)
                       + f" | {len(docs)} | {pos} |")
    out.append("")


def _cost(rows: list[dict[str, Any]], out: list[str]) -> None:
    pre: dict[tuple, float] = {}
    dec = 0.0
    for r in rows:
        pre[(r["_sweep"], r["model"], r["task"], r["length"], r["index"], r.get("prefill_dtype"))] = \
            float(r.get("prefill_cpu_s", r.get("prefill_s", 0.0)))
        dec += float(r.get("cpu_s", r.get("decode_s", 0.0)))
    total = sum(pre.values()) + dec
    out += [f"Cost of these rows: {len(rows)} rows, {len(pre)} prefills, CPU {total / 3600:.2f} h "
            f"(prefills {sum(pre.values()) / 60:.1f} min, decodes {dec / 60:.1f} min; rows without CPU times "
            "count their wall seconds).", ""]


def make_tables(rows: list[dict[str, Any]], sources: Sequence[str] = ()) -> str:
    """Markdown for all tables of `rows`, per model."""
    rows = [dict(r) for r in rows]
    _tag_encoder_sets(rows)
    _tag_variants(rows)
    rows = _dedupe(rows)
    out = ["# dashkv evaluation tables", "",
           f"Made by `python -m dashkv.eval.tables {' '.join(sources) or 'results/eval'}` from the committed rows "
           f"({len(rows)} rows; sweeps: {', '.join(sorted({r['_sweep'] for r in rows})) or 'none'}).", ""]
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        out += [f"## model `{model}`", ""]
        dtypes = sorted({str(r.get("prefill_dtype", "fp32")) for r in mrows})
        out += [f"Prefill dtype(s) in these rows: {', '.join(dtypes)}; decode is fp32 throughout.", ""]
        _accuracy_tables(mrows, out)
        _longbench_tables(mrows, out)
        _fidelity_tables(mrows, out)
        _cost(mrows, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashkv.eval.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["results/eval"], help="result directories or results.jsonl files")
    args = ap.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"dashkv tables: {missing[0]} does not exist", file=sys.stderr)
        return 2
    rows = load_rows(args.paths)
    if not rows:
        print(f"dashkv tables: no results.jsonl rows under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    sys.stdout.write(make_tables(rows, args.paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
