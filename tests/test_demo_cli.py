"""The demo end to end on a tiny model, and the CLI's argument checking (no model work on bad input)."""

import argparse
import json

import pytest
import torch

from dashkv import cli
from dashkv.demo import run_demo
from dashkv.encoders import HashEncoders
from dashkv.models import default_tokenizer, model_shape, tiny_model


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model = tiny_model("llama", vocab_size=49152)
    tok = default_tokenizer()
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers)
    args = argparse.Namespace(model="tiny", encoders=None, budget="1/8", bits=64, sink=4, window=16,
                              length=600, depths="0.2,0.8", text=None, out=str(tmp_path), new_tokens=4,
                              min_context=0)
    assert run_demo(args, model, tok, enc) == 0
    out = capsys.readouterr().out
    assert "unmodified" in out and "dashkv" in out and "decode speed" in out
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [(r["method"], r["depth"]) for r in rows] == [
        ("unmodified", 0.2), ("dashkv", 0.2), ("unmodified", 0.8), ("dashkv", 0.8)]
    assert all(r["tokens"] >= 1 for r in rows)
    dashkv_rows = [r for r in rows if r["method"] == "dashkv"]
    assert all(0 < r["read_fraction"] < 1 for r in dashkv_rows)
    assert all(0.0 <= r["agreement"] <= 1.0 for r in dashkv_rows)
    assert all(r["agreement"] is None for r in rows if r["method"] == "unmodified")
    assert "StaticCache" in out and "teacher-forced agreement" in out
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["demo", "--budget", "1.5"], "budget"),
    (["demo", "--budget", "lots"], "budget"),
    (["demo", "--bits", "48"], "bits"),
    (["demo", "--depths", "0.5,2"], "depths"),
    (["demo", "--length", "10"], "length"),
    (["demo", "--text", "/nonexistent/file.txt"], "does not exist"),
    (["generate", "--prompt-file", "/nonexistent.txt"], "does not exist"),
    (["generate", "--prompt-file", "/etc/hostname", "--budget", "0"], "budget"),
    (["demo", "--encoders", "/nonexistent-encoders"], "does not exist"),
])
def test_cli_rejects_bad_input_before_loading_a_model(monkeypatch, capsys, argv, message):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded although the arguments were bad")

    monkeypatch.setattr("dashkv.models.load_model", no_model)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dashkv: error:") and message in err and "Traceback" not in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("demo", "generate", "calibrate", "eval", "bench", "budget"):
        assert word in out


def test_every_option_of_every_command_has_help():
    """`--help` on any command explains each of its options (argparse prints none for help=None)."""
    import argparse

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(" ".join(path + [action.option_strings[0] if action.option_strings else action.dest]))

    walk(cli.build_parser(), ["dashkv"])
    assert not missing, missing


def test_python_m_dashkv_bench_is_the_cli_bench(capsys):
    from dashkv import bench

    with pytest.raises(SystemExit):
        bench.main(["kernel", "--help"])
    assert "--shapes" in capsys.readouterr().out


def test_bench_decode_runs_on_a_tiny_model(tmp_path, capsys):
    from dashkv.bench_decode import ROWS, bench_decode

    model = tiny_model("llama", vocab_size=49152)
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers)
    args = argparse.Namespace(model="tiny", encoders=None, budget="1/8", bits=64, sink=4, window=16, context=700, min_context=0,
                              batch="1,2", dtype="float32", steps=4, warmup=1, profile=True,
                              json=str(tmp_path / "b.json"))
    assert bench_decode(args, model, default_tokenizer(), enc) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert [t["batch"] for t in result["tables"]] == [1, 2]
    for table in result["tables"]:
        rows = {r["row"]: r for r in table["rows"]}
        assert list(rows) == list(ROWS)
        assert all(r["steps"] == 4 and r["median_ms"] > 0 and r["cache_mb"] > 0 for r in rows.values())
        assert rows["static"]["x_static"] == 1.0 and rows["floor"]["x_floor"] == 1.0
        assert 0 < rows["dashkv"]["read_fraction_sparse_layers"] < 0.2
    assert result["floor_tokens"] == 88  # budget 1/8 of 700 tokens, rounded up
    parts = result["profile"]["parts"]
    assert {"one-call append (K/V rows + key codes)", "fused kernel (query projection, scan, select, attend)"} <= set(parts)
    assert "query projection" not in parts  # linear query encoders are applied inside the fused call
    assert "x static" in capsys.readouterr().out


def test_calibrate_command_rejects_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dashkv.models.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["calibrate", "--text", "/nonexistent", "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["calibrate", "--text", "/etc/hostname", "--bits", "48", "--out", str(tmp_path / "e")]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_generate_command_on_a_local_model_directory(tmp_path, capsys):
    model = tiny_model("llama", vocab_size=49152)
    model.save_pretrained(tmp_path / "m")
    default_tokenizer().save_pretrained(tmp_path / "m")
    s = model_shape(model)
    HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers).save_pretrained(tmp_path / "enc")
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    argv = ["generate", "--model", str(tmp_path / "m"), "--encoders", str(tmp_path / "enc"), "--prompt-file",
            str(prompt), "--max-new-tokens", "4", "--budget", "48", "--window", "16", "--min-context", "0"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "[dashkv]" in err and "decode" in err and "sparse layers read" in err
    # encoders of another shape are refused with the mismatch named, before generating
    other = tiny_model("llama", num_kv_heads=3, head_dim=8)
    so = model_shape(other)
    HashEncoders.simhash(so.to_dict(), 64, so.full_attention_layers).save_pretrained(tmp_path / "enc2")
    argv[4] = str(tmp_path / "enc2")
    assert cli.main(argv) == 2
    assert "num_kv_heads" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_kernel_rows(dtype):
    from dashkv.bench import METHODS, bench_kernel

    (row,) = bench_kernel(ns=(2048,), bits=(64,), shapes=("smollm2",), repeats=2, progress=False, dtype=dtype)
    assert row["dtype"] == dtype and row["tokens_read"] == 128  # 1/16 of 2048: 4 sinks + 64 window + 60 candidates
    assert all(row[f"{m}_ms"] > 0 for m in METHODS)
    assert row["dense_max_abs_err"] < (1e-4 if dtype == "float32" else 2e-2)
    assert row["dashkv_bytes"] < row["dense_bytes"]


def test_teacher_forced_agreement_is_one_at_full_budget():
    from dashkv import hf
    from dashkv.config import DashKVConfig
    from dashkv.demo import prefill, teacher_forced_agreement
    from dashkv.eval.runner import greedy_decode

    model = tiny_model("llama")
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers)
    ids = torch.randint(3, 500, (1, 400), generator=torch.Generator().manual_seed(0))
    reference = greedy_decode(model, prefill(model, ids, static_tokens=12), int(ids[0, -1]), 10)
    with hf.enable(model, enc, DashKVConfig(min_context=0, budget=1.0, dense_layers=())) as handle:
        assert teacher_forced_agreement(model, handle.cache_from(prefill(model, ids)), int(ids[0, -1]),
                                        reference) == 1.0
