"""`GET /metrics`: the server's counters in the Prometheus text exposition format (version 0.0.4).

vLLM (`vllm:time_to_first_token_seconds`, ...) and LoRAX expose the same kind of figures; a
Prometheus scraper, Grafana or `curl` reads them. The scheduler reports what happens through
a few hooks, from any thread (the model runs in the batch worker thread, the routes on the
event loop), and `render()` writes the text:

    request_started(kind)                  a generation request arrived (kind: completion | chat)
    request_finished(kind, status, p, c)   it ended: status ok | cancelled | rejected | invalid | error,
                                           p prompt and c completion tokens (the usage it answered)
    first_token(seconds)                   a row's first token, `seconds` after its request arrived
    token(seconds)                         every later token of a row, `seconds` after the previous one
    batch_step(size)                       one decode step computed `size` rows
    queue_depth(n)                         `n` requests wait for a batch now

The routes (app.py) call the two request hooks, so every scheduler gets them for free; a
scheduler (`Batcher(routed, config, metrics)`) calls the other four from its decode loop:
`first_token` at a row's first token (now - `Ticket.arrived`), `token` at every later one
(now - the row's previous token), `batch_step` once per decode step, `queue_depth` when its
queue changes (the /metrics route also sets it from `queue_depth()` when scraped).

The metrics (all named `plait_`):

    plait_requests_received_total{kind}            counter
    plait_requests_total{kind,status}              counter (finished requests)
    plait_prompt_tokens_total                      counter
    plait_generation_tokens_total                  counter
    plait_time_to_first_token_seconds              histogram (one observation per row)
    plait_time_per_output_token_seconds            histogram (every token of a row after its first)
    plait_batch_size_rows                          histogram (one observation per decode step)
    plait_queue_depth                              gauge
    plait_adapter_{hits,misses,loads,evictions}_total, plait_adapter_load_seconds_total,
    plait_adapters_resident, plait_adapters_max    adapter residency (those the engine reports)

So, for requests of one prompt each, the time-to-first-token count is the number of answered
requests that produced a token, and the per-token count is the generation tokens minus that
(vLLM's `time_per_output_token` counts the same way). Written by hand: the format is a few
lines of text, and `prometheus_client`'s registry is process-global, which two servers in one
process (the tests) would share.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the Prometheus text format."""

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
"""Seconds: from a tiny model on a loopback (ms) to a queued CPU batch (tens of s)."""
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds between two tokens of a row (SmolLM2-135M on 2 CPU cores: ~0.04 s alone)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Rows in one decode step."""

STATUSES = ("ok", "cancelled", "rejected", "invalid", "error")
"""How a request ends: answered; the client went away; the queue was full (503); a 4xx; a 5xx."""

_RESIDENCY = (  # (key of RoutedModel.residency_stats(), metric, type, help)
    ("hits", "plait_adapter_hits_total", "counter", "Adapter lookups served by a resident adapter."),
    ("misses", "plait_adapter_misses_total", "counter", "Adapter lookups that needed a load."),
    ("loads", "plait_adapter_loads_total", "counter", "Adapters loaded from the registry (hash-checked)."),
    ("evictions", "plait_adapter_evictions_total", "counter", "Adapters evicted (least recently used)."),
    ("load_seconds", "plait_adapter_load_seconds_total", "counter", "Seconds spent loading adapters."),
    ("resident", "plait_adapters_resident", "gauge", "Adapters resident in the engine now."),
    ("max_adapters", "plait_adapters_max", "gauge", "Most adapters the engine holds (--max-adapters)."),
)


class Histogram:
    """Cumulative buckets, a sum and a count (not thread-safe: `ServerMetrics` locks)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        """The `_bucket`, `_sum` and `_count` sample lines (buckets cumulative, ending at +Inf)."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.sum)}",
                f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Thread-safe request, token, latency, batch and queue figures of one server."""

    def __init__(self):
        self._lock = threading.Lock()
        self.received: dict[str, int] = defaultdict(int)
        self.finished: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.queue = 0

    # ------------------------------------------------------------------ hooks
    def request_started(self, kind: str) -> None:
        """A generation request of `kind` (completion or chat) arrived."""
        with self._lock:
            self.received[kind] += 1

    def request_finished(self, kind: str, status: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """A request ended with `status` (one of `STATUSES`) after these prompt and completion tokens."""
        with self._lock:
            self.finished[(kind, status)] += 1
            self.prompt_tokens += int(prompt_tokens)
            self.generation_tokens += int(completion_tokens)

    def first_token(self, seconds: float) -> None:
        """A row decoded its first token `seconds` after its request arrived."""
        with self._lock:
            self.ttft.observe(seconds)

    def token(self, seconds: float) -> None:
        """A row decoded a later token `seconds` after its previous one."""
        with self._lock:
            self.per_token.observe(seconds)

    def batch_step(self, size: int) -> None:
        """One decode step computed `size` rows."""
        with self._lock:
            self.batch.observe(size)

    def queue_depth(self, n: int) -> None:
        """`n` requests are waiting for a batch now."""
        with self._lock:
            self.queue = int(n)

    # ------------------------------------------------------------------ exposition
    def render(self, residency: dict[str, Any] | None = None) -> str:
        """The Prometheus text exposition of every metric.

        Args:
            residency: `RoutedModel.residency_stats()` (hits, misses, loads, evictions,
                load_seconds, resident, max_adapters) or part of it; keys absent or None are
                left out.

        Returns:
            The text, ending in a newline.
        """
        with self._lock:
            out = _family("plait_requests_received_total", "counter", "Generation requests received, by kind.",
                          [(f'{{kind="{_label(k)}"}}', n) for k, n in sorted(self.received.items())])
            out += _family("plait_requests_total", "counter", "Generation requests finished, by kind and status "
                           "(ok, cancelled, rejected = queue full, invalid = 4xx, error = 5xx).",
                           [(f'{{kind="{_label(k)}",status="{_label(s)}"}}', n)
                            for (k, s), n in sorted(self.finished.items())])
            out += _family("plait_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                           [("", self.prompt_tokens)])
            out += _family("plait_generation_tokens_total", "counter", "Completion tokens of finished requests.",
                           [("", self.generation_tokens)])
            for name, hist, text in (
                    ("plait_time_to_first_token_seconds", self.ttft, "Seconds from a request's arrival to a row's "
                     "first token."),
                    ("plait_time_per_output_token_seconds", self.per_token, "Seconds between two tokens of a row."),
                    ("plait_batch_size_rows", self.batch, "Rows computed in one decode step.")):
                out += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
            out += _family("plait_queue_depth", "gauge", "Requests waiting for a batch.", [("", self.queue)])
        for key, name, kind, text in _RESIDENCY:
            value = (residency or {}).get(key)
            if value is not None:
                out += _family(name, kind, text, [("", value)])
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> list[str]:
    """One metric family: its HELP and TYPE lines and a line per (labels, value) sample."""
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
            *(f"{name}{labels} {_number(v)}" for labels, v in samples)]


def _number(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a point, +Inf/-Inf/NaN spelled out."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _label(value: str) -> str:
    """A label value escaped as the format asks (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "STATUSES", "TOKEN_BUCKETS", "TTFT_BUCKETS", "ServerMetrics"]
