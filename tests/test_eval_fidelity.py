"""Teacher-forced fidelity: documents, metrics, and the runner's fidelity rows on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from dashkv.config import DashKVConfig
from dashkv.eval.fidelity import compare_logprobs, make_fidelity_documents, stdlib_sources
from dashkv.eval.runner import EvalPlan, decode_method, prefill_once, run_eval
from dashkv.models import default_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_documents_have_the_length_and_are_deterministic(tok, kind):
    docs = make_fidelity_documents(tok, kind, 600, 3, seed=0, positions=50)
    again = make_fidelity_documents(tok, kind, 600, 3, seed=0, positions=50)
    assert [d.ids for d in docs] == [d.ids for d in again]
    assert all(len(d.ids) == 600 and len(d.target_ids) == 50 and len(d.context_ids) == 550 for d in docs)
    assert len({tuple(d.ids) for d in docs}) == 3
    if kind == "code":
        names = {p.name for p in stdlib_sources()}
        assert all(d.source.startswith("stdlib:") and d.source[7:] in names for d in docs)
        # the window is the file's text from a line start
        d = docs[0]
        text = [p for p in stdlib_sources() if p.name == d.source[7:]][0].read_text(encoding="utf-8", errors="replace")
        assert d.start == 0 or text[d.start - 1] == "\n"
        assert text[d.start:].startswith(tok.decode(d.ids[:20]).split("\n")[0])


def test_compare_logprobs_hand_cases():
    dense = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same = compare_logprobs(dense, dense.clone(), [0, 1])
    assert same.agree == 2 and same.kl == pytest.approx(0.0, abs=1e-7)
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    st = compare_logprobs(dense, other, [0, 1])
    assert st.agree == 1 and st.agreement == 0.5
    p = dense[0].exp()
    want = float((p * (dense[0] - other[0])).sum()) / 2
    assert st.kl == pytest.approx(want, rel=1e-6)
    assert st.nll_sum == pytest.approx(float(-other[0, 0] - other[1, 1]), rel=1e-6)


def test_teacher_forced_logprobs_equal_a_full_forward_pass():
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(3, 500, (1, 120), generator=torch.Generator().manual_seed(0))
    full = torch.log_softmax(model(ids).logits[0].float(), -1)
    pre = prefill_once(model, ids[0, :100].tolist(), ["dense"])
    res, _ = decode_method(model, pre, "dense", DashKVConfig(min_context=0, budget=1.0), targets=ids[0, 100:].tolist(), logprobs=True)
    # row t predicts token 100 + t from tokens < 100 + t, like the full pass's position 99 + t
    torch.testing.assert_close(res.logprobs, full[99:119], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bf16_prefill_keeps_an_fp32_cache(dtype):
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(3, 500, (1, 150), generator=torch.Generator().manual_seed(1))[0].tolist()
    pre = prefill_once(model, ids, ["h2o", "snapkv"], dtype=dtype)
    assert all(k.dtype == torch.float32 and v.dtype == torch.float32 for k, v in pre.kv.values())
    ref = prefill_once(model, ids, ["h2o", "snapkv"], dtype="fp32")
    for i in pre.kv:
        diff = (pre.kv[i][0] - ref.kv[i][0]).abs()
        assert float(diff.mean()) < 0.03 * float(ref.kv[i][0].abs().mean())  # bf16 rounding (~2^-8), not garbage
        if dtype == "bf16":
            assert float(diff.max()) > 0  # autocast did run the matmuls in bf16


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tok):
    model = tiny_model("llama", vocab_size=49152, num_layers=3, attn_implementation="sdpa",
                       max_position_embeddings=2048)
    d = tmp_path_factory.mktemp("tiny-lm-fid")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, d


def test_runner_fidelity_rows_resume_and_dense_is_its_own_reference(tiny_lm, tmp_path):
    model, tok, d = tiny_lm
    plan = EvalPlan(model=str(d), encoders=None, methods=["dense", "streaming", "oracle"], budgets=[0.25],
                    tasks=["fidelity_prose", "fidelity_code"], lengths=[300], samples=2, haystack=None,
                    out=tmp_path / "o", positions=12, progress=False,
                    also=[(["oracle"], [1.0])])
    rows = run_eval(model, tok, plan)
    assert len(rows) == 2 * 2 * 4  # tasks x samples x (dense, streaming 1/4, oracle 1/4, oracle 1)
    for r in rows:
        assert r["positions"] == 12 and 0 <= r["agreement"] <= 1 and r["kl"] >= 0
        assert r["score"] == r["agreement"]
        if r["method"] == "dense" or (r["method"] == "oracle" and r["budget"] == "1"):
            assert r["agree"] == 12 and r["kl"] == pytest.approx(0.0, abs=1e-5)
            assert r["nll"] == pytest.approx(r["dense_nll"], abs=1e-4)
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "fidelity_prose" in md and "top-1 agreement" in md
    # resume: nothing to do; deleting one method row recomputes only that row (against a fresh reference)
    path = tmp_path / "o" / "results.jsonl"
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if not (json.loads(ln)["method"] == "streaming" and json.loads(ln)["index"] == 1
                                       and json.loads(ln)["task"] == "fidelity_code")]
    path.write_text("\n".join(keep) + "\n")
    rows2 = run_eval(model, tok, plan)
    assert len(rows2) == len(rows)
    new = [r for r in rows2 if r["method"] == "streaming" and r["index"] == 1 and r["task"] == "fidelity_code"]
    old = [r for r in rows if r["method"] == "streaming" and r["index"] == 1 and r["task"] == "fidelity_code"]
    assert new[0]["agree"] == old[0]["agree"] and new[0]["kl"] == pytest.approx(old[0]["kl"], rel=1e-5)
