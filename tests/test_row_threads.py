"""Batch rows split over threads (`set_row_threads`): the serial kernel runs contiguous slices of the
batch (of a single row's KV heads) on a small worker pool. Rows are independent, so every split gives the same selection and counts;
the outputs agree to float32 rounding (the attention's split into parts depends on the rows per call)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fused_paths import SPARSE, _simhash
from test_kernels_cpu import make_inputs

from dashkv import hf
from dashkv.attention import QuantizedRows
from dashkv.config import DashKVConfig
from dashkv.kernels import cpu
from dashkv.models import tiny_model


@pytest.fixture(autouse=True)
def _split_small_calls_too(monkeypatch, request):
    """The tests' calls are small: split them anyway (the size rule has its own test)."""
    if "size_rule" not in request.node.name:
        monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_ROWS", 0)
        monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_HEADS", 0)
    yield
    cpu._ROW_THREADS[0] = None  # back to the default, read from the environment at the next call


def test_size_rule_keeps_small_calls_on_the_calling_thread(monkeypatch):
    calls = []
    real = cpu._row_pool
    monkeypatch.setattr(cpu, "_row_pool", lambda n: calls.append(n) or real(n))
    cpu.set_row_threads(2)
    for batch, hkv, n, split in ((4, 3, 4096, False), (4, 3, 8192, True), (1, 3, 32768, False), (1, 4, 40000, True)):
        query, q_proj, keys, values, codes, _ = make_inputs(0, batch, 3, hkv, 1, 8, n, starts=False)
        calls.clear()
        cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=16, critical=64, scaling=0.3)
        assert bool(calls) == split, (batch, hkv, n)


def _options(kind, keys, values, hq, hkv):
    temps = np.linspace(0.2, 1.5, hq).astype(np.float32)
    if kind == "plain":
        return {}
    if kind == "hamming-query-head":
        return dict(scorer="hamming", grouping="query_head")
    if kind == "probability":
        return dict(prob_temps=temps)
    if kind == "pooled":
        return dict(prob_temps=temps, pool_temps=np.ones(hkv), k_min=2)
    if kind in ("rerank8", "rerank4"):
        kq = QuantizedRows.quantize(keys, 8 if kind == "rerank8" else 4)
        return dict(prob_temps=temps, keys8=(kq.q, kq.scale), keep=20)
    if kind == "lowprec":
        k8, v8 = QuantizedRows.quantize(keys), QuantizedRows.quantize(values)
        return dict(lowprec=30, keys8=(k8.q, k8.scale), values8=(v8.q, v8.scale), return_lowprec_counts=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["plain", "hamming-query-head", "probability", "pooled", "rerank8", "rerank4",
                                  "lowprec"])
@pytest.mark.parametrize("seed, batch, hkv", [(0, 5, 2), (1, 5, 2), (2, 1, 4), (3, 1, 3)])
def test_every_row_split_gives_the_same_selection(kind, seed, batch, hkv):
    """Batch rows split over threads, or (one row) its KV heads."""
    query, q_proj, keys, values, codes, start = make_inputs(seed, batch, 3, hkv, 1, 16, 900 + 37 * seed)
    opts = _options(kind, keys, values, query.shape[1], keys.shape[1])
    kw = dict(sink=4, window=16, critical=60, scaling=0.25, start=start, return_counts=True, **opts)
    runs = []
    for threads in (1, 2, 3, 5, 8):
        cpu.set_row_threads(threads)
        runs.append(cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw))
    base = runs[0]
    for got in runs[1:]:
        assert len(got) == len(base)
        torch.testing.assert_close(got[0], base[0], atol=2e-6, rtol=2e-6)
        for a, b in zip(got[1:], base[1:]):  # counts (and the 8-bit tier's) are exact
            assert torch.equal(a, b)
    cpu.set_row_threads(1)  # and each row as its own call: the same counts
    for i in range(query.shape[0]):
        row = {k: tuple(t[i:i + 1] for t in v) for k, v in opts.items() if k in ("keys8", "values8")}
        one = cpu.dashkv_decode_cpu(query[i:i + 1], q_proj[i:i + 1], keys[i:i + 1], values[i:i + 1],
                                    codes[i:i + 1], **{**kw, **row, "start": None if start is None else start[i:i + 1]})
        assert torch.equal(one[1][0], base[1][i])
        torch.testing.assert_close(one[0][0], base[0][i], atol=2e-6, rtol=2e-6)


def test_indices_and_parallel_calls_stay_on_one_call():
    """return_indices reads the calling thread's workspace: such calls are never split (and agree)."""
    query, q_proj, keys, values, codes, start = make_inputs(3, 4, 3, 2, 1, 16, 700)
    kw = dict(sink=4, window=16, critical=50, scaling=0.25, start=start, return_indices=True)
    cpu.set_row_threads(1)
    a = cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
    cpu.set_row_threads(4)
    b = cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_generate_gives_the_same_tokens_with_rows_on_threads():
    """The cache's preallocated buffers (rows of a larger buffer, left padding) through `generate`."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 500, (4, 600), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    mask[3, :350] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cfg = DashKVConfig(**{**SPARSE.to_dict(), "group_score": "probability"})
    enc = _simhash(model)
    outs = []
    for threads in (1, 2, 3):
        cpu.set_row_threads(threads)
        with hf.enable(model, enc, cfg, track=True) as handle:
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))
            assert handle.stats.per_step  # read counts still recorded from the split calls
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("bad", [0, -1, 65, 2.5, True, "2"])
def test_bad_row_threads_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="row threads"):
        cpu.set_row_threads(bad)


def test_an_unbounded_openmp_spin_is_warned_once(monkeypatch, caplog):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cpu, "_SPIN_CHECKED", [False])
    from dashkv import _logging
    monkeypatch.setattr(_logging, "_seen", set())
    query, q_proj, keys, values, codes, start = make_inputs(2, 3, 3, 2, 1, 16, 300)
    cpu.set_row_threads(2)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=16, critical=20, scaling=0.25)
    hits = [r for r in caplog.records if "GOMP_SPINCOUNT" in r.getMessage()]
    assert len(hits) == (1 if cpu._omp_spin_unbounded() else 0)


@pytest.mark.parametrize("variant", ["bfloat16", "float16", "query_bits4", "query_bits8", "buffer_view"])
@pytest.mark.parametrize("batch, hkv", [(5, 2), (1, 3)])
def test_splits_agree_for_half_precision_query_bits_and_buffer_views(variant, batch, hkv):
    """The variants the main test leaves out; batch 1 with left padding (a head split with start > 0)."""
    n = 800
    query, q_proj, keys, values, codes, start = make_inputs(11, batch, 3, hkv, 1, 16, n)
    if batch == 1:
        start = torch.tensor([123])
    kw = dict(sink=4, window=16, critical=60, scaling=0.25, start=start, return_counts=True)
    if variant in ("bfloat16", "float16"):
        keys, values = keys.to(getattr(torch, variant)), values.to(getattr(torch, variant))
    elif variant.startswith("query_bits"):
        kw["query_bits"] = int(variant[-1])
    else:  # views [:, :, :n] of larger preallocated buffers: every head's block starts further on
        big = [torch.zeros(batch, hkv, n + 100, t.shape[-1], dtype=t.dtype) for t in (keys, values, codes)]
        for buf, t in zip(big, (keys, values, codes)):
            buf[:, :, :n] = t
        keys, values, codes = (buf[:, :, :n] for buf in big)
    runs = []
    for threads in (1, 2, 3):
        cpu.set_row_threads(threads)
        runs.append(cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw))
    for got in runs[1:]:
        torch.testing.assert_close(got[0], runs[0][0], atol=2e-6, rtol=2e-6)
        assert torch.equal(got[1], runs[0][1])


@pytest.mark.parametrize("raw, ok", [("3", 3), ("", 0), ("abc", None), ("1.5", None), ("-1", None), ("0", None),
                                     ("200", None)])
def test_the_row_threads_environment_variable_is_checked_by_name(monkeypatch, raw, ok):
    monkeypatch.setenv("DASHKV_ROW_THREADS", raw)
    monkeypatch.setattr(cpu, "_ROW_THREADS", [None])
    if ok is None:
        with pytest.raises(ValueError, match="DASHKV_ROW_THREADS"):
            cpu.row_threads()
    else:
        assert cpu.row_threads() == (ok or max(1, torch.get_num_threads()))


def _split_call_in_child(args):
    query, q_proj, keys, values, codes = args
    cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, sink=4, window=16, critical=40, scaling=0.25)


def test_a_forked_child_splits_without_hanging():
    """A child inherits the pool object but not its threads: it must start its own."""
    import multiprocessing

    args = make_inputs(4, 4, 3, 2, 1, 16, 400, starts=False)[:5]
    cpu.set_row_threads(2)
    _split_call_in_child(args)  # the parent's pool exists now
    child = multiprocessing.get_context("fork").Process(target=_split_call_in_child, args=(args,))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


def test_errors_in_any_part_reach_the_caller_after_every_part_stopped(monkeypatch):
    import threading
    import time

    query, q_proj, keys, values, codes, _ = make_inputs(5, 4, 3, 2, 1, 16, 400, starts=False)
    real, finished = cpu._run_rows, []

    def worker_fails(kernel, args, out, counts=0):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("worker part failed")
        return real(kernel, args, out, counts)

    def caller_fails(kernel, args, out, counts=0):
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("caller part failed")
        time.sleep(0.3)
        res = real(kernel, args, out, counts)
        finished.append(True)
        return res

    cpu.set_row_threads(2)
    kw = dict(sink=4, window=16, critical=40, scaling=0.25)
    monkeypatch.setattr(cpu, "_run_rows", worker_fails)
    with pytest.raises(RuntimeError, match="worker part failed"):
        cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
    monkeypatch.setattr(cpu, "_run_rows", caller_fails)
    with pytest.raises(RuntimeError, match="caller part failed"):
        cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
    assert finished == [True]  # the worker's part was waited for, not left writing into the output
