"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Updated from the event loop (requests, statuses) and from the engine's worker thread (tokens, timings,
batch sizes), so every update takes one lock. Rendering is cheap: a few dozen lines.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SHARE = (0.01, 0.02, 0.05, 0.0625, 0.1, 0.125, 0.25, 0.5, 0.75, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """The numbers a user of the server looks at; `render()` is the body of GET /metrics."""

    HELP = {
        "dashkv_requests_total": ("counter", "Completed HTTP requests by endpoint and status (499: client went away)."),
        "dashkv_prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
        "dashkv_generated_tokens_total": ("counter", "Completion tokens generated."),
        "dashkv_queue_depth": ("gauge", "Requests waiting for a batch."),
        "dashkv_running_requests": ("gauge", "Requests in the batch being decoded."),
        "dashkv_batch_size": ("histogram", "Rows per decode step (continuous batching) or per batch (admission)."),
        "dashkv_prefill_seconds": ("histogram", "Prefill time of each batch."),
        "dashkv_decode_seconds": ("histogram", "Decode time of each request (first to last token)."),
        "dashkv_time_to_first_token_seconds": ("histogram", "Arrival to first token, per request (includes queueing)."),
        "dashkv_prefill_tokens_per_second": ("histogram", "Prefill tokens/s of each batch (all rows)."),
        "dashkv_decode_tokens_per_second": ("histogram", "Decode tokens/s of each request."),
        "dashkv_context_read_share": ("histogram", "Share of the context each request's decode steps read in the "
                                                   "DASH-KV-managed layers (1 = dense)."),
    }
    _BUCKETS = {"dashkv_batch_size": _BATCH, "dashkv_context_read_share": _SHARE,
                "dashkv_prefill_tokens_per_second": (10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000),
                "dashkv_decode_tokens_per_second": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, float] = {"dashkv_queue_depth": 0, "dashkv_running_requests": 0}
        self._hists: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            hist = self._hists[name].get(key)
            if hist is None:
                hist = self._hists[name][key] = _Histogram(self._BUCKETS.get(name, _SECONDS))
            hist.observe(value)

    def counter(self, name: str, **labels: str) -> float:
        """A counter's current value (tests and the bench script read it)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self.HELP.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, value in sorted(self._counters.get(name, {}).items()):
                        lines.append(f"{name}{_labels(key)} {value:g}")
                elif kind == "gauge":
                    lines.append(f"{name} {self._gauges.get(name, 0):g}")
                else:
                    for key, h in sorted(self._hists.get(name, {}).items()):
                        cumulative = 0
                        for bound, c in zip((*h.buckets, float("inf")), h.counts):
                            cumulative += c
                            le = "+Inf" if bound == float("inf") else f"{bound:g}"
                            lines.append(f"{name}_bucket{_labels((*key, ('le', le)))} {cumulative}")
                        lines.append(f"{name}_sum{_labels(key)} {h.sum:.6g}")
                        lines.append(f"{name}_count{_labels(key)} {h.count}")
        return "\n".join(lines) + "\n"
