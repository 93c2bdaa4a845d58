"""Code length defaults: `dashkv calibrate` picks one 64-bit word per 64 dimensions of the head
(`default_bits`), and every decoding command without --bits takes the code length of its --encoders."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from dashkv.calibrate import CalibrationError, calibrate, default_bits
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import model_shape, tiny_model


def test_default_bits_follow_the_head_dimension():
    assert [default_bits(d) for d in (16, 64, 80, 128, 256)] == [64, 64, 128, 128, 256]


def test_calibrate_without_bits_uses_the_head_dimension():
    model = tiny_model("llama", num_layers=4, num_q_heads=4, num_kv_heads=2, head_dim=128)
    ids = torch.randint(3, 500, (2, 96), generator=torch.Generator().manual_seed(0))
    enc = calibrate(model, None, ids, seq_len=96, num_sequences=2, steps=2, progress=False, layers=[2])
    assert enc.bits == 128
    with pytest.raises(CalibrationError, match="bits"):
        calibrate(model, None, ids, bits=96, seq_len=96, num_sequences=2, steps=2, progress=False)


def test_decoding_commands_take_the_encoders_code_length(tmp_path):
    from dashkv.eval.runner import validate_plan

    model = tiny_model("llama")
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 128, s.full_attention_layers, seed=0)
    enc.save_pretrained(tmp_path / "enc")
    args = Namespace(encoders=str(tmp_path / "enc"), bits=None, budget="1/16")
    assert DashKVConfig.from_args(args).bits == 128
    assert DashKVConfig.from_args(Namespace(encoders=None, bits=None)).bits == 64
    assert DashKVConfig.from_args(Namespace(encoders=str(tmp_path / "enc"), bits=192)).bits == 192  # explicit wins
    assert HashEncoders.stored_bits(tmp_path / "nowhere") is None
    d = tmp_path / "lm"
    model.save_pretrained(d)
    plan = validate_plan(Namespace(model=str(d), encoders=str(tmp_path / "enc"), methods="dense,dashkv",
                                   budgets="1/16", tasks="niah_single_1", lengths="512", samples=1,
                                   haystack="default", out=str(tmp_path / "out"), seed=0, bits=None))
    assert plan.bits == 128
