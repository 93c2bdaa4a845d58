"""`dashkv serve` on a tiny random model over loopback, driven by the real `openai` client (and httpx).

One uvicorn server runs in a thread for the whole module. The tokenizer is a word-level one built in
memory ("w0".."w504" + specials, with a small chat template), so nothing is downloaded and every token
decodes to a whole word: streamed text can be compared with non-streamed text exactly.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from dashkv.config import DashKVConfig  # noqa: E402
from dashkv.encoders import HashEncoders  # noqa: E402
from dashkv.models import model_shape, tiny_model  # noqa: E402
from dashkv.serve.app import create_app  # noqa: E402
from dashkv.serve.engine import Engine  # noqa: E402

MODEL = "tiny-llama"
MAX_CONTEXT = 4096
KV_BOUND = 4 << 20  # 4 MiB: ~3900 tokens of this tiny model's K/V + codes (1056 bytes a token)


def chat_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return tok


def words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 500, (n,), generator=g).tolist())


class Server:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module", params=["continuous", "admission"])
def served(request):
    """The server under each scheduler: every HTTP test runs against both."""
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=MAX_CONTEXT)
    shape = model_shape(model)
    enc = HashEncoders.simhash(shape.to_dict(), 64, shape.full_attention_layers, seed=0)
    engine = Engine(model, chat_tokenizer(), encoders=enc, config=DashKVConfig(min_context=0, budget="1/16"), max_batch=16,
                    max_kv_memory=KV_BOUND, scheduler=request.param)
    with Server(create_app(engine, MODEL)) as server:
        server.engine = engine
        yield server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def _stream_text(stream) -> tuple[str, str | None, object]:
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


# ---- the API surface --------------------------------------------------------------------------------
def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    text = httpx.get(served.url + "/metrics").text
    for name in ("dashkv_requests_total", "dashkv_generated_tokens_total", "dashkv_queue_depth",
                 "dashkv_batch_size", "dashkv_prefill_seconds", "dashkv_decode_seconds"):
        assert f"# TYPE {name} " in text


def test_chat_streamed_equals_non_streamed_at_temperature_0(client, served):
    prompt = words(200, seed=1)
    full = _chat(client, prompt, max_tokens=24, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("length", "stop")
    text = full.choices[0].message.content
    assert text and all(w.startswith("w") or w.startswith("<|") for w in text.split())
    u = full.usage
    assert u.prompt_tokens == 200 + 2 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    ext = u.model_extra["dashkv"]
    assert ext["mode"] == "dashkv" and ext["budget"] == "1/16"
    assert ext["decode_tokens_per_s"] > 0 and ext["prefill_tokens_per_s"] > 0

    stream = _chat(client, prompt, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
    s_text, s_finish, s_usage = _stream_text(stream)
    assert s_text == text
    assert s_finish == full.choices[0].finish_reason
    assert s_usage.completion_tokens == u.completion_tokens and s_usage.prompt_tokens == u.prompt_tokens


def test_completions_sse_format_and_non_streamed(client, served):
    prompt = words(150, seed=2)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens >= 1
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason


def test_stop_string_ends_the_text_before_it(client):
    prompt = words(120, seed=3)
    ref = _chat(client, prompt, max_tokens=20, temperature=0).choices[0].message.content.split()
    assert len(ref) >= 6
    stop = ref[4]
    expect = " ".join(ref[: ref.index(stop)])
    got = _chat(client, prompt, max_tokens=20, temperature=0, stop=[stop, "never-seen"])
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].message.content.rstrip() == expect
    s_text, s_finish, _ = _stream_text(_chat(client, prompt, max_tokens=20, temperature=0, stop=stop, stream=True))
    assert s_text == got.choices[0].message.content and s_finish == "stop"


def test_budget_field_changes_the_share_of_context_read(client):
    prompt = words(600, seed=4)
    share = {}
    for budget in ("dense", "1/2", "1/16", {"budget": 128}):
        r = _chat(client, prompt, max_tokens=8, temperature=0, extra_body={"dashkv": budget})
        ext = r.usage.model_extra["dashkv"]
        share[str(budget)] = ext["context_read_share"]
        assert ext["mode"] == ("dense" if budget == "dense" else "dashkv")
    assert share["dense"] == 1.0
    assert 0.45 < share["1/2"] < 0.55
    assert share["1/16"] < 0.2  # 1/16 of ~600, floored at sink + window + k_min = 84 tokens
    assert abs(share["{'budget': 128}"] - 128 / 610) < 0.02


# ---- refusals -----------------------------------------------------------------------------------------
def _error(served, path: str, body, status: int) -> dict:
    r = httpx.post(served.url + path, content=body if isinstance(body, bytes) else json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_malformed_bodies_get_400_in_openai_shape(served):
    assert "body" in _error(served, "/v1/chat/completions", b"{not json", 400)["message"]
    err = _error(served, "/v1/chat/completions", {"model": MODEL}, 400)
    assert err["param"] == "messages" and "messages" in err["message"]
    err = _error(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}],
                                                  "temperature": 3}, 400)
    assert err["param"] == "temperature"
    err = _error(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}],
                                                  "max_tokens": 0}, 400)
    assert err["param"] == "max_tokens"
    err = _error(served, "/v1/completions", {"model": MODEL, "prompt": "w1", "n": 2}, 400)
    assert err["param"] == "n"
    assert _error(served, "/v1/nothing-here", {}, 404)["code"] == "not_found"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "w1"}])
    assert e.value.body["code"] == "model_not_found" and "gpt-5" in e.value.body["message"]


def test_prompt_past_the_context_limit_is_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=words(MAX_CONTEXT + 10, seed=5), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and str(MAX_CONTEXT) in e.value.body["message"]
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:  # prompt fits, prompt + completion does not
        client.completions.create(model=MODEL, prompt=words(100, seed=5), max_tokens=MAX_CONTEXT)
    assert e.value.body["param"] == "max_tokens" and str(MAX_CONTEXT) in e.value.body["message"]


def test_request_over_the_memory_bound_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:  # 100 + 3990 tokens x 1056 bytes > 4 MiB
        client.completions.create(model=MODEL, prompt=words(100, seed=6), max_tokens=3990)
    assert e.value.status_code == 413 and e.value.body["code"] == "kv_memory_exceeded"
    assert "--max-kv-memory" in e.value.body["message"]


@pytest.mark.parametrize("field,fragment", [("abc", "bad dashkv budget"), ("1.5", "bad dashkv budget"),
                                            ({"budget": "1/16", "x": 1}, "dashkv field"), (0, "bad dashkv budget")])
def test_bad_dashkv_field_is_400(client, field, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "w1 w2", max_tokens=2, extra_body={"dashkv": field})
    assert e.value.body["param"] == "dashkv" and fragment in e.value.body["message"]


# ---- faults ----------------------------------------------------------------------------------------------
def test_a_failing_generate_is_a_500_and_the_server_keeps_serving(client, served):
    model = served.engine.model

    def broken(*a, **k):  # fails once, in whichever path the scheduler uses (generate or forward)
        del model.generate, model.forward
        raise RuntimeError("injected fault")

    model.generate = model.forward = broken
    with pytest.raises(openai.InternalServerError) as e:
        _chat(client, "w1 w2 w3", max_tokens=4, temperature=0)
    assert "injected fault" in e.value.body["message"]
    assert _chat(client, "w1 w2 w3", max_tokens=4, temperature=0).usage.completion_tokens >= 1
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def _wait_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while engine.running_rows or engine.queue_depth():
        assert time.time() < deadline, "engine did not go idle"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_row(client, served):
    engine, metrics = served.engine, served.engine.metrics
    _wait_idle(engine)
    before = metrics.counter("dashkv_generated_tokens_total")
    gone_before = metrics.counter("dashkv_requests_total", endpoint="/v1/chat/completions", status="499")
    other: dict = {}

    def steady():
        other["result"] = _stream_text(_chat(client, words(100, seed=8), max_tokens=30, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))

    t = threading.Thread(target=steady)
    body = {"model": MODEL, "messages": [{"role": "user", "content": words(100, seed=7)}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        t.start()
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break  # leaving the block closes the connection mid-stream
    t.join(60)
    _wait_idle(engine)
    generated = metrics.counter("dashkv_generated_tokens_total") - before
    assert generated < 3000 / 2, "the disconnected row kept decoding"
    text, finish, usage = other["result"]
    assert finish == "length" and usage.completion_tokens == 30 and text
    deadline = time.time() + 10
    while metrics.counter("dashkv_requests_total", endpoint="/v1/chat/completions", status="499") == gone_before:
        assert time.time() < deadline
        time.sleep(0.02)
    assert _chat(client, "w1 w2", max_tokens=3, temperature=0).usage.completion_tokens >= 1


# ---- load ---------------------------------------------------------------------------------------------------
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_concurrent_streaming_clients_match_sequential_runs_without_growth(served):
    """16 concurrent streaming clients x 3 rounds: all complete, text equals one-at-a-time runs at
    temperature 0 (so batching does not change greedy tokens here), no errors, no growth across rounds."""
    n_clients, new = 16, 12
    prompts = [words(90 + 7 * i, seed=100 + i) for i in range(n_clients)]
    sync = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reference = [_chat(sync, p, max_tokens=new, temperature=0).choices[0].message.content for p in prompts]
    engine = served.engine
    engine.largest_batch = 0

    async def one(aclient, p):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=new, temperature=0, stream=True)
        parts = []
        async for chunk in stream:
            for c in chunk.choices:
                parts.append(c.delta.content or "")
        return "".join(parts)

    async def round_():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    live = []
    for _ in range(3):
        got = asyncio.run(round_())
        assert got == reference
        _wait_idle(engine)
        live.append(_live_tensors())
    assert live[2] <= live[0] + 8, f"live tensors grew across rounds: {live}"
    assert engine.queue_depth() == 0 and engine.running_rows == 0
    from dashkv.cache import DashKVCache

    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is DashKVCache], "a finished batch's cache is still alive"
    assert engine.largest_batch > 1, "concurrent requests were never batched"
    print(f"live tensors per round {live}, largest batch {engine.largest_batch}")


# ---- the command ----------------------------------------------------------------------------------------------
def test_dashkv_serve_command_serves_a_saved_model(tmp_path):
    """`dashkv serve` end to end in a subprocess: a saved tiny model + encoders, one chat request, SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    model = tiny_model("llama", max_position_embeddings=1024)
    model.save_pretrained(tmp_path / "m")
    chat_tokenizer().save_pretrained(tmp_path / "m")
    shape = model_shape(model)
    HashEncoders.simhash(shape.to_dict(), 64, shape.full_attention_layers, seed=0).save_pretrained(tmp_path / "enc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dashkv.cli", "serve", "--model", str(tmp_path / "m"), "--encoders",
           str(tmp_path / "enc"), "--port", str(port), "--served-model-name", "tiny", "--max-batch", "4",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "dashkv serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words(150, 9)}],
                                           max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.usage.model_extra["dashkv"]["budget"] == "1/16"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out


def test_serve_refuses_bad_arguments_before_loading_a_model(capsys):
    from dashkv.cli import main

    assert main(["serve", "--budget", "2.5"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["serve", "--max-kv-memory", "lots"]) == 2
    assert "memory size" in capsys.readouterr().err


def test_missing_serve_extra_names_the_install_command(monkeypatch):
    import sys

    from dashkv.errors import DashKVError
    from dashkv.serve import require_serve_deps

    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` raise ImportError
    with pytest.raises(DashKVError, match=r"pip install 'dashkv\[serve\]'"):
        require_serve_deps()


def test_import_dashkv_does_not_import_the_web_stack():
    import subprocess
    import sys

    code = "import sys, dashkv, dashkv.cli, dashkv.serve; print(any(m in sys.modules for m in ('fastapi', 'uvicorn')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_seeded_sampling_is_reproducible_and_mixed_modes_run_in_separate_batches(client, served):
    prompt = words(150, seed=10)
    a = _chat(client, prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=7).choices[0].message.content
    b = _chat(client, prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=7).choices[0].message.content
    assert a == b

    async def both():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as ac:
            reqs = [ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=6, temperature=0, extra_body={"dashkv": d})
                    for d in ("dense", "1/16", "dense", "1/16")]
            return await asyncio.gather(*reqs)

    rs = asyncio.run(both())
    shares = [r.usage.model_extra["dashkv"]["context_read_share"] for r in rs]
    assert shares[0] == shares[2] == 1.0 and shares[1] == shares[3] < 1.0
    assert all(r.usage.model_extra["dashkv"]["batch_size"] <= 2 for r in rs)  # modes never share a batch


def test_batches_respect_max_batch_and_the_memory_bound():
    from dashkv.serve.engine import GenRequest, Mode

    model = tiny_model("llama")
    engine = Engine(model, chat_tokenizer(), default_mode=Mode(None), max_batch=3,
                    max_kv_memory=1024 * 1000)  # dense: 1024 bytes a token -> 1000 tokens a batch
    mk = lambda n, new: GenRequest(list(range(7, 7 + n)), new, lambda ev: None)  # noqa: E731
    engine._pending.extend([mk(100, 50), mk(100, 50), mk(100, 50), mk(100, 50)])
    assert len(engine._form_batch()) == 3  # max_batch
    engine._pending.clear()
    engine._pending.extend([mk(300, 100), mk(300, 100), mk(300, 100)])
    assert len(engine._form_batch()) == 2  # 3 x 400 tokens > 1000
    with pytest.raises(Exception) as e:
        engine.check(900, 200, Mode(None))
    assert e.value.status == 413
    assert engine.check(500, None, Mode(None)) == 500  # unspecified max_tokens: what the bound leaves


# ---- continuous batching, on the engine directly ------------------------------------------------------------
def _collect(engine, prompt_ids, max_tokens, mode, started=None):
    from dashkv.serve.engine import Delta, GenRequest, Sampling

    done, out = threading.Event(), {"deltas": 0}

    def on(ev):
        if isinstance(ev, Delta):
            out["deltas"] += 1
            if started is not None and out["deltas"] >= 5:
                started.set()
        else:
            out["final"] = ev
            done.set()

    engine.submit(GenRequest(prompt_ids, max_tokens, on, sampling=Sampling(0.0), mode=mode))
    return done, out


@pytest.mark.parametrize("family,budget", [("llama", "1/16"), ("llama", None), ("qwen3", "1/16")])
def test_rows_join_and_leave_a_running_batch_with_solo_tokens(family, budget):
    """A request decoding; two arrive mid-decode and join it (one with a longer prompt, so the running rows'
    cache is left-padded), one leaves early. Every row's tokens equal its run alone."""
    from dashkv.config import parse_budget
    from dashkv.serve.engine import Finished, Mode

    model = tiny_model(family)
    shape = model_shape(model)
    enc = HashEncoders.simhash(shape.to_dict(), 64, shape.full_attention_layers, seed=0)
    mode = Mode(None if budget is None else parse_budget(budget))
    engine = Engine(model, chat_tokenizer(), encoders=enc, default_mode=mode, batch_wait_s=0).start()
    assert engine.scheduler == "continuous"
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(7, 500, (n,), generator=g).tolist() for n in (150, 260, 90))
    try:
        solo = {}
        for name, p, n in (("a", a, 80), ("b", b, 12), ("c", c, 20)):
            ev, out = _collect(engine, p, n, mode)
            assert ev.wait(60)
            solo[name] = out["final"].token_ids
        started = threading.Event()
        ev_a, out_a = _collect(engine, a, 80, mode, started)
        assert started.wait(60)  # a is decoding
        ev_b, out_b = _collect(engine, b, 12, mode)
        ev_c, out_c = _collect(engine, c, 20, mode)
        assert ev_a.wait(60) and ev_b.wait(60) and ev_c.wait(60)
        for name, out in (("a", out_a), ("b", out_b), ("c", out_c)):
            assert isinstance(out["final"], Finished), out["final"]
            assert out["final"].token_ids == solo[name], name
        assert max(out["final"].usage["dashkv"]["batch_size"] for out in (out_a, out_b, out_c)) >= 2
    finally:
        engine.stop()


def test_models_with_sliding_window_layers_fall_back_to_batching_at_admission():
    from dashkv.serve.engine import Mode

    model = tiny_model("gemma3_text")
    shape = model_shape(model)
    enc = HashEncoders.simhash(shape.to_dict(), 64, shape.full_attention_layers, seed=0)
    engine = Engine(model, chat_tokenizer(), encoders=enc, default_mode=Mode(1 / 16)).start()
    try:
        assert engine.scheduler == "admission"
        ev, out = _collect(engine, list(range(7, 200)), 6, Mode(1 / 16))
        assert ev.wait(60) and out["final"].usage["completion_tokens"] >= 1
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="sliding"):
        Engine(model, chat_tokenizer(), encoders=enc, scheduler="continuous")
