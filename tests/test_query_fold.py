"""The linear query encoder folded into the fused CPU kernel's call (`query_encoder=`): the kernel's own
projection is the one `linear_heads_cpu` computes, so every schedule gives what passing `q_proj` gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernels_cpu import make_inputs

from dashkv.kernels import cpu


def _encoder(seed, hq, d, b):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((hq, d, b)) / np.sqrt(d)).astype(np.float32),
            (rng.standard_normal((hq, b)) * 0.1).astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed, batch, hkv, words, prob", [(0, 1, 3, 1, True), (1, 3, 2, 2, True), (2, 1, 4, 1, False),
                                                          (3, 4, 1, 1, False)])
def test_folded_query_encoder_equals_the_passed_projection(monkeypatch, threads, seed, batch, hkv, words, prob):
    monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_ROWS", 0)  # split these small calls too (threads 2)
    monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_HEADS", 0)
    cpu.set_row_threads(threads)
    try:
        query, _, keys, values, codes, start = make_inputs(seed, batch, 3, hkv, words, 16, 700)
        hq = query.shape[1]
        w, b = _encoder(seed, hq, 16, 64 * words)
        q_proj = cpu.linear_heads_cpu(query[:, :, None, :], w, b)[:, :, 0, :]
        kw = dict(sink=4, window=16, critical=50, scaling=0.25, start=start, return_counts=True)
        if prob:
            kw["prob_temps"] = np.linspace(0.2, 1.5, hq).astype(np.float32)
        want = cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
        got = cpu.dashkv_decode_cpu(query, None, keys, values, codes, query_encoder=(w, b), **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        cpu.set_row_threads(None)


def test_parallel_schedule_folds_the_encoder_too():
    query, _, keys, values, codes, _ = make_inputs(5, 2, 3, 2, 1, 16, 900)
    w, b = _encoder(5, query.shape[1], 16, 64)
    q_proj = cpu.linear_heads_cpu(query[:, :, None, :], w, b)[:, :, 0, :]
    kw = dict(sink=4, window=16, critical=60, scaling=0.25, return_indices=True, parallel=True)
    want = cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, **kw)
    got = cpu.dashkv_decode_cpu(query, None, keys, values, codes, query_encoder=(w, b), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_query_encoders_are_refused_by_name():
    query, q_proj, keys, values, codes, _ = make_inputs(6, 1, 3, 2, 1, 16, 300)
    w, b = _encoder(6, query.shape[1], 16, 64)
    kw = dict(sink=4, window=16, critical=20, scaling=0.25)
    with pytest.raises(ValueError, match="q_proj or a query_encoder"):
        cpu.dashkv_decode_cpu(query, None, keys, values, codes, **kw)
    with pytest.raises(ValueError, match="not both"):
        cpu.dashkv_decode_cpu(query, q_proj, keys, values, codes, query_encoder=(w, b), **kw)
    for bad in [(w[:, :, :32], b), (w, b[:, :32]), (w.astype(np.float64), b), (np.asfortranarray(w), b),
                (torch.from_numpy(w), b)]:
        with pytest.raises(ValueError, match="query_encoder must be"):
            cpu.dashkv_decode_cpu(query, None, keys, values, codes, query_encoder=bad, **kw)
