"""`dashkv eval` runner on tiny random models: prefill-once decoding, resume, summaries, validation."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from dashkv import hf
from dashkv.config import DashKVConfig
from dashkv.eval import runner
from dashkv.eval.runner import (
    EvalPlan,
    decode_method,
    prefill_attention_stats,
    prefill_once,
    run_eval,
    snapkv_pool,
    validate_plan,
)
from dashkv.models import tiny_model
from dashkv.selection import H2OPolicy, LayerState, SnapKVPolicy

SPARSE = ["dashkv", "simhash", "oracle", "streaming", "h2o", "snapkv", "quest"]


def _ids(n=300, seed=0):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


def _simhash_for_dashkv(model):
    """Stand-in 'learned' encoders for the dashkv method (random hyperplanes, asymmetric scorer)."""
    from dashkv.encoders import HashEncoders
    from dashkv.models import model_shape

    s = model_shape(model)
    return HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_copied_cache_greedy_equals_generate_on_the_full_prompt(family):
    model = tiny_model(family, attn_implementation="sdpa")
    ids = _ids()
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    pre = prefill_once(model, ids[0].tolist(), ["dense", "dashkv", "h2o", "snapkv"])
    assert pre.tokens == ids.shape[1] - 1
    enc = _simhash_for_dashkv(model)
    full = DashKVConfig(min_context=0, budget=1.0)
    res, _ = decode_method(model, pre, "dense", full, max_new_tokens=10)
    assert res.tokens == ref and res.read_fraction == 1.0
    res, _ = decode_method(model, pre, "dashkv", full, enc, max_new_tokens=10)
    assert res.tokens == ref
    # DASH-KV via model.generate on the full prompt, full budget: same tokens as the copied-cache path
    with hf.enable(model, enc, full):
        gen = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert gen == res.tokens
    # the prefill cache is untouched by the decodes: a second decode from it gives the same tokens
    again, _ = decode_method(model, pre, "dense", full, max_new_tokens=10)
    assert again.tokens == ref


def test_sparse_copied_cache_matches_generate_at_small_budget():
    """At a real (small) budget the copied-cache path equals generate() except for the first token,
    which generate takes from the dense prefill: compare from a prompt whose last token is decoded."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(400)
    enc = _simhash_for_dashkv(model)
    cfg = DashKVConfig(min_context=0, budget=48, sink=4, window=8)
    pre = prefill_once(model, ids[0].tolist(), ["dashkv"])
    res, _ = decode_method(model, pre, "dashkv", cfg, enc, max_new_tokens=6)
    with hf.enable(model, enc, cfg):
        # generate from prompt[:-1] gives token after prompt[:-2]...; instead drive the same cache by hand
        cache = model._dashkv_handle.new_cache()
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
        out, prev = [], int(ids[0, -1])
        for _ in range(6):
            prev = int(model(input_ids=torch.tensor([[prev]]), cache=cache, use_cache=True).logits[0, -1].argmax())
            out.append(prev)
    assert res.tokens == out


def test_oracle_with_budget_covering_the_context_equals_dense():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(250)
    pre = prefill_once(model, ids[0].tolist(), ["oracle"])
    dense, _ = decode_method(model, pre, "dense", DashKVConfig(min_context=0, budget=1.0), max_new_tokens=10)
    oracle, handle = decode_method(model, pre, "oracle", DashKVConfig(min_context=0, budget=10_000), max_new_tokens=10)
    assert oracle.tokens == dense.tokens
    assert oracle.read_fraction == 1.0


@pytest.mark.parametrize("method", SPARSE)
def test_every_policy_obeys_the_budget_through_the_runner(method):
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(500)
    pre = prefill_once(model, ids[0].tolist(), [method])
    cfg = DashKVConfig(min_context=0, budget=40, sink=4, window=8)
    enc = _simhash_for_dashkv(model) if method == "dashkv" else None
    res, handle = decode_method(model, pre, method, cfg, enc, max_new_tokens=5, stop_ids=())
    steps = handle.stats.per_step
    assert len(steps) == 5 * len(handle.managed_layers)
    assert all(read <= 40.0 for _, n, read in steps), steps
    assert all(n >= 500 for _, n, _ in steps)
    assert res.read_fraction == pytest.approx(40 / 502, rel=0.02)


def test_prefill_statistics_match_the_policies_own_hooks():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 300, 16)
    k = torch.randn(1, 2, 300, 16)
    acc, tail = prefill_attention_stats(q, k, 0.25, None, want_acc=True, last=32, chunk=64)
    h2o_state, snap_state = LayerState(0), LayerState(0)
    H2OPolicy(DashKVConfig(min_context=0)).on_prefill(h2o_state, q, k, 0.25, None)
    SnapKVPolicy(DashKVConfig(min_context=0)).on_prefill(snap_state, q, k, 0.25, None)
    torch.testing.assert_close(acc, h2o_state.stats["acc"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(snapkv_pool(tail), snap_state.stats["votes"], rtol=1e-4, atol=1e-4)
    _, tail_only = prefill_attention_stats(q, k, 0.25, None, want_acc=False, last=32)
    torch.testing.assert_close(tail_only, tail, rtol=1e-5, atol=1e-5)


def test_runner_copies_prefill_statistics_into_the_policy_state():
    model = tiny_model("llama", attn_implementation="sdpa")
    pre = prefill_once(model, _ids(200)[0].tolist(), ["h2o", "snapkv"])
    managed = [i for i in pre.stats]
    assert managed and all("acc" in pre.stats[i] and "votes" in pre.stats[i] for i in managed)
    assert all(pre.stats[i]["acc"].shape[-1] == 199 for i in managed)
    acc_before = pre.stats[managed[0]]["acc"].clone()
    decode_method(model, pre, "h2o", DashKVConfig(min_context=0, budget=32, sink=4, window=8), max_new_tokens=3)
    assert torch.equal(pre.stats[managed[0]]["acc"], acc_before)  # H2O's in-place updates hit a copy


# ---- the whole runner on a tiny model with the default tokenizer ---------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from dashkv.models import default_tokenizer

    tok = default_tokenizer()
    model = tiny_model("llama", vocab_size=49152, num_layers=3, attn_implementation="sdpa",
                       max_position_embeddings=2048)
    d = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, d


def _plan(out: Path, model_dir: Path, **kw) -> EvalPlan:
    base = dict(model=str(model_dir), encoders=None, methods=["dense", "streaming", "oracle", "simhash"],
                budgets=[0.25], tasks=["niah_single_1", "perplexity"], lengths=[400], samples=2, haystack=None,
                out=out, seed=0, bits=64, max_new_tokens=4, continuation=8, progress=False)
    base.update(kw)
    return EvalPlan(**base)


def test_run_resumes_and_writes_summaries(tiny_lm, tmp_path):
    model, tok, d = tiny_lm
    plan = _plan(tmp_path / "out", d)
    rows = run_eval(model, tok, plan)
    per_sample = 1 + 3  # dense once + 3 sparse methods x 1 budget
    assert len(rows) == 2 * 2 * per_sample
    lines = (plan.out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    row = json.loads(lines[0])
    for f in ("task", "length", "index", "method", "budget", "prediction", "answers", "score", "read_fraction",
              "decode_s", "prefill_s", "model", "seed", "encoders_sha256"):
        assert f in row
    for name in ("summary.csv", "summary.md", "accuracy_vs_budget.png", "accuracy_vs_length.png"):
        assert (plan.out / name).stat().st_size > 0
    md = (plan.out / "summary.md").read_text()
    assert "niah_single_1" in md and "average over tasks" in md and "dense (full)" in md
    ppl = [json.loads(x) for x in lines if json.loads(x)["task"] == "perplexity"]
    assert all(r["new_tokens"] == 8 and r["ppl"] > 1 for r in ppl)

    # second run: nothing new
    calls = []
    orig = runner.prefill_once
    runner.prefill_once = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        again = run_eval(model, tok, plan)
    finally:
        runner.prefill_once = orig
    assert calls == [] and len(again) == len(rows)
    assert len((plan.out / "results.jsonl").read_text().splitlines()) == len(rows)

    # a killed run (torn last line, missing rows) continues where it stopped
    path = plan.out / "results.jsonl"
    kept = lines[:5]
    path.write_text("\n".join(kept) + "\n" + lines[5][:20])
    resumed = run_eval(model, tok, plan)
    final = path.read_text().splitlines()
    assert len(final) == len(rows) == len(resumed)
    assert len({runner.row_key(json.loads(x)) for x in final}) == len(rows)


def test_full_budget_methods_reproduce_dense_predictions(tiny_lm, tmp_path):
    model, tok, d = tiny_lm
    plan = _plan(tmp_path / "o", d, methods=["dense", "oracle", "streaming"], budgets=[1.0], samples=2,
                 tasks=["niah_single_1"])
    rows = run_eval(model, tok, plan, summary=False)
    by = {}
    for r in rows:
        by.setdefault(r["index"], {})[r["method"]] = r["prediction"]
    for preds in by.values():
        assert preds["oracle"] == preds["dense"] == preds["streaming"]


# ---- validation happens before any model work -------------------------------------------------------------
def _args(model_dir, **kw):
    base = dict(model=str(model_dir), encoders=None, methods="dense,streaming", budgets="1/8,1/16",
                tasks="niah_single_1", lengths="512", samples=2, haystack="default", out="/tmp/never-written",
                seed=0, bits=64)
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("change, message", [
    (dict(methods="dense,fancy"), "unknown method 'fancy'; valid methods: dense, dashkv"),
    (dict(tasks="niah_single_1,qa_9"), "unknown task 'qa_9'; valid tasks:"),
    (dict(budgets="1/8,2.5"), "out of range"),
    (dict(budgets="0"), "out of range"),
    (dict(budgets="-1/8"), "out of range"),
    (dict(budgets="abc"), "not a fraction"),
    (dict(lengths="4096"), "exceeds the model's maximum context of 2048"),
    (dict(lengths="10x"), "not an integer"),
    (dict(samples=0), "--samples must be an integer >= 1"),
    (dict(bits=100), "bits"),
    (dict(methods="dashkv"), "needs encoders"),
    (dict(haystack="files:/nonexistent/x"), "does not exist"),
    (dict(encoders="/nonexistent/enc"), "does not exist"),
    (dict(haystack="files:SHORT"), "is too short"),
    (dict(tasks="niah_multikey_2", lengths="120"), "task 'niah_multikey_2' at length 120"),
    (dict(tasks="lb_passage_count", lengths="300"), "too small for task 'lb_passage_count'"),
    (dict(tasks="lb_fewshot", lengths="150"), "too small for task 'lb_fewshot'"),
    (dict(tasks="fidelity_code", lengths="100", positions=128), "too short for the fidelity tasks"),
    (dict(tasks="fidelity_prose", haystack="noise"), "needs a prose haystack"),
    (dict(also="dense,dashkv"), "expected METHODS@BUDGETS"),
    (dict(also="oracle@3/2"), "out of range"),
    (dict(also="nope@1/8"), "unknown method 'nope'"),
    (dict(prefill_dtype="fp8"), "--prefill-dtype"),
])
def test_validation_errors_fire_before_model_work(tiny_lm, monkeypatch, change, message, tmp_path):
    _, _, d = tiny_lm
    if change.get("haystack") == "files:SHORT":
        short = tmp_path / "short.txt"
        short.write_text("Only two sentences here. Far too short for a long prompt.\n")
        change = dict(change, haystack=f"files:{short}")

    def boom(*a, **k):
        raise AssertionError("model work started before validation finished")

    import dashkv.models

    monkeypatch.setattr(dashkv.models, "load_model", boom)
    monkeypatch.setattr(runner, "prefill_once", boom)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.eval_command(_args(d, **change))


def test_valid_arguments_make_a_plan(tiny_lm):
    _, _, d = tiny_lm
    plan = validate_plan(_args(d, budgets="1/8,0.0625,512", methods="dense,h2o,dense"))
    assert plan.methods == ["dense", "h2o"]
    assert plan.budgets == [0.125, 0.0625, 512]
    assert plan.cells() == [("dense", "full"), ("h2o", "1/8"), ("h2o", "1/16"), ("h2o", "512")]
    assert plan.haystack is None


def test_cli_reports_validation_errors_as_one_line(tiny_lm, capsys):
    from dashkv.cli import main

    _, _, d = tiny_lm
    rc = main(["eval", "--model", str(d), "--methods", "dense,nope", "--out", "/tmp/never"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nope'" in err[0]


def test_simhash_asym_is_listed_and_refused_clearly_until_its_policy_exists(tiny_lm):
    from dashkv.selection import POLICIES

    _, _, d = tiny_lm
    assert "simhash_asym" in runner.EVAL_METHODS
    if "simhash_asym" in POLICIES:  # the reliability branch is merged: a valid method
        assert validate_plan(_args(d, methods="dense,simhash,simhash_asym")).methods[-1] == "simhash_asym"
    else:
        with pytest.raises(ValueError, match="'simhash_asym' is not available in this build"):
            validate_plan(_args(d, methods="dense,simhash_asym"))


def test_also_adds_cells_on_the_same_prefills(tiny_lm):
    _, _, d = tiny_lm
    plan = validate_plan(_args(d, methods="dense,h2o", budgets="1/16", also=["dense,h2o,oracle@1/8,1/16"]))
    assert plan.cells() == [("dense", "full"), ("h2o", "1/16"), ("h2o", "1/8"), ("oracle", "1/8"),
                            ("oracle", "1/16")]
    assert plan.all_methods == ["dense", "h2o", "oracle"]


def test_simhash_rows_score_by_hamming_on_every_path(tiny_lm, tmp_path):
    """The eval's simhash decodes with scorer='hamming' in the enabling config, which is what the fused
    kernel reads; simhash_asym with the asymmetric scorer. (That the kernel and the reference path then
    both run Hamming is the reliability branch's test of the SimHash policy.)"""
    _, _, d = tiny_lm
    plan = _plan(tmp_path, d)
    assert plan.config(1 / 16, "simhash").scorer == "hamming"
    assert plan.config(1 / 16, "simhash_asym").scorer == "asymmetric"
    assert plan.config(1 / 16, "dashkv").scorer == DashKVConfig(min_context=0).scorer


def test_resume_refuses_rows_of_other_encoder_weights(tmp_path):
    from dashkv.eval.runner import _check_same_encoders

    path = tmp_path / "results.jsonl"
    a, b = "a" * 64, "b" * 64
    rows = [{"method": "dashkv", "encoders_sha256": a}, {"method": "dense", "encoders_sha256": None}]
    _check_same_encoders(rows, {"dashkv": a}, path)
    _check_same_encoders(rows, {}, path)  # no learned method in this run
    _check_same_encoders(rows, {"dashkv_rerank": b}, path)  # another method, no rows of it yet
    with pytest.raises(ValueError, match="dashkv rows decoded with other encoder weights.*new --out"):
        _check_same_encoders(rows, {"dashkv": b}, path)
    with pytest.raises(ValueError, match="unrecorded"):  # encoders built in memory carry no digest
        _check_same_encoders(rows, {"dashkv": None}, path)
    with pytest.raises(ValueError, match="unrecorded"):  # a row from before digests were recorded
        _check_same_encoders(rows + [{"method": "dashkv"}], {"dashkv": a}, path)


def test_resume_refuses_rows_of_other_configuration_overrides(tmp_path):
    from types import SimpleNamespace

    from dashkv.eval.runner import _check_same_overrides

    path = tmp_path / "results.jsonl"
    summed = SimpleNamespace(config_overrides={"group_score": "sum"})
    plain = SimpleNamespace(config_overrides={})
    rows = [{"method": "dense"}, {"method": "dashkv", "config_overrides": {"group_score": "sum"}}]
    _check_same_overrides(rows, summed, path)
    _check_same_overrides(rows[:1], plain, path)  # only dense rows: they do not depend on the overrides
    _check_same_overrides([], summed, path)
    with pytest.raises(ValueError, match="overrides.*new --out"):
        _check_same_overrides(rows, plain, path)
    # a row of stop 21 decoded with --group-score probability: today's default ranks the same way
    _check_same_overrides([{"method": "dashkv", "config_overrides": {"group_score": "probability"}}], plain, path)
    with pytest.raises(ValueError, match="overrides"):  # older rows, no run.json: the default of their time (sum)
        _check_same_overrides([{"method": "dashkv"}], plain, path)
    _check_same_overrides([{"method": "dashkv"}], summed, path)
    with pytest.raises(ValueError, match="dashkv rows"):  # every method is checked, not the first row's only
        _check_same_overrides([{"method": "dense"}, {"method": "oracle"}, {"method": "dashkv"}], plain, path)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"group_score": None}}))  # a sweep of today
    _check_same_overrides([{"method": "dashkv"}], plain, path)


def test_rows_carry_the_group_score_they_were_decoded_with():
    """`row_overrides`: legacy rows (no record, no run.json field) ranked by summed scores; a recorded or
    sweep-wide group score equal to what today's default resolves to is none; methods it does not touch
    (oracle, SimHash's Hamming scan) never carry it."""
    from dashkv.eval.runner import row_overrides

    assert row_overrides("dashkv", None, None) == {"group_score": "sum"}
    assert row_overrides("dashkv", None, {"group_score": None}) == {}
    assert row_overrides("dashkv", None, {"group_score": "sum", "successors": 0}) == {"group_score": "sum"}
    assert row_overrides("dashkv", {"group_score": "probability"}, None) == {}
    assert row_overrides("dashkv_rerank", {"lowprec_fraction": 0.5}, {"group_score": "sum"}) == {
        "lowprec_fraction": 0.5, "group_score": "sum"}
    assert row_overrides("dashkv", {"query_bits": 4}, None) == {"query_bits": 4}  # sum is its default anyway
    assert row_overrides("oracle", {"group_score": "probability", "lowprec_fraction": 0.5}, None) == {
        "lowprec_fraction": 0.5}
    assert row_overrides("simhash", None, None) == {} and row_overrides("dense", {"query_bits": 4}, None) == {}
    # SimHash's Hamming scan ranks by the sum unless told otherwise: an explicit probability stays a label
    assert row_overrides("simhash", {"group_score": "probability"}, None) == {"group_score": "probability"}


def test_loaded_encoders_carry_their_weights_digest(tmp_path):
    from dashkv.encoders import HashEncoders

    enc = _simhash_for_dashkv(tiny_model("llama"))
    enc.save_pretrained(tmp_path / "e")
    back = HashEncoders.from_pretrained(tmp_path / "e")
    saved = json.loads((tmp_path / "e" / "encoders.json").read_text())["sha256"]
    assert back.weights_sha256 == saved and len(saved) == 64


def test_samples_at_the_models_own_limit_leave_room_for_the_answer(tmp_path):
    """A task length equal to max_position_embeddings: every prompt + its answer tokens + the fed-back last
    token fit (the 8K sweep once died on 'prompt has 8193 tokens' at 8192), and the run completes."""
    from dashkv.models import default_tokenizer

    tok = default_tokenizer()
    model = tiny_model("llama", vocab_size=49152, num_layers=2, attn_implementation="sdpa",
                       max_position_embeddings=400)
    d = tmp_path / "lm"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    plan = _plan(tmp_path / "out", d, methods=["dense", "streaming"], tasks=["niah_single_1", "vt"],
                 lengths=[400], samples=3, max_new_tokens=12)
    rows = run_eval(model, tok, plan, summary=False)
    assert len(rows) == 2 * 3 * 2
    assert all(r["prompt_tokens"] + 12 + 1 <= 400 for r in rows)


def test_overrides_equal_to_the_defaults_are_not_overrides(tiny_lm):
    """`--group-score probability` is what the default configuration ranks by: its rows must share cells
    with the plain run's; `sum` is an override, except where the other overrides make it the default."""
    _, _, d = tiny_lm
    assert validate_plan(_args(d, methods="dense,simhash_asym", group_score="probability")).config_overrides == {}
    plan = validate_plan(_args(d, methods="dense,simhash_asym", group_score="sum"))
    assert plan.config_overrides == {"group_score": "sum"}
    plan = validate_plan(_args(d, methods="dense,simhash_asym", group_score="sum", query_bits=4))
    assert plan.config_overrides == {"query_bits": 4}
    with pytest.raises(ValueError, match="head_budget|group_score"):
        DashKVConfig(group_score="probability", head_budget="pooled", rerank=4)


def test_resume_refuses_rows_of_another_sample_count(tmp_path):
    """A needle's depth is i / (samples - 1): rows of a 10-sample sweep are other prompts than a 20-sample
    sweep's under the same index, so resuming with another --samples is refused by name."""
    from types import SimpleNamespace

    from dashkv.eval.runner import _check_same_depths

    path = tmp_path / "results.jsonl"
    rows = [{"task": "niah_single_1", "index": i, "depth": i / 9} for i in range(10)] + [
        {"task": "cwe", "index": 3, "depth": None}]
    _check_same_depths(rows, SimpleNamespace(samples=10), path)
    _check_same_depths(rows[:1], SimpleNamespace(samples=20), path)  # depth 0 is the same for every count
    with pytest.raises(ValueError, match="niah_single_1 sample #1.*--samples 20"):
        _check_same_depths(rows, SimpleNamespace(samples=20), path)
    _check_same_depths(rows[9:10], SimpleNamespace(samples=5), path)  # rows past the plan's samples are not read
