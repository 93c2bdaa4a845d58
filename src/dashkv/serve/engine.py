"""The batching engine: ONE worker thread owns the model and runs every forward pass.

Why one thread: generation calls on one model are not safe to run concurrently (the DASH-KV handle, the
attention implementation and the cache hook are per model), and on a CPU a second concurrent call would
only split the same cores. Requests are queued; the worker takes the oldest waiting request and every
other waiting request that can share its batch (same sampling parameters, same DASH-KV mode), up to
`max_batch` rows and `max_kv_memory` bytes of K/V + codes, and decodes them together, left-padded.

Two schedulers:
- continuous (default where supported): the worker runs its own decode loop (`batch.RunningBatch`); at
  every step boundary, waiting requests with the same key join (prefilled, then merged into the batch's
  cache) and finished rows leave. Sampling uses a generator per row, so a seeded request samples the same
  tokens whoever shares its batch.
- admission (models with sliding-window layers): the batch is formed when it starts and decoded by one
  `model.generate` call; per-row stops are decided in a `StoppingCriteria`.

Either way a row that stops (stop string, EOS, max_tokens, a client that went away) gets its final event
at once and streams nothing more. The worker catches every exception of a batch, fails that batch's
unfinished requests with a 500 error and keeps serving.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable

import torch

from ..config import DashKVConfig
from ..decode import StepStats
from .errors import APIError
from .memory import KVFootprint
from .metrics import Metrics

log = logging.getLogger("dashkv.serve")


# ---- what a request asks for ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; requests batch together only when these are equal (one generate call)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key(self) -> tuple:
        return ("greedy",) if self.greedy else ("sample", self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Mode:
    """How decode steps read the cache: dense (budget None) or DASH-KV at `budget`."""

    budget: float | int | None

    @property
    def dense(self) -> bool:
        return self.budget is None

    def label(self) -> str:
        if self.budget is None:
            return "dense"
        if isinstance(self.budget, int):
            return str(self.budget)
        frac = Fraction(self.budget).limit_denominator(1 << 16)
        return f"{frac.numerator}/{frac.denominator}" if frac.numerator == 1 else f"{self.budget:g}"


@dataclass
class Delta:
    """New completion text of one request."""

    text: str


@dataclass
class Finished:
    """The request is done; `usage` holds the counts and the `dashkv` extension."""

    finish_reason: str
    text: str
    token_ids: list[int]
    usage: dict[str, Any]


@dataclass
class Failed:
    error: APIError


Event = Delta | Finished | Failed


@dataclass
class GenRequest:
    """One completion request as the engine sees it: token ids in, events out (from the worker thread)."""

    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    mode: Mode = field(default_factory=lambda: Mode(None))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def batch_key(self) -> tuple:
        return (self.sampling.key(), self.mode)

    def cancel(self) -> None:
        """Called from any thread (the client went away): the worker stops this row at the next step."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a closed event loop must never take the worker down
            log.debug("dropping an event of request %s", self.id, exc_info=True)


# ---- per-row bookkeeping inside one generate call ---------------------------------------------------
def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters must wait: an incomplete UTF-8 sequence (decoded as U+FFFD) may still
    complete, and a suffix that begins a stop string may still become it."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return len(text) - end + hold


class RowStats(StepStats):
    """StepStats that also credits each batch row with the tokens it read and its context length (left
    padding excluded), so each request can report its own share of the context read. `rows` and `pads`
    follow the batch (the engine updates them when rows join or leave)."""

    def __init__(self, rows: list["_Row"], pads: list[int]):
        super().__init__()
        self.rows, self.pads = rows, pads

    def record(self, layer_idx: int, n: int, attended: torch.Tensor | int, keep: bool, rows: int = 1,
               extra: float = 0.0) -> None:
        super().record(layer_idx, n, attended, keep=False, rows=rows, extra=extra)  # totals only
        if isinstance(attended, int):  # a dense step: every row read all n tokens
            attended = torch.full((rows, 1), attended)
        a = attended.reshape(attended.shape[0], -1)
        heads = a.shape[1]
        for row, pad, r in zip(self.rows, self.pads, a.sum(-1).tolist()):
            row.read += r + extra * heads  # the re-rank stage's int8 keys, in full rows
            row.ctx += (n - pad) * heads


class _Row:
    def __init__(self, req: GenRequest, engine: "Engine"):
        self.req, self.engine = req, engine
        self.ids: list[int] = []
        self.tokens = 0  # completion tokens, EOS included
        self.text = ""  # everything emitted so far
        self.done = False
        self.prefill_at = self.first_at = self.finished_at = 0.0
        self.read = self.ctx = 0  # tokens read / context, summed over decode steps and managed layers' heads
        self.batch_size = 0  # most rows it shared a step with
        self.gen: torch.Generator | None = None
        if not req.sampling.greedy:  # per-row generator: seeded sampling does not depend on the batch
            self.gen = torch.Generator()
            if req.sampling.seed is not None:
                self.gen.manual_seed(req.sampling.seed)
            else:
                self.gen.seed()

    def push(self, token: int, now: float) -> None:
        """Take this row's new token: emit the text that is now safe and decide whether the row stops."""
        eng = self.engine
        self.tokens += 1
        if token in eng.eos_ids:
            self.finish("stop", now, eng.decode(self.ids))
            return
        self.ids.append(token)
        full = eng.decode(self.ids)
        stops = self.req.stop
        if stops:
            longest = max(len(s) for s in stops)
            hits = [i for i in (full.find(s, max(0, len(self.text) - longest)) for s in stops) if i >= 0]
            if hits:
                self.finish("stop", now, full[:max(min(hits), len(self.text))])
                return
        if self.tokens >= self.req.max_tokens:
            self.finish("length", now, full)
            return
        safe = len(full) - _held_back(full, stops)
        if safe > len(self.text) and full.startswith(self.text):
            self._emit(full[len(self.text):safe])

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self.req.emit(Delta(piece))

    def finish(self, reason: str, now: float, final: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.finished_at = now
        if final is not None and reason != "cancelled" and final.startswith(self.text):
            self._emit(final[len(self.text):])
        self.engine._row_finished(self, reason)


class _RowCriteria:
    """A transformers StoppingCriteria over all rows of a batch: called after every step with the new
    tokens appended; returns which rows are done (generate stops when all are)."""

    def __init__(self, rows: list[_Row], engine: "Engine"):
        self.rows, self.engine = rows, engine
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            for row in self.rows:
                row.first_at = now
            self.engine._prefilled(self.rows, now)
        new = input_ids[:, -1].tolist()
        for row, tok in zip(self.rows, new):
            if row.done:
                continue
            if row.req.cancelled:
                row.finish("cancelled", now)
            else:
                row.push(int(tok), now)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


def set_threads(n: int) -> None:
    """Threads of torch (process-wide) and of the fused numba kernels (per calling thread; numba otherwise
    uses every core)."""
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(n)
    except (ImportError, ValueError):  # no numba, or more threads than numba started with
        pass


# ---- the engine -------------------------------------------------------------------------------------------
class Engine:
    """Owns a model and its tokenizer; `submit` requests from any thread, events come back per request."""

    def __init__(self, model: Any, tokenizer: Any, *, encoders: Any = None, config: DashKVConfig | None = None,
                 default_mode: Mode | None = None, max_batch: int = 8, max_kv_memory: int = 4 << 30,
                 max_context: int | None = None, batch_wait_s: float = 0.005, metrics: Metrics | None = None,
                 threads: int | None = None, scheduler: str = "auto"):
        from ..models import model_shape

        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model, self.tokenizer, self.encoders = model, tokenizer, encoders
        self.config = config or DashKVConfig()
        self.default_mode = default_mode or Mode(self.config.budget)
        self.max_batch, self.max_kv_memory, self.batch_wait_s = max_batch, int(max_kv_memory), batch_wait_s
        self.threads = threads
        from .batch import supports_continuous

        if scheduler not in ("auto", "continuous", "admission"):
            raise ValueError(f"scheduler must be auto, continuous or admission, got {scheduler!r}")
        if scheduler == "continuous" and not supports_continuous(model):
            raise ValueError("continuous batching does not support sliding-window layers; use --scheduler admission")
        self.scheduler = ("continuous" if supports_continuous(model) else "admission") if scheduler == "auto" \
            else scheduler
        self.metrics = metrics or Metrics()
        self.shape = model_shape(model)
        limit = self.shape.max_position_embeddings or None
        self.max_context = min(x for x in (limit, max_context) if x) if (limit or max_context) else 1 << 30
        self.limit_source = ("--max-context" if max_context and (not limit or max_context < limit)
                             else "max_position_embeddings")
        managed = [i for i in self.shape.full_attention_layers if i not in self.config.dense_layers]
        dtype_bytes = next(model.parameters()).element_size()
        self.footprint = KVFootprint.of(self.shape, dtype_bytes, len(managed), self.config.bits)

        gen = getattr(model, "generation_config", None)
        eos: set[int] = set()
        for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if src is not None:
                eos.update([src] if isinstance(src, int) else src)
        self.eos_ids = frozenset(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)

        self.handle: Any = None
        self._mode: Mode | None = None
        # Encoders that do not fit the model fail here, at startup. A server whose default is dense may
        # run without usable encoders; then requests that ask for a budget are refused with the reason.
        self.dashkv_unavailable: str | None = None
        try:
            self._apply_mode(Mode(self.config.budget))
        except Exception as exc:
            if not self.default_mode.dense:
                raise
            self.dashkv_unavailable = str(exc)
        self._apply_mode(self.default_mode)
        self._inbox: queue.Queue[GenRequest | None] = queue.Queue()
        self._pending: deque[GenRequest] = deque()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        # HF fast tokenizers are not safe to call from several threads at once ("Already borrowed"):
        # the routes encode and the worker decodes under this lock.
        self.tok_lock = threading.Lock()
        self.batches_run = 0
        self.largest_batch = 0
        self.running_rows = 0

    # ---- public -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._running.set()
            self._thread = threading.Thread(target=self._loop, name="dashkv-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._running.clear()
        self._inbox.put(None)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, req: GenRequest) -> None:
        self._inbox.put(req)
        self._update_queue_gauge()

    def decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self, prompt_tokens: int, max_tokens: int | None, mode: Mode, param: str = "max_tokens",
              prompt_param: str = "messages") -> int:
        """Refuse what cannot run (context limit, memory bound); returns max_tokens (filled in if None)."""
        if not mode.dense and self.dashkv_unavailable:
            raise APIError(400, f"this server decodes dense only: {self.dashkv_unavailable}", param="dashkv",
                           code="invalid_dashkv")
        limit = self.max_context
        if prompt_tokens >= limit:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this server's context limit is {limit} "
                                f"tokens ({self.limit_source}), prompt and completion together",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:  # as much as the context limit and the memory bound leave
            fits = self.max_kv_memory // max(1, self.footprint.per_token(not mode.dense)) - prompt_tokens
            max_tokens = max(1, min(limit - prompt_tokens, fits))
        elif prompt_tokens + max_tokens > limit:
            raise APIError(400, f"this server's context limit is {limit} tokens ({self.limit_source}); you asked "
                                f"for {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} "
                                "to generate)", param=param, code="context_length_exceeded")
        need = self.footprint.batch_bytes([(prompt_tokens, max_tokens)], not mode.dense)
        if need > self.max_kv_memory:
            raise APIError(413, f"this request needs about {need / 2**20:.1f} MiB of KV cache ({prompt_tokens} + "
                                f"{max_tokens} tokens), more than the server's bound of "
                                f"{self.max_kv_memory / 2**20:.1f} MiB (--max-kv-memory)",
                           param=param, code="kv_memory_exceeded")
        return max_tokens

    def queue_depth(self) -> int:
        return len(self._pending) + self._inbox.qsize()

    # ---- worker ------------------------------------------------------------------------------------
    def _update_queue_gauge(self) -> None:
        self.metrics.set("dashkv_queue_depth", self.queue_depth())

    def _drain(self, block: bool) -> bool:
        """Move arrived requests to the pending queue; False once stop() was called."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is None:
                    return False
                self._pending.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return self._running.is_set()

    def _loop(self) -> None:
        if self.threads:
            set_threads(self.threads)  # here: numba's thread count is per calling thread
        log.info("dashkv engine: serving (max batch %d, KV bound %.0f MiB)", self.max_batch,
                 self.max_kv_memory / 2**20)
        while True:
            if not self._drain(block=not self._pending):
                break
            if self._pending and self.batch_wait_s > 0 and len(self._pending) < self.max_batch:
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
                if not self._drain(block=False):
                    break
            try:
                batch = self._form_batch()
                self._update_queue_gauge()
                if batch and self.scheduler == "continuous":
                    self._run_continuous(batch)  # catches the batch's own failures
                elif batch:
                    self._run_batch(batch)
            except Exception:  # a bug in the scheduler itself: log it, keep the worker alive
                log.exception("dashkv engine: scheduling failed")
        for req in list(self._pending):
            req.emit(Failed(APIError(503, "the server is shutting down", code="shutting_down")))
        self._pending.clear()

    def _form_batch(self) -> list[GenRequest]:
        """The oldest live request plus the waiting requests that can share its generate call."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        key = self._pending[0].batch_key()
        dashkv = not self._pending[0].mode.dense
        batch: list[GenRequest] = []
        rest: deque[GenRequest] = deque()
        for req in self._pending:
            if req.cancelled:
                continue
            fits = (len(batch) < self.max_batch and req.batch_key() == key and (not batch or (
                self.footprint.batch_bytes([(len(r.prompt_ids), r.max_tokens) for r in (*batch, req)], dashkv)
                <= self.max_kv_memory)))
            (batch if fits else rest).append(req)
        self._pending = rest
        return batch

    def _new_cache(self, stats: StepStats | None) -> Any:
        """A DASH-KV cache of the current handle whose per-call statistics are `stats` (None: untracked)."""
        cache = self.handle.new_cache()
        cache.dashkv.stats = stats
        return cache

    def _apply_mode(self, mode: Mode) -> None:
        from ..hf import disable, enable

        if mode == self._mode:
            return
        if mode.dense:
            disable(self.model)
            self.handle = None
        else:
            self.handle = enable(self.model, self.encoders, replace(self.config, budget=mode.budget), track=True)
        self._mode = mode

    def _run_batch(self, batch: list[GenRequest]) -> None:
        from transformers import GenerationConfig, StoppingCriteriaList

        t0 = time.perf_counter()
        rows = [_Row(req, self) for req in batch]
        for row in rows:
            row.prefill_at, row.batch_size = t0, len(rows)
        longest = max(len(r.prompt_ids) for r in batch)
        pads = [longest - len(r.prompt_ids) for r in batch]
        self.running_rows = len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        self.metrics.set("dashkv_running_requests", len(batch))
        self.metrics.observe("dashkv_batch_size", len(batch))
        try:
            self._apply_mode(batch[0].mode)
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for i, req in enumerate(batch):
                ids[i, pads[i]:] = torch.tensor(req.prompt_ids, dtype=torch.long)
                mask[i, pads[i]:] = 1
            extra: dict[str, Any] = {}
            if self.handle is not None:  # our own cache, so that its statistics are per row
                extra["cache"] = self._new_cache(RowStats(rows, pads))
            s = batch[0].sampling
            cfg: dict[str, Any] = dict(max_new_tokens=max(r.max_tokens for r in batch), do_sample=not s.greedy,
                                       pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None)
            if not s.greedy:
                cfg.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
                if s.seed is not None:  # generate samples from the global RNG: reproducible per batch
                    torch.manual_seed(s.seed)
            criteria = _RowCriteria(rows, self)
            self.model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**cfg),
                                stopping_criteria=StoppingCriteriaList([criteria]), **extra)
            now = time.perf_counter()
            for row in rows:  # generate ran to max_new_tokens: rows not stopped yet ran out of length
                row.finish("length", now, self.decode(row.ids))
        except Exception as exc:  # never let one batch take the server down
            log.exception("dashkv engine: a batch of %d failed", len(batch))
            err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed")
            for row in rows:
                if not row.done:
                    row.done = True
                    row.req.emit(Failed(err))
        finally:
            self.running_rows = 0
            self.metrics.set("dashkv_running_requests", 0)
            self.batches_run += 1

    # ---- continuous batching: rows join and leave at step boundaries ----------------------------------------
    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token of each row: argmax, or temperature + top-p sampling with the row's own generator."""
        s = rows[0].req.sampling
        if s.greedy:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            p, idx = probs.sort(-1, descending=True)
            p = p.masked_fill(p.cumsum(-1) - p > s.top_p, 0.0)  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(-1, idx, p)
        return [int(torch.multinomial(probs[i], 1, generator=row.gen)) for i, row in enumerate(rows)]

    def _joiners(self, rb: Any, key: tuple) -> list[GenRequest]:
        """Waiting requests that may join the running batch now: same key, FIFO (a different request at the
        head of the queue stops admission, so the batch drains and it gets its turn), within the bounds."""
        self._drain(block=False)
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        room = self.max_batch - len(rb.rows)
        if room <= 0 or not self._pending or self._pending[0].batch_key() != key:
            return []
        remaining = [r.req.max_tokens - r.tokens for r in rb.rows]
        per_token = self.footprint.per_token(rb.dashkv)
        taken: list[GenRequest] = []
        while self._pending and len(taken) < room and self._pending[0].batch_key() == key:
            req = self._pending[0]
            group = [*taken, req]
            length = max(rb.length, max(len(r.prompt_ids) for r in group)) + max(
                [*remaining, *(r.max_tokens for r in group)])
            if taken and (len(rb.rows) + len(group)) * length * per_token > self.max_kv_memory:
                break
            if not taken and rb.rows and (len(rb.rows) + 1) * length * per_token > self.max_kv_memory:
                break
            taken.append(self._pending.popleft())
        return taken

    def _join(self, rb: Any, reqs: list[GenRequest]) -> None:
        rows = [_Row(req, self) for req in reqs]
        t0 = time.perf_counter()
        for row in rows:
            row.prefill_at = t0
        logits = rb.join([r.prompt_ids for r in reqs], rows)
        now = time.perf_counter()
        for row in rows:
            row.first_at = now
        self._prefilled(rows, now)
        tokens = self._choose(logits, rows)
        rb.last[-len(rows):] = torch.tensor(tokens, dtype=torch.long)
        for row, tok in zip(rows, tokens):
            row.push(tok, now)

    def _run_continuous(self, first: list[GenRequest]) -> None:
        """Decode `first` and every compatible request that arrives meanwhile until no row is left."""
        from .batch import RunningBatch

        key, mode = first[0].batch_key(), first[0].mode
        rb = None
        joining = first
        try:
            self._apply_mode(mode)
            stats = RowStats([], []) if self.handle is not None else None
            rb = RunningBatch(self.model, self.pad_id, dashkv=not mode.dense,
                              new_cache=(lambda first: self._new_cache(stats if first else None))
                              if self.handle is not None else None)
            while True:
                if joining:
                    self._join(rb, joining)
                    joining = []
                now = time.perf_counter()
                for row in rb.rows:
                    if row.req.cancelled:
                        row.finish("cancelled", now)
                rb.keep([i for i, r in enumerate(rb.rows) if not r.done])
                if rb.rows:
                    n = len(rb.rows)
                    self.running_rows = n
                    self.largest_batch = max(self.largest_batch, n)
                    self.metrics.set("dashkv_running_requests", n)
                    self.metrics.observe("dashkv_batch_size", n)
                    for row in rb.rows:
                        row.batch_size = max(row.batch_size, n)
                    if stats is not None:
                        stats.rows, stats.pads = list(rb.rows), rb.pads()
                    logits = rb.step(rb.last)
                    tokens = self._choose(logits, rb.rows)
                    now = time.perf_counter()
                    rb.last = torch.tensor(tokens, dtype=torch.long)
                    for row, tok in zip(rb.rows, tokens):
                        row.push(tok, now)
                    rb.keep([i for i, r in enumerate(rb.rows) if not r.done])
                if not self._running.is_set():  # stop(): fail what is still decoding, without a traceback
                    err = APIError(503, "the server is shutting down", code="shutting_down")
                    for row in rb.rows:
                        row.done = True
                        row.req.emit(Failed(err))
                    rb.keep([])
                    break
                joining = self._joiners(rb, key)
                if joining:
                    self._update_queue_gauge()
                elif not rb.rows:
                    break
        except Exception as exc:  # never let one batch take the server down
            log.exception("dashkv engine: a continuous batch failed")
            err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed")
            for row in (rb.rows if rb is not None else []):
                if not row.done:
                    row.done = True
                    row.req.emit(Failed(err))
            for req in joining:
                if rb is None or not any(r.req is req for r in rb.rows):
                    req.emit(Failed(err))
        finally:
            self.running_rows = 0
            self.metrics.set("dashkv_running_requests", 0)
            self.batches_run += 1

    def _prefilled(self, rows: list[_Row], now: float) -> None:
        prefill = now - rows[0].prefill_at
        self.metrics.observe("dashkv_prefill_seconds", prefill)
        if prefill > 0:
            self.metrics.observe("dashkv_prefill_tokens_per_second",
                                 sum(len(r.req.prompt_ids) for r in rows) / prefill)

    def _row_finished(self, row: _Row, reason: str) -> None:
        req = row.req
        first = row.first_at or row.finished_at
        prefill_s = first - row.prefill_at
        decode_s = row.finished_at - first
        decode_tps = (row.tokens - 1) / decode_s if row.tokens > 1 and decode_s > 0 else None
        if req.mode.dense:
            share = 1.0 if row.tokens > 1 else None
        else:
            share = row.read / row.ctx if row.ctx else None
        prompt = len(req.prompt_ids)
        ext = {
            "mode": "dense" if req.mode.dense else "dashkv",
            "budget": req.mode.label(),
            "context_read_share": share,
            "prefill_tokens_per_s": prompt / prefill_s if prefill_s > 0 else None,
            "decode_tokens_per_s": decode_tps,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "queue_s": row.prefill_at - req.arrived,
            "time_to_first_token_s": first - req.arrived,
            "batch_size": row.batch_size,
        }
        usage = {"prompt_tokens": prompt, "completion_tokens": row.tokens, "total_tokens": prompt + row.tokens,
                 "dashkv": ext}
        m = self.metrics
        m.inc("dashkv_prompt_tokens_total", prompt)
        m.inc("dashkv_generated_tokens_total", row.tokens)
        m.observe("dashkv_time_to_first_token_seconds", first - req.arrived)
        m.observe("dashkv_decode_seconds", decode_s)
        if decode_tps is not None:
            m.observe("dashkv_decode_tokens_per_second", decode_tps)
        if share is not None:
            m.observe("dashkv_context_read_share", share)
        req.emit(Finished(reason, row.text, list(row.ids), usage))
