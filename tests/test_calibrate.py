"""Calibration: capture, training, evaluation report, CLI entry point, bad input, shipped encoders."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from dashkv.calibrate import (
    CalibrationError,
    calibrate,
    calibrate_command,
    evaluate,
    load_texts,
    make_sequences,
)
from dashkv.capture import capture_qkv
from dashkv.encoders import HashEncoders
from dashkv.models import tiny_model

SEQ = 192


def _ids(seed, rows, length=SEQ):
    return torch.randint(3, 512, (rows, length), generator=torch.Generator().manual_seed(seed))


def _words(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (n,), generator=g))


def _cal(model, **kw):
    args = dict(seq_len=SEQ, num_sequences=4, steps=25, progress=False, codes="sign")  # the trained recipe
    args.update(kw)
    return calibrate(model, None, _ids(1, 4), **args)


def test_capture_matches_eager_attention(tiny):
    """Captured post-RoPE Q/K reproduce the model's own attention weights (eager, output_attentions)."""
    ids = _ids(3, 1, 64)
    caps = capture_qkv(tiny, ids, [2], positions=torch.tensor([10, 63]), progress=False)
    assert tiny.config._attn_implementation == "eager"  # restored
    with torch.no_grad():
        att = tiny(input_ids=ids, output_attentions=True).attentions[2][0]  # (Hq, L, L)
    c = caps[2]
    assert c.keys.shape == (1, 2, 64, 16) and c.queries.shape == (1, 6, 2, 16)
    k = c.keys[0].repeat_interleave(3, 0)
    for j, pos in enumerate((10, 63)):
        logits = (c.queries[0, :, j] [:, None, :] * k[:, : pos + 1]).sum(-1) * c.scaling
        torch.testing.assert_close(torch.softmax(logits, -1), att[:, pos, : pos + 1], atol=1e-5, rtol=1e-4)


def test_calibrate_is_deterministic_and_records_metadata(tiny):
    a, b = _cal(tiny), _cal(tiny)
    assert a.layer_ids == (2, 3) and a.bits == 64
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for key in ("model_name", "objective", "steps", "seq_len", "seed", "corpus_sha256", "calibration_seconds",
                "dense_layers"):
        assert key in a.meta
    assert a.meta["dense_layers"] == [0, 1] and a.meta["steps"] == 25
    c = _cal(tiny, seed=1)
    assert not torch.equal(a.layers["2"].key.weights[0], c.layers["2"].key.weights[0])


def test_bce_objective_and_mlp_encoders_train(tiny):
    enc = _cal(tiny, objective="bce", depth=2, hidden=32, layers=[3], bits=128)
    assert enc.layer_ids == (3,) and enc.bits == 128 and enc.depth == 2
    assert all(torch.isfinite(p).all() for p in enc.state_dict().values())


@pytest.mark.parametrize("key_levels", [1, None])  # sign codes; the default 4-bit levels (no Hamming scorer)
def test_evaluate_report_structure_and_bounds(tiny, tmp_path, key_levels):
    enc = _cal(tiny, steps=60, key_levels=key_levels)
    rep = evaluate(tiny, None, enc, _ids(9, 2), seq_len=SEQ, num_sequences=2, queries_per_seq=8,
                   budgets=(1 / 4, 1 / 8), window=16, out_dir=tmp_path, progress=False)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "recall.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["budgets"] == ["1/4", "1/8"]
    methods = {"learned-asymmetric", "simhash", "oracle"} | ({"learned-hamming"} if key_levels == 1 else set())
    assert set(rep["summary"]) == methods
    # layers x budgets x (every method's two groupings + the probability score's: learned-asymmetric, oracle)
    assert len(rep["rows"]) == 2 * 2 * (2 * len(methods) + 2)
    assert {m for m, gd in rep["summary"].items() if "kv_head_prob" in gd} == {"learned-asymmetric", "oracle"}
    assert rep["summary"]["oracle"]["kv_head_prob"] == rep["summary"]["oracle"]["kv_head"]
    for r in rep["rows"]:
        assert 0.0 <= r["recall"] <= 1.0 + 1e-6 and r["output_error"] >= 0.0 and 0 < r["read_fraction"] <= 1
    s = rep["summary"]
    for b in ("1/4", "1/8"):  # oracle top-k per query head bounds every per-query-head selection
        for m in methods:
            assert s["oracle"]["query_head"][b]["recall"] >= s[m]["query_head"][b]["recall"] - 1e-6
    # the learned encoders beat SimHash on held-out data (deterministic: fixed seeds)
    assert s["learned-asymmetric"]["query_head"]["1/8"]["recall"] > s["simhash"]["query_head"]["1/8"]["recall"]


# ---- bad input: clear errors, before model work, nothing written ----------------------------------

def test_bad_text_inputs(tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "image.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CalibrationError, match="no readable text files"):
        load_texts([empty_dir])
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts([tmp_path / "missing.txt"])
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_texts([tmp_path / "blank.txt"])
    with pytest.raises(CalibrationError, match="too short"):
        make_sequences(None, torch.arange(100)[None], 64, 2)
    with pytest.raises(CalibrationError, match="empty"):
        make_sequences(None, [" "], 64, 2)


def test_load_texts_reads_dirs_and_gz(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    with gzip.open(tmp_path / "sub" / "c.gz", "wt") as f:
        f.write("gamma")
    (tmp_path / "skip.bin").write_bytes(b"\x00zz")
    assert load_texts([tmp_path]) == ["alpha", "beta", "gamma"]


def test_calibrate_rejects_bad_arguments_before_capture(tiny):
    with pytest.raises(CalibrationError, match="multiple of 64"):
        _cal(tiny, bits=100)
    with pytest.raises(CalibrationError, match="objective"):
        _cal(tiny, objective="mse")
    with pytest.raises(CalibrationError, match="too short"):
        calibrate(tiny, None, _ids(1, 1, 50), seq_len=SEQ, num_sequences=2, progress=False)
    with pytest.raises(CalibrationError, match="not full-attention"):
        _cal(tiny, layers=[7])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model + word-level tokenizer saved as a local HF directory (what load_model accepts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<unk>")
    d = tmp_path_factory.mktemp("tinymodel")
    tiny_model("llama", num_layers=3, vocab_size=64).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cmd(model, text, out, **kw):
    args = dict(bits=64, out=str(out), seq_len=128, steps=10, seed=0, overwrite=False, heldout=None,
                num_sequences=2, progress=False, codes="sign")
    args.update(kw)
    return calibrate_command(model, text, **args)


def test_command_end_to_end(tiny_dir, tmp_path, capsys):
    (tmp_path / "cal.txt").write_text(_words(600, 0))
    (tmp_path / "held.txt").write_text(_words(600, 1))
    out = tmp_path / "enc"
    rc = _cmd(str(tiny_dir), [str(tmp_path / "cal.txt")], out, heldout=[str(tmp_path / "held.txt")],
              heldout_sequences=1, budgets=(1 / 4,), fp16=True)
    assert rc == 0, capsys.readouterr().err
    enc = HashEncoders.from_pretrained(out)
    assert enc.layer_ids == (2,) and enc.meta["objective"] == "kl"
    assert (out / "report.json").is_file() and (out / "recall.png").is_file()
    assert "learned-asymmetric" in capsys.readouterr().out
    assert _cmd(str(tiny_dir), [str(tmp_path / "cal.txt")], out) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert _cmd(str(tiny_dir), [str(tmp_path / "cal.txt")], out, overwrite=True) == 0


@pytest.mark.parametrize("case", ["bits", "no_text_dir", "short", "exists", "empty_file"])
def test_command_bad_input_clear_error_no_output(case, tiny_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    text = tmp_path / "cal.txt"
    text.write_text(_words(600))
    model = "/nonexistent/model"  # these errors must come before the model is touched
    kw: dict = {}
    if case == "bits":
        kw["bits"], expect = 96, "multiple of 64"
    elif case == "no_text_dir":
        (tmp_path / "d").mkdir()
        text, expect = tmp_path / "d", "no readable text files"
    elif case == "short":
        text.write_text(_words(50))
        model, expect = str(tiny_dir), "too short"
    elif case == "empty_file":
        text.write_text("")
        expect = "empty"
    else:
        out.mkdir()
        expect = "exists"
    assert _cmd(model, [str(text)], out, **kw) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert out.exists() == (case == "exists")
    assert not list(tmp_path.glob(".tmp-*"))


# ---- the shipped default encoders ------------------------------------------------------------------

def test_shipped_default_encoders_fit_the_default_model():
    enc = HashEncoders.for_default_model(bits=64)
    assert enc.bits == 64 and enc.kind == "pq"  # since stop 29: PQ key codes
    assert enc.shape == {"model_type": "llama", "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3,
                         "head_dim": 64}
    assert enc.layer_ids == tuple(range(2, 30))
    enc.check_compatible(dict(enc.shape), bits=64)
    codes = enc.encode_keys(5, torch.randn(1, 3, 7, 64))
    assert codes.shape == (1, 3, 7, 1)
    assert all(torch.isfinite(p).all() for p in enc.state_dict().values())
    assert enc.meta["model_name"] and enc.meta["corpus_sha256"]
    with pytest.raises(Exception, match="no shipped encoders"):
        HashEncoders.for_default_model(bits=192)


# ---- the paper's recipe as options (issue 10) ------------------------------------------------------

def test_mlp_query_init_equals_the_linear_start():
    """A GELU MLP query encoder starts exactly at the linear (SimHash-like) map it replaces."""
    from dashkv.calibrate import _init_mlp_as_linear
    from dashkv.encoders import HeadwiseMLP

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 64, generator=g)
    mlp = HeadwiseMLP(3, 16, 64, hidden=160, depth=3)
    _init_mlp_as_linear(mlp, a, g)
    x = torch.randn(2, 3, 5, 16, generator=g)
    torch.testing.assert_close(mlp(x), torch.einsum("bhnd,hdk->bhnk", x, a), atol=1e-4, rtol=1e-4)


def test_anneal_schedule_runs_from_start_to_end():
    from dashkv.calibrate import anneal_schedule

    assert anneal_schedule(0, 100) == 1.0 and anneal_schedule(99, 100) == 10.0
    assert anneal_schedule(0, 1, (2.0, 5.0)) == 2.0
    assert 1.0 < anneal_schedule(50, 100) < 10.0


def test_paper_recipe_deterministic_and_round_trips(tiny, tmp_path):
    kw = dict(query_depth=3, query_hidden=128, key_relax="anneal", quantization=0.1, balance=0.1,
              query_from=0.75, queries_per_seq=8)
    a, b = _cal(tiny, **kw), _cal(tiny, **kw)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.depth == 1 and a.query_depth == 3 and a.layers["2"].query.depth == 3
    assert a.meta["key_relax"] == "anneal" and a.meta["quantization"] == 0.1 and a.meta["query_depth"] == 3
    assert a.meta["attention_fingerprint"] and a.meta["query_from"] == 0.75
    a.save_pretrained(tmp_path / "enc")
    back = HashEncoders.from_pretrained(tmp_path / "enc")
    assert back.query_depth == 3 and back.query_hidden == 128 and back.depth == 1
    back.check_compatible(tiny)
    q = torch.randn(1, 6, 1, 16)
    k = torch.randn(1, 2, 7, 16)
    # decode-sized inputs: MLP queries go through torch, linear keys through the compiled path; same values
    torch.testing.assert_close(back.project_queries(2, q), a.layers["2"].query(q))
    assert torch.equal(back.encode_keys(2, k), a.encode_keys(2, k))
    assert back._fast_linear(2, "query", q) is None


@pytest.mark.parametrize("kw, match", [
    (dict(key_relax="sigmoid"), "key_relax"),
    (dict(anneal_beta=(0.0, 10.0)), "anneal_beta"),
    (dict(query_depth=5, query_hidden=32), "query_depth"),
    (dict(query_depth=3, query_hidden=0), "query_depth"),
    (dict(quantization=-1.0), "quantization"),
    (dict(query_from=1.0), "query_from"),
    (dict(init="pca"), "init"),
])
def test_recipe_options_rejected_before_capture(tiny, kw, match):
    with pytest.raises(CalibrationError, match=match):
        _cal(tiny, **kw)


def test_command_bad_recipe_option_clear_error_no_output(tmp_path, capsys):
    (tmp_path / "cal.txt").write_text(_words(600))
    out = tmp_path / "enc"
    assert _cmd("/nonexistent/model", [str(tmp_path / "cal.txt")], out, key_relax="nope") == 2
    err = capsys.readouterr().err
    assert "key_relax" in err and "Traceback" not in err and not out.exists()


def test_calibration_code_never_overlaps_heldout_code():
    from dashkv.calibrate import heldout_code_files, stdlib_package_dirs

    dirs = stdlib_package_dirs()
    assert dirs and all(d.is_dir() for d in dirs)
    held = {p.resolve() for p in heldout_code_files()}
    assert held and not any(p.resolve() in held for d in dirs for p in d.rglob("*.py"))


def test_spatial_vote_option():
    """Δ_spatial: off by default; on, it moves a key every head ranks highly up and stays on the reference path."""
    from dashkv.config import DashKVConfig
    from dashkv.decode import _fast_kernel
    from dashkv.selection import DashKVPolicy, LayerState, spatial_vote

    with pytest.raises(ValueError, match="spatial_vote"):
        DashKVConfig(min_context=0, spatial_vote=float("nan"))
    s = torch.zeros(1, 4, 10)
    s[0, 0, 3] = s[0, 1, 3] = s[0, 2, 3] = 1.0  # three of four heads like key 3
    s[0, 3, 7] = 1.2  # head 3 alone likes key 7 a bit more
    assert int(s[0, 3].argmax()) == 7 and int(spatial_vote(s, 3.0)[0, 3].argmax()) == 3
    enc = HashEncoders.simhash({"model_type": "llama", "num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2,
                                "head_dim": 16}, 64, [1])
    keys, q = torch.randn(1, 2, 50, 16), torch.randn(1, 4, 16)
    st = LayerState(1, enc.encode_keys(1, keys))
    off, on = DashKVPolicy(DashKVConfig(min_context=0), enc), DashKVPolicy(DashKVConfig(min_context=0, spatial_vote=0.5), enc)
    assert torch.equal(off.per_head_scores(st, q), spatial_vote(off.per_head_scores(st, q), 0.0))
    assert not torch.equal(off.per_head_scores(st, q), on.per_head_scores(st, q))
    assert _fast_kernel(on, on.config, keys) is None


def test_command_heldout_code_report(tiny_dir, tmp_path, capsys):
    (tmp_path / "cal.txt").write_text(_words(600, 0))
    out = tmp_path / "enc"
    rc = _cmd(str(tiny_dir), [str(tmp_path / "cal.txt")], out, heldout_code=True, heldout_sequences=1,
              budgets=(1 / 4,))
    assert rc == 0, capsys.readouterr().err
    assert (out / "report_code.json").is_file() and (out / "recall_code.png").is_file()
    assert not (out / "report.json").exists()
    assert "standard-library code" in capsys.readouterr().out


def test_query_pca_start_spans_the_top_query_directions():
    """query_pca: orthonormal directions (at the Gaussian start's scale) spanning the queries' top
    principal subspace, so with fewer bits than dimensions no query energy is lost (random hyperplanes
    lose about half); with more bits than dimensions the rest are random."""
    from dashkv.calibrate import _start_projection

    def queries(d, seed=0):  # (S, Hq, P, d): 3 query heads per KV head, living in a 4-dim subspace
        g = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
        spread = torch.tensor([8.0, 6.0, 4.0, 2.0] + [0.0] * (d - 4))
        return (torch.randn(3, 6, 40, d, generator=g) * spread) @ basis.T

    def start(q, init, seed=1):
        return _start_projection(q, 2, q.shape[-1], 64, init, torch.Generator().manual_seed(seed))

    q16 = queries(16)
    r = start(q16, "query_pca") / 16 ** 0.5
    assert r.shape == (2, 16, 64)
    for h in range(2):
        torch.testing.assert_close(r[h, :, :16].T @ r[h, :, :16], torch.eye(16), atol=1e-4, rtol=0)
    assert torch.equal(start(q16, "query_pca"), start(q16, "query_pca"))
    assert not torch.equal(start(q16, "query_pca"), start(q16, "query_pca", seed=2))

    q128 = queries(128)
    flat = q128.reshape(-1, 128)
    for init, lo, hi in (("query_pca", 0.999, 1.001), ("simhash", 0.3, 0.7)):
        r = start(q128, init)[0]
        basis = torch.linalg.qr(r).Q  # orthonormal basis of the 64 directions' span
        kept = (flat @ basis).pow(2).sum() / flat.pow(2).sum()
        assert lo < float(kept) < hi, (init, float(kept))


def test_query_pca_init_trains_deterministically(tiny):
    a, b = _cal(tiny, init="query_pca", steps=10), _cal(tiny, init="query_pca", steps=10)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.meta["init"] == "query_pca"
    c = _cal(tiny, steps=10)
    assert c.meta["init"] == "svd" and not torch.equal(a.layers["2"].key.weights[0], c.layers["2"].key.weights[0])
