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
    cpu.set_row_threads(None)


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
