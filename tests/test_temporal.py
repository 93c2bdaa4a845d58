"""Distance calibration's cross-layer momentum (DashKVConfig.temporal): what one layer leaves for the next,
how it enters the ranking, and that generate runs it on the reference path (warned once)."""

import logging

import torch

from dashkv import _logging, hf
from dashkv.config import DashKVConfig
from dashkv.encoders import HashEncoders
from dashkv.models import model_shape, tiny_model
from dashkv.selection import Selection, TemporalCarry, temporal_momentum


def test_carry_keeps_log_mean_attention_on_read_tokens_and_the_floor_elsewhere():
    carry = TemporalCarry()
    n = 10
    # head 1's unused last slot points at token 5, which head 0 read: it must neither count nor un-mark it
    sel = Selection(indices=torch.tensor([[[0, 3, 5], [3, 7, 5]]]), exact=torch.tensor([[[True, True, True],
                                                                                        [True, True, False]]]))
    probs = torch.tensor([[[0.2, 0.6, 0.2], [0.5, 0.5, 0.9]]])  # the unused slot's 0.9 must not count
    carry.put(3, n, sel, probs, num_q_heads=4)
    got = carry.get(4, n, 1)
    mass = torch.zeros(n)
    mass[0], mass[3], mass[5], mass[7] = 0.2 / 4, 1.1 / 4, 0.2 / 4, 0.5 / 4
    seen = mass > 0
    expect = torch.log(mass + 1e-9)
    expect[~seen] = expect[seen].min()
    torch.testing.assert_close(got[0], expect)
    assert carry.get(4, n + 1, 1) is None and carry.get(4, n, 2) is None  # another step, another batch
    assert carry.get(3, n, 1) is None and carry.get(2, n, 1) is None  # only a higher layer of the step reads it


def test_momentum_ranks_by_standardised_sum_and_zero_mu_changes_no_ranking():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 50, generator=g) * 7 + 3
    carried = torch.randn(2, 50, generator=g)
    same = temporal_momentum(scores, carried, 0.0)
    assert torch.equal(same.argsort(-1), scores.argsort(-1))
    boosted = temporal_momentum(scores, carried, 1e4)  # the carried attention dominates the ranking
    assert torch.equal(boosted.argmax(-1), carried.argmax(-1)[:, None].expand(-1, 3))
    mid = temporal_momentum(scores, carried, 1.0)
    z = lambda x: (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    assert torch.equal(mid.argsort(-1), (z(scores) + z(carried)[:, None]).argsort(-1))  # ranks as the z-sum
    torch.testing.assert_close(mid.std(-1) / scores.std(-1), torch.full((2, 3), 2 ** 0.5), rtol=0.2, atol=0)


def test_generate_with_momentum_runs_reference_path_carries_between_layers_and_warns(caplog):
    _logging.reset_warnings()
    model = tiny_model("llama", num_layers=4)
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=0)
    ids = torch.randint(3, 500, (1, 400), generator=torch.Generator().manual_seed(5))
    base = DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, k_min=4, dense_layers=(0,))
    outs = {}
    with caplog.at_level(logging.WARNING, logger="dashkv"):
        for mu in (0.0, 50.0):
            cfg = DashKVConfig(**{**base.to_dict(), "dense_layers": (0,), "temporal": mu})
            with hf.enable(model, enc, cfg) as handle, torch.no_grad():
                out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True)
                outs[mu] = out.sequences
                layer = next(l for l in out.past_key_values.layers if getattr(l, "managed", False))
                entry = layer.ctx.carry.entry
                if mu:
                    assert entry is not None and entry[1] == out.sequences.shape[1] - 1  # the last step's
                else:
                    assert entry is None  # off: nothing carried
    hits = [r for r in caplog.records if "reference path" in r.getMessage() and "temporal=50.0" in r.getMessage()]
    assert len(hits) == 1


def test_carried_attention_moves_the_tokens_the_layer_below_attended_into_the_selection():
    from dashkv.selection import DashKVPolicy, LayerState

    model = tiny_model("llama", num_layers=4)
    s = model_shape(model)
    enc = HashEncoders.simhash(s.to_dict(), 64, s.full_attention_layers, seed=0)
    g = torch.Generator().manual_seed(6)
    n, d = 512, s.head_dim
    keys = torch.randn(1, s.num_kv_heads, n, d, generator=g)
    q = torch.randn(1, s.num_q_heads, d, generator=g)
    cfg = DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, k_min=4, temporal=1e3)
    pol = DashKVPolicy(cfg, enc)
    layer = s.full_attention_layers[1]
    carry = TemporalCarry()
    state = LayerState(layer, codes=enc.encode_keys(layer, keys), carry=carry)
    plan = cfg.plan(n)
    hot = torch.arange(100, 100 + plan.critical)
    logp = torch.full((1, n), -20.0)
    logp[0, hot] = -1.0
    carry.entry = (layer - 1, n, logp)
    chosen = pol.select(state, q, keys, plan, d ** -0.5, None)
    picked = set(chosen.indices[0, 0][chosen.exact[0, 0]].tolist())
    assert set(hot.tolist()) <= picked
    for stale in ((layer - 1, n + 1, logp), (layer, n, logp)):  # another step's; this layer's own: ignored
        carry.entry = stale
        plain = pol.select(state, q, keys, plan, d ** -0.5, None)
        assert not set(hot.tolist()) <= set(plain.indices[0, 0][plain.exact[0, 0]].tolist())
