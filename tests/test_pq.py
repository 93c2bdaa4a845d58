"""PQ key codes (`HashEncoders(kind="pq")`, `dashkv.pq`): calibration, the codes and tables against
brute-force references, the fused CPU kernel against the torch reference path, persistence, refusals.

The kernel builds each query head's tables in float64 in a fixed order and the reference with einsum:
both round to float32 once and then to the same integer levels, so the logits agree bit for bit except
at a rounding boundary (never seen on random inputs); the selections and outputs are compared exactly
(sets) and to float32 rounding (outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dashkv import hf
from dashkv.attention import QuantizedRows
from dashkv.calibrate import CalibrationError, calibrate
from dashkv.config import DashKVConfig
from dashkv.decode import decode_step
from dashkv.encoders import EncoderFileError, HashEncoders
from dashkv.kernels import cpu
from dashkv.models import tiny_model
from dashkv.pq import CENTROIDS, encode_keys, fit_layer, pq_probability_logits, query_tables, table_scores
from dashkv.selection import DashKVPolicy, LayerState

SEQ = 192


def _ids(seed, rows, length=SEQ):
    return torch.randint(3, 512, (rows, length), generator=torch.Generator().manual_seed(seed))


def _random_pq(hq=6, hkv=2, d=16, bits=64, seed=0, iters=6):
    """PQ encoders for layer 1 of a made-up shape, fitted on anisotropic random keys and queries."""
    g = torch.Generator().manual_seed(seed)
    shape = dict(model_type="llama", num_layers=2, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    enc = HashEncoders(shape, bits, [1], kind="pq")
    scale = torch.linspace(0.3, 2.0, d)
    keys = torch.randn(2, hkv, 700, d, generator=g) * scale
    queries = torch.randn(2, hq, 40, d, generator=g) * scale.flip(0)
    fit_layer(enc.layers["1"], keys, queries, d ** -0.5, bits, iters=iters, seed=seed)
    return enc, scale


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", num_layers=4, num_q_heads=6, num_kv_heads=2, head_dim=16)


def test_codes_are_each_sub_space_nearest_centroid_and_tables_score_the_reconstruction():
    enc, scale = _random_pq()
    layer = enc.layers["1"]
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, 50, 16, generator=g) * scale
    codes = encode_keys(layer, keys)
    assert codes.shape == (2, 2, 50, 1) and codes.dtype == torch.int64
    assert torch.equal(encode_keys(layer, keys, chunk=7), codes)  # blocks that straddle the batch rows
    bytes_ = ((codes[..., None] >> torch.arange(0, 64, 8)) & 255)[..., 0, :]  # (B, Hkv, N, 8)
    books = layer.books.detach()  # (Hkv, 8, 256, 2)
    recon = torch.empty_like(keys)
    for h in range(2):
        mapped = keys[:, h] @ layer.key_map[h].T
        for p in range(8):
            sub = mapped[..., 2 * p:2 * p + 2]
            dist = ((sub[..., None, :] - books[h, p]) ** 2).sum(-1)  # brute force over the 256 centroids
            chosen = dist.gather(-1, bytes_[:, h, :, p:p + 1])[..., 0]
            assert torch.all(chosen <= dist.min(-1).values + 1e-5)
            recon[:, h, :, 2 * p:2 * p + 2] = books[h, p][bytes_[:, h, :, p]]
    q = torch.randn(2, 6, 16, generator=g)
    tabs = query_tables(layer, q, 2)
    assert tabs.shape == (2, 6, 8 * CENTROIDS)
    mapped_q = torch.stack([q.reshape(2, 2, 3, 16)[:, h] @ layer.query_map[h].T for h in range(2)], 1)
    expect = torch.einsum("bhgd,bhnd->bhgn", mapped_q, recon).reshape(2, 6, 50)
    torch.testing.assert_close(table_scores(tabs, codes).float(), expect, atol=1e-4, rtol=1e-4)
    # the maps preserve inner products: (T^-T q) . (T k) = q . k
    for h in range(2):
        torch.testing.assert_close(layer.query_map[h].T @ layer.key_map[h], torch.eye(16), atol=1e-4, rtol=1e-4)


def test_logits_are_the_tables_rounded_like_a_projection():
    enc, _ = _random_pq()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 16, generator=g)
    codes = encode_keys(enc.layers["1"], torch.randn(1, 2, 30, 16, generator=g))
    temps = torch.full((6,), 0.25)
    logits = pq_probability_logits(query_tables(enc.layers["1"], q, 2), temps, codes)
    exact = table_scores(query_tables(enc.layers["1"], q, 2), codes) * 0.25
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), exact, atol=1e-3 * exact.abs().max().item(), rtol=0)


def _set_of(indices, counts=None):
    return [sorted(x for x in row.tolist() if x >= 0) for row in indices.reshape(-1, indices.shape[-1])]


@pytest.mark.parametrize("batch,starts,dtype,split", [(1, False, torch.float32, False), (3, True, torch.float32, False),
                                                     (2, True, torch.bfloat16, False), (1, False, torch.float32, True),
                                                     (3, True, torch.float16, True)])
def test_fused_kernel_selects_and_attends_as_the_reference(batch, starts, dtype, split, monkeypatch):
    enc, scale = _random_pq(hkv=2)
    if split:  # row threads: batch rows (or a single row's KV heads) in parts
        monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_ROWS", 0)
        monkeypatch.setattr(cpu, "_SPLIT_MIN_CODES_HEADS", 0)
        cpu.set_row_threads(2)
    try:
        g = torch.Generator().manual_seed(batch)
        n = 1500
        keys = (torch.randn(batch, 2, n, 16, generator=g) * scale).to(dtype)
        values = torch.randn(batch, 2, n, 16, generator=g).to(dtype)
        q = torch.randn(batch, 6, 1, 16, generator=g) * 2
        start = torch.tensor([0, 200, 37][:batch]) if starts else None
        cfg = DashKVConfig(bits=64, budget=1 / 16, min_context=0)
        pol = DashKVPolicy(cfg, enc)
        state = LayerState(1, codes=enc.encode_keys(1, keys.float()))
        ref = decode_step(pol, state, q, keys, values, 0.25, start=start, fast=False)
        fast = decode_step(pol, state, q, keys, values, 0.25, start=start, fast=True)
        torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                                   rtol=1e-2 if dtype != torch.float32 else 1e-5)
        if not split:
            plan = cfg.plan(n)
            sel = pol.select(state, q[:, :, 0], keys, plan, 0.25, start)
            out = cpu.dashkv_decode_cpu(q[:, :, 0], None, keys, values, state.codes, sink=plan.sink, window=plan.window,
                                        critical=plan.critical, scaling=0.25, start=start, return_indices=True,
                                        prob_temps=pol.probability_temperatures(1), pq=enc.pq_arrays(1))
            ref_sets = [sorted(set(sel.indices[b, h][sel.exact[b, h]].tolist())) for b in range(batch) for h in range(2)]
            assert _set_of(out[1]) == ref_sets
    finally:
        cpu._ROW_THREADS[0] = None


@pytest.mark.parametrize("option", ["pooled", "rerank", "rerank4", "lowprec"])
def test_fused_kernel_options_match_the_reference(option):
    enc, scale = _random_pq(hkv=2)
    g = torch.Generator().manual_seed(5)
    n = 1200
    keys = torch.randn(2, 2, n, 16, generator=g) * scale
    values = torch.randn(2, 2, n, 16, generator=g)
    q = torch.randn(2, 6, 1, 16, generator=g) * 2
    kw = {"pooled": dict(head_budget="pooled"), "rerank": dict(rerank=3), "rerank4": dict(rerank=3, rerank_bits=4),
          "lowprec": dict(lowprec_fraction=0.5)}[option]
    cfg = DashKVConfig(bits=64, budget=1 / 16, min_context=0, **kw)
    pol = DashKVPolicy(cfg, enc)
    state = LayerState(1, codes=enc.encode_keys(1, keys))
    low = None
    if option.startswith("rerank"):
        state.keys8 = QuantizedRows.quantize(keys, cfg.rerank_bits)
    if option == "lowprec":
        low = (QuantizedRows.quantize(keys), QuantizedRows.quantize(values))
    ref = decode_step(pol, state, q, keys, values, 0.25, lowprec=low, fast=False)
    fast = decode_step(pol, state, q, keys, values, 0.25, lowprec=low, fast=True)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_full_budget_is_dense_and_generate_paths_agree(tiny):
    enc = calibrate(tiny, None, _ids(1, 4), seq_len=SEQ, num_sequences=4, codes="pq", pq_iters=4, progress=False)
    ids = _ids(7, 1, 150)
    base = tiny.generate(ids, max_new_tokens=8, do_sample=False)
    h = hf.enable(tiny, enc, DashKVConfig(bits=64, budget=1.0, min_context=0))
    try:
        assert torch.equal(tiny.generate(ids, max_new_tokens=8, do_sample=False), base)
    finally:
        hf.disable(tiny)
    outs = []
    for fast in (True, False):
        h = hf.enable(tiny, enc, DashKVConfig(bits=64, budget=24, sink=2, window=4, min_context=0))
        h.fast = fast
        try:
            outs.append(tiny.generate(ids, max_new_tokens=8, do_sample=False))
        finally:
            hf.disable(tiny)
    assert torch.equal(outs[0], outs[1])


def test_calibration_is_deterministic_round_trips_and_records_what_it_did(tiny, tmp_path):
    kw = dict(seq_len=SEQ, num_sequences=4, codes="pq", pq_iters=4, progress=False)
    a, b = calibrate(tiny, None, _ids(1, 4), **kw), calibrate(tiny, None, _ids(1, 4), **kw)
    assert a.kind == "pq" and a.layer_ids == (2, 3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    c = calibrate(tiny, None, _ids(1, 4), seed=1, **kw)
    assert not torch.equal(a.layers["2"].books, c.layers["2"].books)
    assert a.meta["codes"] == "pq" and a.meta["pq_iters"] == 4 and set(a.meta["layer_qk_error"]) == {"2", "3"}
    a.save_pretrained(tmp_path / "enc")
    back = HashEncoders.from_pretrained(tmp_path / "enc")
    assert back.kind == "pq"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), back.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    back.check_compatible(tiny)
    a.save_pretrained(tmp_path / "enc16", dtype=torch.float16)
    assert HashEncoders.from_pretrained(tmp_path / "enc16").kind == "pq"


@pytest.mark.parametrize("kw,match", [(dict(codes="lsh"), "codes must be one of"),
                                      (dict(codes="pq", depth=2, hidden=8), "no MLP encoders"),
                                      (dict(codes="pq", pq_iters=0), "pq_iters"),
                                      (dict(codes="pq", bits=192), "sub-spaces")])
def test_bad_calibration_options_are_refused_by_name(tiny, kw, match):
    with pytest.raises(CalibrationError, match=match):
        calibrate(tiny, None, _ids(1, 4), seq_len=SEQ, num_sequences=4, progress=False, **kw)


def test_sign_code_only_options_and_projections_are_refused_by_name():
    enc, _ = _random_pq()
    for kw in (dict(scorer="hamming"), dict(query_bits=8)):
        with pytest.raises(ValueError, match="PQ key codes"):
            DashKVPolicy(DashKVConfig(bits=64, **kw), enc)
    with pytest.raises(ValueError, match="no real-valued projection"):
        enc.project_queries(1, torch.zeros(1, 6, 1, 16))
    with pytest.raises(ValueError, match="pq must be"):
        cpu.dashkv_decode_cpu(torch.zeros(1, 6, 16), None, torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16),
                              torch.zeros(1, 2, 40, 1, dtype=torch.int64), sink=1, window=1, critical=4, scaling=0.25,
                              prob_temps=np.ones(6, np.float32), pq=(np.zeros((2, 16, 16), np.float32),
                                                                     np.zeros((2, 8, 2, 255), np.float32)))
    with pytest.raises(ValueError, match="need prob_temps"):
        cpu.dashkv_decode_cpu(torch.zeros(1, 6, 16), None, torch.zeros(1, 2, 40, 16), torch.zeros(1, 2, 40, 16),
                              torch.zeros(1, 2, 40, 1, dtype=torch.int64), sink=1, window=1, critical=4, scaling=0.25,
                              pq=enc.pq_arrays(1))


def test_a_pq_file_with_a_wrong_tensor_shape_is_refused(tmp_path):
    enc, _ = _random_pq()
    enc.save_pretrained(tmp_path / "enc")
    from safetensors.torch import load_file, save_file
    import json

    from dashkv.encoders import _sha256

    path = tmp_path / "enc" / "encoders.safetensors"
    cfg = json.loads((tmp_path / "enc" / "encoders.json").read_text())
    tensors = load_file(str(path))
    tensors["layers.1.books"] = tensors["layers.1.books"][:, :, :128].contiguous()
    meta = {k: v for k, v in cfg.items() if k != "sha256"}
    save_file(tensors, str(path), metadata={"dashkv": json.dumps(meta)})
    cfg["sha256"] = _sha256(path)
    (tmp_path / "enc" / "encoders.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderFileError, match="books"):
        HashEncoders.from_pretrained(tmp_path / "enc")


def test_the_compiled_decode_step_encoder_picks_the_nearest_centroids():
    enc, scale = _random_pq()
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        keys = (torch.randn(2, 2, 5, 16, generator=g) * scale).to(dtype)
        kmap, books, norms = enc.pq_key_arrays(1)
        fast = cpu.encode_pq_cpu(keys, kmap, books, norms)
        ref = encode_keys(enc.layers["1"], keys.float())
        assert fast.shape == ref.shape
        byte = lambda c: ((c[..., None] >> torch.arange(0, 64, 8)) & 255)[..., 0, :]  # noqa: E731
        bf, br = byte(fast), byte(ref)
        mapped = torch.einsum("bhnd,hed->bhne", keys.double(), enc.layers["1"].key_map.double()).reshape(2, 2, 5, 8, 2)
        dist = ((mapped[..., None, :] - enc.layers["1"].books.double()[None, :, None]) ** 2).sum(-1)  # (B,H,N,P,256)
        best = dist.min(-1).values
        assert torch.all(dist.gather(-1, bf[..., None])[..., 0] <= best + 1e-4)
        assert (bf == br).float().mean() > 0.99  # the torch encoder of prefill agrees but for float near-ties
