"""Concurrent generate calls on one enabled model: the same tokens as sequential runs, never an abort.

The concurrent part runs in a subprocess: if the CPU kernels' threading layer aborts the process
(numba's workqueue layer does on concurrent launches), pytest survives to report it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


SCRIPT = textwrap.dedent("""
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from dashkv import hf
    from dashkv.config import DashKVConfig
    from dashkv.encoders import HashEncoders
    from dashkv.models import model_shape, tiny_model

    model = tiny_model("qwen2")
    s = model_shape(model)
    enc = HashEncoders(s.to_dict(), 64, s.full_attention_layers)
    g = torch.Generator().manual_seed(0)
    for p in enc.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    handle = hf.enable(model, enc, DashKVConfig(min_context=0, budget=1 / 16, sink=4, window=8, dense_layers=()), track=True)
    handle.fast = sys.argv[1] == "fused"
    prompts = [torch.randint(3, 500, (1 + i % 2, 600 + 40 * i), generator=torch.Generator().manual_seed(i))
               for i in range(4)]

    def run(i):
        ids = prompts[i]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
        return out.sequences, out.cache.stats.steps

    sequential = [run(i) for i in range(4)]
    steps_per_round = sum(st for _, st in sequential)
    for round_ in range(3):
        handle.reset_stats()
        barrier = threading.Barrier(4)

        def job(i):
            barrier.wait()
            return run(i)

        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(job, range(4)))
        for i, ((a, sa), (b, sb)) in enumerate(zip(sequential, concurrent)):
            assert torch.equal(a, b), f"round {round_}: thread {i} generated other tokens"
            assert sa == sb, f"round {round_}: thread {i} recorded {sb} steps, sequential {sa}"
        assert handle.stats.steps == steps_per_round, (handle.stats.steps, steps_per_round)
    print("THREADS-OK")
""")

ABORT = "Concurrent access has been detected"


def _run(path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", SCRIPT, path], capture_output=True, text=True, timeout=600, env=env)


def test_four_threads_on_the_reference_path_share_no_per_call_state():
    """The integration's own state (caches, statistics, mask memo, policy) under concurrency, without the
    fused kernels: must pass whatever the kernels' threading layer does."""
    proc = _run("reference")
    assert proc.returncode == 0 and "THREADS-OK" in proc.stdout, proc.stderr[-3000:]


def test_four_threads_generate_the_same_tokens_as_sequential_runs():
    proc = _run("fused")  # the fused kernels run on the calling thread: no thread pool, no abort
    assert ABORT not in proc.stderr + proc.stdout
    assert proc.returncode == 0 and "THREADS-OK" in proc.stdout, proc.stderr[-3000:]
