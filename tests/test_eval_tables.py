"""The tables command: Wilson intervals, family averages, fidelity pooling, DASH-KV's losses named."""

from __future__ import annotations

import json

import pytest

from dashkv.eval.tables import family, main, make_tables, wilson


def _row(task, method, budget, index, score, length=4096, **kw):
    r = {"model": "m", "seed": 0, "task": task, "length": length, "index": index, "method": method,
         "budget": budget, "score": score, "prefill_cpu_s": 10.0, "cpu_s": 1.0, "_sweep": "s"}
    r.update(kw)
    return r


def test_wilson_hand_values():
    lo, hi = wilson(1.0, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)
    lo, hi = wilson(0.5, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-3)
    assert family("niah_multikey_3") == "niah" and family("cwe") == "aggregation" and family("lb_code") is None


def test_tables_average_families_and_name_dashkv_losses(tmp_path):
    rows = []
    for i in range(4):
        rows += [_row("niah_single_1", "dense", "full", i, 1.0), _row("niah_single_1", "dashkv", "1/16", i, 0.5 * (i % 2)),
                 _row("niah_single_1", "snapkv", "1/16", i, 1.0), _row("cwe", "dense", "full", i, 0.5),
                 _row("cwe", "dashkv", "1/16", i, 0.5), _row("cwe", "snapkv", "1/16", i, 0.25)]
    rows += [_row("fidelity_code", "dashkv", "1/16", i, 0.9, positions=100, agree=90 + i, kl_sum=5.0)
             for i in range(2)]
    md = make_tables(rows)
    assert "| DASH-KV | 1/16 | 25.0 [" in md and "(4) | 50.0 [" in md  # niah 25, aggregation 50
    assert "| 37.5 [" in md  # average of the family means, n = 8
    assert "DASH-KV loses on niah at 1/16: below dense by 75.0 points; below SnapKV by 75.0 points (n = 4)" in md
    assert "| code | 4096 | DASH-KV | 90.5 / 0.0500 | 2 | 200 |" in md
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_sweep"}) + "\n"
                                             for r in rows))
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path / "nope")]) == 2


def test_two_encoder_sets_of_one_model_are_two_methods_never_averaged():
    a, b = "a" * 64, "b" * 64
    rows = []
    for i in range(2):
        rows += [_row("niah_single_1", "dense", "full", i, 1.0, _sweep="old"),
                 _row("niah_single_1", "dashkv", "1/16", i, 0.0, encoders_sha256=a, _sweep="old"),
                 _row("niah_single_1", "dashkv", "1/16", i, 1.0, encoders_sha256=b, _sweep="new")]
    md = make_tables(rows)
    assert "| DASH-KV (encoders aaaaaaaa) | 1/16 | 0.0 [" in md and "| DASH-KV (encoders bbbbbbbb) | 1/16 | 100.0 [" in md
    assert "DASH-KV (encoders aaaaaaaa) loses on niah at 1/16: below dense by 100.0 points" in md
    one = make_tables([r for r in rows if r.get("encoders_sha256") != b])
    assert "| DASH-KV | 1/16 | 0.0 [" in one and "(encoders" not in one  # one set: plain name
    assert rows[1]["method"] == "dashkv"  # the caller's rows are not renamed


def test_configuration_overrides_are_their_own_method(tmp_path):
    """Rows decoded with `dashkv eval --group-score sum` (recorded per row, or, for older rows, in the
    sweep's run.json or implied by its age) never share a cell with the default configuration's rows, and
    rows of the old `--group-score probability` sweeps do (it is today's default)."""
    from dashkv.eval.tables import load_rows

    rows = []
    for i in range(2):
        rows += [_row("niah_single_1", "dense", "full", i, 1.0),
                 _row("niah_single_1", "dashkv", "1/16", i, 0.0, _sweep="plain"),
                 _row("niah_single_1", "dashkv", "1/16", i, 1.0, _sweep="sum", config_overrides={"group_score": "sum"})]
    md = make_tables(rows)
    assert "| DASH-KV | 1/16 | 0.0 [" in md and "| DASH-KV [group_score=sum] | 1/16 | 100.0 [" in md
    assert rows[2]["method"] == "dashkv"
    plain = [{k: v for k, v in r.items() if k != "config_overrides"} for r in rows[:3]]
    for name, cfg, want in (("old", {"group_score": "sum", "successors": 0}, {"group_score": "sum"}),
                            ("older", None, {"group_score": "sum"}),  # no run.json: the default of its time
                            ("prob", {"group_score": "probability"}, None),
                            ("today", {"group_score": None}, None)):
        d = tmp_path / name
        d.mkdir()
        (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
        if cfg is not None:
            (d / "run.json").write_text(json.dumps({"config": cfg}))
        loaded = load_rows([d])
        assert [r.get("config_overrides") for r in loaded] == [None, want, want], name
