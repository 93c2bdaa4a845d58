"""Fuzzing HashEncoders.from_pretrained: truncated, bit-flipped and foreign safetensors files and metadata
always give an EncoderFileError (never another exception, a crash, or a silently different load)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dashkv.encoders import CONFIG_NAME, WEIGHTS_NAME, EncoderFileError, HashEncoders

SHAPE = dict(model_type="llama", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    enc = HashEncoders(SHAPE, 64, [1, 2], hidden=8, depth=2, meta={"model_name": "fuzz", "calibrated_context": 64})
    for p in enc.parameters():
        p.data.normal_()
    return enc.save_pretrained(tmp_path_factory.mktemp("enc") / "enc", dtype=torch.float16)


def _copy(original: Path, tmp: Path, name: str) -> Path:
    d = tmp / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(original, d)
    return d


def _state(enc: HashEncoders) -> dict:
    return {k: v.clone() for k, v in enc.state_dict().items()}


def _rechecksum(d: Path) -> None:
    """Write the weights' real sha256 into encoders.json: a consistently corrupted (or foreign) file."""
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["sha256"] = hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest()
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _load_or_named_error(d: Path, want: dict | None) -> None:
    """The one allowed outcome besides EncoderFileError: exactly the original encoders."""
    try:
        enc = HashEncoders.from_pretrained(d)
    except EncoderFileError:
        return
    assert want is not None, "a mutated file loaded"
    got = _state(enc)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got), "a different load"


@SETTINGS
@given(frac=st.floats(0.0, 0.9999), rechecksum=st.booleans())
def test_truncated_weights(original, tmp_path, frac, rechecksum):
    d = _copy(original, tmp_path, "trunc")
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: int(len(data) * frac)])
    if rechecksum:
        _rechecksum(d)
    with pytest.raises(EncoderFileError):
        HashEncoders.from_pretrained(d)


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.9999), st.integers(0, 7)), min_size=1, max_size=4),
       header_only=st.booleans(), rechecksum=st.booleans())
def test_bit_flipped_weights(original, tmp_path, flips, header_only, rechecksum):
    d = _copy(original, tmp_path, "flip")
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    span = 8 + int.from_bytes(data[:8], "little") if header_only else len(data)
    before = bytes(data)
    for where, bit in flips:
        data[int(where * span)] ^= 1 << bit
    assume(bytes(data) != before)  # two flips of one bit cancel
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    if not rechecksum:  # the recorded checksum catches any flip
        with pytest.raises(EncoderFileError, match="checksum"):
            HashEncoders.from_pretrained(d)
    elif header_only:  # a consistent checksum: the header (names, shapes, offsets, embedded config) is checked
        _load_or_named_error(d, None)
    # flips in tensor data under a recomputed checksum are, by construction, a different valid file


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.9999), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flipped_config(original, tmp_path, flips):
    d = _copy(original, tmp_path, "cfgflip")
    data = bytearray((d / CONFIG_NAME).read_bytes())
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    (d / CONFIG_NAME).write_bytes(bytes(data))
    _load_or_named_error(d, _state(HashEncoders.from_pretrained(original)))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
FIELDS = ["model", "bits", "layers", "hidden", "depth", "kind", "bias", "meta", "format_version"]


@SETTINGS
@given(field=st.sampled_from(FIELDS + [f"model.{f}" for f in SHAPE]), value=JSON)
def test_foreign_metadata_consistently_embedded(original, tmp_path, field, value):
    """Garbage in one field, written both into encoders.json and the weights' embedded metadata with a
    valid checksum (what a buggy writer could produce): refused by name, or the original if it is a no-op."""
    from safetensors.torch import load_file, save_file

    d = _copy(original, tmp_path, "meta")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.pop("sha256")
    if field.startswith("model."):
        cfg["model"][field.split(".", 1)[1]] = value
    else:
        cfg[field] = value
    try:
        embedded = json.dumps(cfg)
    except ValueError:  # NaN etc. are fine for json.dumps; only circular structures fail
        return
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata={"dashkv": embedded})
    (d / CONFIG_NAME).write_text(embedded)
    _rechecksum(d)
    _load_or_named_error(d, _state(HashEncoders.from_pretrained(original)))


@SETTINGS
@given(names=st.lists(st.text("abcdefghijklmnopqrstuvwxyz.0123456789", min_size=1, max_size=24), min_size=0,
                      max_size=4, unique=True),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.int64, torch.bool]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=3), with_config=st.booleans())
def test_foreign_safetensors(original, tmp_path, names, dtype, shape, with_config):
    """Another program's safetensors file under our name (with a valid checksum)."""
    from safetensors.torch import save_file

    d = _copy(original, tmp_path, "foreign")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    tensors = {n: torch.zeros(shape, dtype=dtype) for n in names}
    meta = {"dashkv": json.dumps({k: v for k, v in cfg.items() if k != "sha256"})} if with_config else None
    save_file(tensors, str(d / WEIGHTS_NAME), metadata=meta)
    _rechecksum(d)
    with pytest.raises(EncoderFileError):
        HashEncoders.from_pretrained(d)


def test_right_names_and_shapes_but_wrong_dtype_or_values_are_refused(original, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = json.loads((original / CONFIG_NAME).read_text())
    meta = {"dashkv": json.dumps({k: v for k, v in cfg.items() if k != "sha256"})}
    for bad in ("int", "nan"):
        d = _copy(original, tmp_path, bad)
        t = load_file(str(d / WEIGHTS_NAME))
        k = sorted(t)[0]
        t[k] = t[k].to(torch.int16) if bad == "int" else t[k].fill_(float("nan"))
        save_file(t, str(d / WEIGHTS_NAME), metadata=meta)
        _rechecksum(d)
        with pytest.raises(EncoderFileError, match="not finite floating point"):
            HashEncoders.from_pretrained(d)
