"""Variants of DASH-KV's selection in `dashkv eval` (issue 10): the method `dashkv_rerank` is run with the
configuration fields given here (e.g. rerank=8,head_budget=pooled or temporal=0.1; rerank=0 is plain
DASH-KV).

    python experiments/rerank/sweep.py FIELD=VALUE[,FIELD=VALUE] OUT_DIR [dashkv eval args]

Rows: experiments/results/rerank-8k/<variant>/ (teacher-forced fidelity at 8K).
"""
import sys

from dashkv import selection
from dashkv.config import DashKVConfig
from dashkv.cli import main

fields = dict(kv.split("=") for kv in sys.argv[1].split(","))
def _value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


fields = {k: _value(v) for k, v in fields.items()}


class Variant(selection.DashKVPolicy):
    name = "dashkv_rerank"

    def __init__(self, config, encoders):
        super().__init__(DashKVConfig(**{**config.to_dict(), **fields}), encoders)


selection.POLICIES["dashkv_rerank"] = Variant
sys.exit(main(["eval", "--out", sys.argv[2], *sys.argv[3:]]))
