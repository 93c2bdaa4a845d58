"""Device-correctness by construction, checked without a GPU: the DASH-KV path on PyTorch's "meta"
device (no data; any CPU tensor mixed in raises), and one host sync per decode step, not per layer."""

from __future__ import annotations

import pytest
import torch

from dashkv import cache as cache_mod
from dashkv import hf
from dashkv.cache import DashKVLayer, DecodeContext
from dashkv.config import DashKVConfig
from dashkv.decode import decode_step
from dashkv.encoders import HashEncoders
from dashkv.models import tiny_model
from dashkv.selection import make_policy

SHAPE = dict(model_type="llama", num_layers=1, num_q_heads=6, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("method,scorer,grouping", [("dashkv", "asymmetric", "kv_head"),
                                                    ("dashkv", "hamming", "query_head"),
                                                    ("simhash", "hamming", "kv_head"),
                                                    ("simhash_asym", "asymmetric", "kv_head")])
def test_the_reference_decode_path_creates_no_tensor_off_the_keys_device(method, scorer, grouping):
    enc = HashEncoders(SHAPE, 64, [0]) if method == "dashkv" else HashEncoders.simhash(SHAPE, 64, [0])
    enc.to("meta")
    policy = make_policy(method, DashKVConfig(min_context=0, budget=40, sink=4, window=8, scorer=scorer, grouping=grouping), enc)
    layer = DashKVLayer(0, DecodeContext(policy, fast=False))
    k = torch.empty(2, 2, 700, 16, device="meta")
    layer.update(k, torch.empty_like(k))
    q = torch.empty(2, 6, 1, 16, device="meta")
    start = torch.zeros(2, dtype=torch.long, device="meta")
    out = decode_step(policy, layer.state, q, layer.keys, layer.values, 0.25, start=start, fast=False)
    assert out.device.type == "meta" and out.shape == (2, 6, 1, 16)
    layer.reorder_cache(torch.zeros(2, dtype=torch.long, device="meta"))
    layer.batch_repeat_interleave(2)
    layer.crop(-3)
    assert layer.state.codes.device.type == "meta" and layer.keys.shape == (4, 2, 697, 16)


def test_enable_moves_the_encoders_to_the_models_device():
    model = tiny_model("llama").to("meta")
    enc = HashEncoders.simhash(SHAPE | dict(num_layers=4, num_q_heads=6), 64, [0, 1, 2, 3])
    with hf.enable(model, enc, method="simhash") as handle:
        assert all(p.device.type == "meta" for p in handle.policy.encoders.parameters())


def test_left_padding_is_read_once_per_decode_step_not_per_layer(monkeypatch):
    calls = []
    real = cache_mod.start_from_mask
    monkeypatch.setattr(cache_mod, "start_from_mask", lambda m, n: calls.append(n) or real(m, n))
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    with hf.enable(model, HashEncoders.simhash(SHAPE | dict(num_layers=4), 64, [0, 1, 2, 3]),
                   DashKVConfig(min_context=0, budget=40, dense_layers=()), method="simhash", track=True) as h:
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        steps = len(h.stats.per_step) // len(h.managed_layers)
    assert steps == 4 and len(calls) == steps  # 4 layers share each step's mask
