"""LongBench-style tasks: every generator's answer is checkable and where it says; each scorer on
hand-made cases (LongBench's metrics.py semantics)."""

from __future__ import annotations

import re

import pytest

from dashkv.eval.fidelity import stdlib_sources
from dashkv.eval.longbench import LONGBENCH_TASKS, make_longbench_sample
from dashkv.eval.scoring import code_sim_score, count_score, levenshtein_ratio, retrieval_score, score_sample
from dashkv.models import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ---- scorers --------------------------------------------------------------------------------------------
def test_levenshtein_ratio_hand_cases():
    assert levenshtein_ratio("", "") == 1.0
    assert levenshtein_ratio("abc", "") == 0.0
    assert levenshtein_ratio("abc", "abc") == 1.0
    # fuzz.ratio("this is a test", "this is a test!") == 97 (LCS 14 of 14 + 15)
    assert round(100 * levenshtein_ratio("this is a test", "this is a test!")) == 97
    # indel, not substitution: "kitten" / "sitting" share "ittn" (LCS 4): 2 * 4 / 13
    assert levenshtein_ratio("kitten", "sitting") == pytest.approx(8 / 13)
    assert levenshtein_ratio("ab", "ba") == pytest.approx(0.5)


def test_code_sim_score_takes_the_first_line_without_comment_marks():
    ans = "return self._value + 1"
    assert code_sim_score("return self._value + 1\nfoo()", ans) == 1.0
    assert code_sim_score("\n\n    return self._value + 1", ans) == 1.0  # leading newlines and indentation
    assert code_sim_score("# add one\nreturn self._value + 1", ans) == 1.0  # comment lines skipped
    assert code_sim_score("```python\nreturn self._value + 1", ans) == 1.0
    assert code_sim_score("x = 1  # no\n", ans) == 0.0  # the line with '#' is skipped, the next is empty
    assert code_sim_score("# only a comment", ans) == 0.0  # no candidate line: empty vs answer
    assert code_sim_score("return self._value", ans) == round(100 * 2 * 18 / (18 + 22)) / 100


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("The answer is Paragraph 7 or Paragraph 3", "Paragraph 7") == 0.5
    assert retrieval_score("no idea", "Paragraph 7") == 0.0
    assert retrieval_score("Paragraph 17", "Paragraph 7") == 0.0  # whole numbers, not substrings
    with pytest.raises(ValueError):
        retrieval_score("7", "seven")
    assert count_score("12", "12") == 1.0
    assert count_score("12 or 13", "12") == 0.5
    assert count_score("twelve", "12") == 0.0
    assert score_sample("lb_passage_count", "There are 5.", ["5"]) == 1.0
    assert score_sample("niah_single_1", "1234567", ["1234567"]) == 1.0  # RULER tasks unchanged


# ---- generators -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(LONGBENCH_TASKS))
@pytest.mark.parametrize("length", [1500, 4000])
def test_samples_fit_are_deterministic_and_vary(tok, task, length):
    a = make_longbench_sample(task, tok, length, seed=0, index=0, depth=0.3)
    b = make_longbench_sample(task, tok, length, seed=0, index=0, depth=0.3)
    c = make_longbench_sample(task, tok, length, seed=0, index=1, depth=0.3)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.prompt != c.prompt
    n = len(tok.encode(a.prompt, add_special_tokens=False))
    assert 0.8 * length <= n <= length, n
    assert score_sample(task, a.answers[0], a.answers) == 1.0  # the gold answer scores 1


def test_passage_retrieval_sentence_is_in_the_named_paragraph_only(tok):
    for i, depth in enumerate([0.0, 0.5, 1.0]):
        s = make_longbench_sample("lb_passage_retrieval", tok, 3000, seed=0, index=i, depth=depth)
        paras = dict(re.findall(r"Paragraph (\d+): (.*?)(?=\n\nParagraph \d+: |$)", s.context, flags=re.S))
        assert len(paras) == s.metadata["paragraphs"]
        target = s.metadata["target"]
        assert s.answers == [f"Paragraph {target}"]
        holders = [k for k, p in paras.items() if s.metadata["sentence"] in p]
        assert holders == [str(target)]
        assert s.metadata["sentence"] in s.question
        assert target - 1 == round(depth * (len(paras) - 1))  # the paragraph sits at the sample's depth
        assert s.context[s.metadata["char_offset"]:].startswith(f"Paragraph {target}: ")


def test_passage_count_answer_is_the_number_of_distinct_paragraphs(tok):
    s = make_longbench_sample("lb_passage_count", tok, 3000, seed=0, index=2)
    paras = re.findall(r"Paragraph (\d+): (.*?)(?=\n\nParagraph \d+: |$)", s.context, flags=re.S)
    assert [int(k) for k, _ in paras] == list(range(1, len(paras) + 1))
    assert len(paras) == s.metadata["slots"]
    distinct = {p.strip() for _, p in paras}
    assert s.answers == [str(len(distinct))]
    assert len(distinct) < len(paras)  # some paragraphs are repeated


def test_code_answer_is_the_line_after_the_context(tok):
    s = make_longbench_sample("lb_code", tok, 3000, seed=0, index=0)
    path = [p for p in stdlib_sources() if p.name == s.metadata["file"]][0]
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    first, line = s.metadata["first_line"], s.metadata["line"]
    assert s.context.endswith("".join(lines[first - 1:line - 1]))
    assert s.answers == [lines[line - 1].strip()]
    assert s.metadata["no_chat"] and s.question == "Next line of code:\n"


def test_too_short_lengths_fail_clearly(tok):
    with pytest.raises(ValueError, match="too small for task 'lb_passage_retrieval'"):
        make_longbench_sample("lb_passage_retrieval", tok, 200)
    with pytest.raises(ValueError, match="unknown LongBench-style task"):
        make_longbench_sample("lb_nope", tok, 2000)


def test_runner_scores_longbench_tasks_on_a_tiny_model(tok, tmp_path):
    from dashkv.eval.runner import EvalPlan, build_prompt_ids, run_eval
    from dashkv.models import tiny_model

    model = tiny_model("llama", vocab_size=49152, num_layers=2, attn_implementation="sdpa",
                       max_position_embeddings=4096)
    d = tmp_path / "m"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    plan = EvalPlan(model=str(d), encoders=None, methods=["dense", "streaming"], budgets=[0.25],
                    tasks=sorted(LONGBENCH_TASKS), lengths=[1200], samples=1, haystack=None, out=tmp_path / "o",
                    max_new_tokens=6, progress=False)
    rows = run_eval(model, tok, plan)
    assert len(rows) == len(LONGBENCH_TASKS) * 2
    for r in rows:
        assert r["prompt_tokens"] + 6 <= 1200 and 0.0 <= r["score"] <= 1.0
        assert r["score"] == score_sample(r["task"], r["prediction"], r["answers"])
    code = make_longbench_sample("lb_code", tok, 1000)
    ids = build_prompt_ids(tok, code, chat=True)
    assert tok.decode(ids) == code.prompt  # raw completion prompt: no chat template for code


# ---- lb_fewshot (TREC-style few-shot classification) ---------------------------------------------------
def test_classification_score_hand_cases():
    from dashkv.eval.scoring import classification_score

    labels = ("math", "cmath", "logging")
    assert classification_score(" logging\n", "logging", labels) == 1.0
    assert classification_score("math or logging", "logging", labels) == 0.5  # two labels named
    assert classification_score("cmath", "cmath", labels) == 1.0  # "math" is only part of the true name
    assert classification_score("math", "cmath", labels) == 0.0
    assert classification_score("\nlogging\nmath", "logging", labels) == 1.0  # the first line only
    assert classification_score("the os module", "logging", labels) == 0.0
    with pytest.raises(ValueError, match="not one of the labels"):
        classification_score("x", "os", labels)
    assert score_sample("lb_fewshot", " heapq", ["heapq"]) == 1.0  # the task's own label set


def test_fewshot_labels_are_unambiguous_and_distinct():
    from dashkv.eval.longbench import FEWSHOT_MODULES, fewshot_examples

    ex = fewshot_examples()
    descriptions = [d for d, _ in ex]
    assert len(descriptions) == len(set(descriptions))  # one module per description
    assert {m for _, m in ex} == set(FEWSHOT_MODULES)
    for a in FEWSHOT_MODULES:  # no label inside another's name: substring scoring stays exact
        assert not any(a != b and a in b for b in FEWSHOT_MODULES), a
    counts = {m: sum(1 for _, x in ex if x == m) for m in FEWSHOT_MODULES}
    assert min(counts.values()) >= 8, counts  # every label has examples enough to be learned in context
    import math
    import statistics

    labels = dict(ex)
    assert labels.get(math.log.__doc__.split("\n")[0].strip()) in (None, "math")  # re-exports keep their home
    assert statistics.log is math.log and "statistics" not in {labels.get(d) for d in labels if d.startswith("log(")}
    keys = [d.rstrip(". ").lower() for d in labels]
    assert len(keys) == len(set(keys))  # near-duplicates (a trailing period) counted once


@pytest.mark.parametrize("length", [2048, 4096, 8112])
def test_fewshot_sample_answer_is_checkable_and_fits(tok, length):
    from dashkv.eval.haystack import count_tokens
    from dashkv.eval.longbench import fewshot_examples

    s = make_longbench_sample("lb_fewshot", tok, length, index=3)
    label = dict(fewshot_examples())[s.metadata["query"]]
    assert s.answers == [label]
    shots = re.findall(r"Description: (.*)\nModule: (.*)\n", s.context)
    assert len(shots) == s.metadata["shots"] >= 8
    assert s.metadata["query"] not in [d for d, _ in shots]  # the asked example is not among the shots
    assert all(dict(fewshot_examples())[d] == m for d, m in shots)  # every shot is labelled truly
    assert sum(m == label for _, m in shots) == s.metadata["label_shots"] >= 1
    assert s.question == f"Description: {s.metadata['query']}\nModule:"
    assert s.metadata["no_chat"] and 0.9 * length <= count_tokens(tok, s.prompt) <= length
    assert make_longbench_sample("lb_fewshot", tok, length, index=3).prompt == s.prompt  # deterministic


def test_fewshot_refuses_lengths_its_pool_cannot_fill(tok):
    with pytest.raises(ValueError, match="too long for task 'lb_fewshot'"):
        make_longbench_sample("lb_fewshot", tok, 16000)
    with pytest.raises(ValueError, match="too small for task 'lb_fewshot'"):
        make_longbench_sample("lb_fewshot", tok, 150)
