"""Multi-bit key levels (`key_levels`): an L-bit level code is a sign code with weighted bits, so the
scans, kernels and cache are unchanged; what changes is the key encoder's non-linearity and the query
side's expansion. Reference vs compiled encoders, the identity the design rests on, calibration
(deterministic, round trip), the decode path end to end, and clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dashkv.calibrate import CalibrationError, calibrate, _expand_levels, inference_scores
from dashkv.codes import asymmetric_scores, key_code_bits, level_values, level_weights, pack_bits, to_signs
from dashkv.encoders import EncoderFileError, HashEncoders, LayerEncoders

SEQ = 192


def _ids(seed, rows, length=SEQ):
    return torch.randint(3, 512, (rows, length), generator=torch.Generator().manual_seed(seed))


def _cal(model, **kw):
    args = dict(seq_len=SEQ, num_sequences=4, steps=15, progress=False, init="svd", key_levels=2, codes="sign")
    args.update(kw)
    return calibrate(model, None, _ids(1, 4), **args)


@settings(max_examples=40, deadline=None)
@given(levels=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 10_000))
def test_level_code_is_a_weighted_sign_code(levels, seed):
    """<g, level(z)> == <g expanded by 2^(t-1), signs of the code>, for random z (also out of range)."""
    g = torch.Generator().manual_seed(seed)
    m = 64 // levels
    z = torch.randn(3, m, generator=g) * 2 ** levels
    q = torch.randn(m, generator=g, dtype=torch.float64)
    bits = key_code_bits(z, levels)
    assert bits.shape == (3, m * levels)
    signs = bits.double() * 2 - 1
    expanded = (q[:, None] * level_weights(levels, torch.float64)).flatten()
    torch.testing.assert_close(signs @ expanded, level_values(z, levels).double() @ q)
    vals = level_values(z, levels)
    top = (2 ** levels - 1) / 2
    assert float(vals.abs().max()) <= top and torch.equal(vals + top, (vals + top).round())


def test_sign_code_levels_one_is_the_sign_rule():
    z = torch.tensor([[-1.0, 0.0, 2.0, 1e-9] * 16])
    assert torch.equal(key_code_bits(z, 1), z > 0)


@pytest.mark.parametrize("levels", [2, 4])
def test_compiled_key_encoding_matches_reference(levels):
    pytest.importorskip("numba")
    from dashkv.kernels.cpu import encode_linear_cpu

    g = torch.Generator().manual_seed(levels)
    x = torch.randn(2, 3, 5, 16, generator=g)
    m = 64 // levels * 2  # 128-bit codes
    w = (torch.randn(3, 16, m, generator=g) * 3).numpy()
    b = torch.randn(3, m, generator=g).numpy()
    proj = torch.einsum("bhtd,hdm->bhtm", x, torch.from_numpy(w)) + torch.from_numpy(b)[None, :, None]
    ref = pack_bits(key_code_bits(proj, levels))
    got = encode_linear_cpu(x, w, b, levels=levels)
    # float sums of the compiled loop may round a value sitting on a level boundary the other way
    differ = (to_signs(ref) != to_signs(got)).float().mean()
    assert float(differ) < 2e-3


def test_expanded_query_side_scores_as_trained():
    torch.manual_seed(0)
    enc = LayerEncoders(6, 2, 16, 16, 0, 1)  # training layout: m = 16 outputs, L = 4 -> b = 64
    for p in enc.parameters():
        p.data.normal_()
    q, k = torch.randn(1, 6, 3, 16), torch.randn(1, 2, 9, 16)
    trained = inference_scores(enc, q, k, key_levels=4)  # (1, Hq, P, N)
    out = _expand_levels(enc, 4)
    assert out.query.d_out == 64 and out.key.d_out == 16
    codes = pack_bits(key_code_bits(out.key(k), 4))  # (1, Hkv, N, 1)
    qp = out.query(q).reshape(1, 2, 3, 3, 64)
    got = asymmetric_scores(qp, codes[:, :, None, None]).reshape(1, 6, 3, 9) / 64
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)


def test_calibrate_levels_deterministic_round_trip_and_decode(tiny, tmp_path):
    a, b = _cal(tiny), _cal(tiny)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.key_levels == 2 and a.meta["key_levels"] == 2 and a.meta["init"] == "svd"
    lay = a.layers["2"]
    assert lay.key.d_out == 32 and lay.query.d_out == 64
    a.save_pretrained(tmp_path / "enc")
    back = HashEncoders.from_pretrained(tmp_path / "enc")
    assert back.key_levels == 2
    k = torch.randn(1, 2, 7, 16)
    assert torch.equal(back.encode_keys(2, k), a.encode_keys(2, k))
    assert torch.equal(a.encode_keys(2, k), pack_bits(key_code_bits(a.project_keys(2, k), 2)))
    # the decode path end to end: generate with the level-code encoders, fused and reference scans agree
    from dashkv import hf
    from dashkv.config import DashKVConfig

    ids = _ids(7, 1, 400)
    cfg = DashKVConfig(budget=1 / 8, sink=4, window=8, k_min=4, min_context=0, dense_layers=(0, 1))
    outs = []
    for fused in (True, False):
        with hf.enable(tiny, back, cfg, track=True) as handle:
            handle.fast = fused
            outs.append(tiny.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
            assert handle.stats.fraction < 0.5  # it really selected
    assert torch.equal(outs[0], outs[1])


def test_levels_need_the_asymmetric_scorer_and_bad_options_fail_clearly(tiny, tmp_path):
    enc = _cal(tiny, steps=2)
    from dashkv.config import DashKVConfig
    from dashkv.selection import make_policy

    with pytest.raises(ValueError, match="asymmetric"):
        make_policy("dashkv", DashKVConfig(scorer="hamming"), enc)
    for kw, match in ((dict(key_levels=3), "key_levels"), (dict(key_levels=0), "key_levels"),
                      (dict(key_levels=2, depth=2, hidden=8), "key_levels"), (dict(init="nope"), "init")):
        with pytest.raises(CalibrationError, match=match):
            _cal(tiny, **kw)
    shape = {"model_type": "llama", "num_layers": 4, "num_q_heads": 6, "num_kv_heads": 2, "head_dim": 16}
    with pytest.raises(ValueError, match="key_levels"):
        HashEncoders(shape, 64, [2], kind="simhash", key_levels=2)
    with pytest.raises(ValueError, match="key_levels"):
        HashEncoders(shape, 64, [2], key_levels=3)
    # a file's key_levels that does not divide the bits, or levels on SimHash, is named (the field check
    # itself: an edited encoders.json is caught earlier, by the embedded copy of the configuration)
    import json
    from pathlib import Path

    from dashkv.encoders import _checked_fields

    enc.save_pretrained(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "encoders.json").read_text())
    assert _checked_fields(cfg, Path("f"))["key_levels"] == 2
    for bad in ({"key_levels": 3}, {"key_levels": 2, "kind": "simhash"}, {"key_levels": 9}):
        with pytest.raises(EncoderFileError, match="key_levels"):
            _checked_fields({**cfg, **bad}, Path("f"))
    cfg["key_levels"] = 3
    (tmp_path / "e" / "encoders.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderFileError):
        HashEncoders.from_pretrained(tmp_path / "e")
    # train_layer on its own refuses what calibrate refuses
    from dashkv.calibrate import train_layer
    from dashkv.capture import capture_qkv

    cap = capture_qkv(tiny, _ids(3, 1), [2], queries_per_seq=4, progress=False)[2]
    with pytest.raises(CalibrationError, match="key_levels"):
        train_layer(cap, 64, key_levels=3, steps=1)
    with pytest.raises(CalibrationError, match="key_levels"):
        train_layer(cap, 64, key_levels=2, objective="bce", steps=1)
    layer, _ = train_layer(cap, 64, objective="bce", steps=1)  # the default for bce: sign codes
    assert layer.key.d_out == 64
