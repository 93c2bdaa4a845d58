"""HashEncoders: shapes, persistence, and clear errors for foreign, truncated or mismatched files."""

import json

import pytest
import torch

from dashkv.encoders import EncoderFileError, EncoderMismatchError, HashEncoders

SHAPE = dict(model_type="llama", num_layers=3, num_q_heads=6, num_kv_heads=2, head_dim=16)


def _learned(bits=64, depth=2):
    torch.manual_seed(0)
    enc = HashEncoders(SHAPE, bits, layers=[1, 2], hidden=32, depth=depth, meta={"model_name": "tiny-llama"})
    for p in enc.parameters():
        p.data.normal_()
    return enc


def test_shapes_of_codes_and_projections():
    enc = _learned(bits=128)
    keys = torch.randn(2, 2, 10, 16)
    codes = enc.encode_keys(1, keys)
    assert codes.shape == (2, 2, 10, 2) and codes.dtype == torch.int64
    assert enc.project_queries(1, torch.randn(2, 6, 1, 16)).shape == (2, 6, 1, 128)
    assert enc.has_layer(2) and not enc.has_layer(0)


def test_save_and_load_roundtrip(tmp_path):
    enc = _learned()
    enc.save_pretrained(tmp_path / "enc")
    back = HashEncoders.from_pretrained(tmp_path / "enc")
    assert back.layer_ids == (1, 2) and back.depth == 2 and back.meta["model_name"] == "tiny-llama"
    keys = torch.randn(1, 2, 5, 16)
    assert torch.equal(back.encode_keys(2, keys), enc.encode_keys(2, keys))
    with pytest.raises(FileExistsError, match="overwrite"):
        enc.save_pretrained(tmp_path / "enc", overwrite=False)


def test_simhash_shares_the_projection_between_queries_and_keys():
    enc = HashEncoders.simhash(SHAPE, 64, [0], seed=3)
    x = torch.randn(1, 2, 1, 16)
    k = enc.project_keys(0, x)
    q = enc.project_queries(0, x.repeat_interleave(3, dim=1))
    torch.testing.assert_close(q, k.repeat_interleave(3, dim=1))


def test_missing_truncated_and_foreign_files_are_named(tmp_path):
    with pytest.raises(EncoderFileError, match="does not exist"):
        HashEncoders.from_pretrained(tmp_path / "nope")
    enc_dir = _learned().save_pretrained(tmp_path / "enc")
    weights = enc_dir / "encoders.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EncoderFileError, match="corrupt or truncated"):
        HashEncoders.from_pretrained(enc_dir)
    # without the checksum nothing could tell flipped weight bits from weights: refused, named
    cfg = json.loads((enc_dir / "encoders.json").read_text())
    del cfg["sha256"]
    (enc_dir / "encoders.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderFileError, match="no weights checksum"):
        HashEncoders.from_pretrained(enc_dir)
    (enc_dir / "encoders.json").write_text("{not json")
    with pytest.raises(EncoderFileError, match="not valid JSON"):
        HashEncoders.from_pretrained(enc_dir)
    (enc_dir / "encoders.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EncoderFileError, match="not a dashkv encoder file"):
        HashEncoders.from_pretrained(enc_dir)


def test_mismatch_names_every_differing_field():
    enc = _learned()
    enc.check_compatible(dict(SHAPE))
    with pytest.raises(EncoderMismatchError, match=r"num_kv_heads: encoders 2 vs model 1.*head_dim"):
        enc.check_compatible(dict(SHAPE, num_kv_heads=1, head_dim=32))
    with pytest.raises(EncoderMismatchError, match="bits: encoders 64 vs config 128"):
        enc.check_compatible(dict(SHAPE), bits=128)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="multiple of 64"):
        HashEncoders(SHAPE, 48, [0])
    with pytest.raises(ValueError, match="outside"):
        HashEncoders(SHAPE, 64, [5])


# ---- model fingerprint --------------------------------------------------------------------------------
def _tiny_pair():
    from dashkv.models import model_shape, tiny_model

    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)  # same shape, other weights
    s = model_shape(model)
    enc = HashEncoders(s.to_dict(), 64, s.full_attention_layers, meta={"model_name": "tiny-a"})
    return model, other, enc


def test_fingerprint_refuses_a_same_shaped_model_with_other_weights(tmp_path):
    from dashkv import hf
    from dashkv.encoders import EncoderFingerprintError, attention_fingerprint

    model, other, enc = _tiny_pair()
    enc.meta["attention_fingerprint"] = attention_fingerprint(model, enc.layer_ids)
    enc.meta["calibrated_context"] = 512
    back = HashEncoders.from_pretrained(enc.save_pretrained(tmp_path / "enc"))
    assert back.fingerprint == enc.fingerprint and back.calibrated_length == 512
    back.check_compatible(model)
    back.check_compatible(model.to(torch.bfloat16))  # a cast of the same weights still matches
    model.float()
    with pytest.raises(EncoderFingerprintError, match=r"attention_fingerprint: encoders [0-9a-f]{16}\.\.\. vs model"):
        back.check_compatible(other)
    with pytest.raises(EncoderMismatchError, match="allow_mismatch=True"):
        hf.enable(other, back)
    assert not hf.is_enabled(other)
    hf.enable(other, back, allow_mismatch=True).disable()
    with torch.no_grad():  # a light fine-tune (1% of the weights' scale, one layer) is another model too
        w = model.model.layers[1].self_attn.q_proj.weight
        w.add_(1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(EncoderFingerprintError):
        back.check_compatible(model)


def test_old_encoders_without_fingerprint_load_with_one_warning(caplog):
    from dashkv._logging import reset_warnings

    reset_warnings()
    model, _, enc = _tiny_pair()
    with caplog.at_level("WARNING", logger="dashkv"):
        enc.check_compatible(model)
        enc.check_compatible(model)
    assert caplog.text.count("carry no attention fingerprint") == 1


def test_shipped_encoders_record_fingerprint_and_calibrated_length():
    enc = HashEncoders.for_default_model()
    assert enc.fingerprint and len(enc.fingerprint) == 64 and enc.calibrated_length == 8192


def test_decoding_past_the_calibrated_length_warns_once(caplog):
    from dashkv import hf
    from dashkv._logging import reset_warnings
    from dashkv.config import DashKVConfig
    from dashkv.encoders import attention_fingerprint

    reset_warnings()
    model, _, enc = _tiny_pair()
    enc.meta.update(attention_fingerprint=attention_fingerprint(model, enc.layer_ids), calibrated_context=100)
    ids = torch.randint(3, 500, (1, 90))
    with caplog.at_level("WARNING", logger="dashkv"), hf.enable(model, enc, DashKVConfig(min_context=0, budget=1.0, dense_layers=())):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert "calibrated" not in caplog.text
        ids = torch.randint(3, 500, (1, 150))
        for _ in range(2):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    assert caplog.text.count("past the 100-token context the encoders were calibrated on") == 1


def test_calibration_records_the_fingerprint():
    from dashkv.calibrate import calibrate
    from dashkv.encoders import attention_fingerprint
    from dashkv.models import tiny_model

    model = tiny_model("llama", num_layers=2)
    ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    enc = calibrate(model, None, ids, seq_len=64, num_sequences=2, steps=2, queries_per_seq=8, dense_layers=())
    assert enc.fingerprint == attention_fingerprint(model, enc.layer_ids)
    assert enc.calibrated_length == 64
    enc.check_compatible(model)
