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
    # without the checksum, safetensors itself must reject the truncated file with our message
    cfg = json.loads((enc_dir / "encoders.json").read_text())
    del cfg["sha256"]
    (enc_dir / "encoders.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderFileError, match="corrupt or truncated"):
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
