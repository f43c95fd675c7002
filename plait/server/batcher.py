"""The batching engine of `plait serve`: tokenised requests in, token events out.

Nothing here knows HTTP. The interface, which a continuous batcher can keep as it is:

    batcher = Batcher(routed, config); await batcher.start()
    ticket = batcher.submit(GenerationRequest(model, prompts, sampling))   # QueueFullError when full
    async for event in ticket: ...        # Started, Delta (streams only), Finished (streams only),
                                          # then Done or Failed, once, last
    batcher.cancel(ticket)                # the client went away: its rows stop at the next step
    await batcher.stop()

This one batches *statically*: one worker takes the first waiting request, gathers more for
up to `max_wait_ms` or until `max_batch` rows, and runs the batch in a worker thread (the
event loop keeps accepting requests meanwhile). It refreshes the router from the registry,
resolves every request's `model` again (a new version or a moved alias serves from the next
batch on; a version failing its hash check fails only its own requests), and decodes all rows
in ONE mixed-adapter batch of the composition engine. Sampling settings are per batch in the
engine, so rows are grouped by them: every greedy request shares one batch; sampled requests
share one with those of equal (temperature, top_p, seed). Within a group, rows with
different `max_tokens` or `stop` run together: the batch decodes until every row has hit
eos, its own `max_tokens`, a stop string or a cancel, and each row is trimmed to its own limit.

A cancelled row is finished at the next decode step: it sends nothing more and no longer
keeps its batch running (the batch stops as soon as every row left is finished). Its slot in
a batch that goes on for other rows is still computed until that batch ends: a static batch
cannot shrink; a continuous batcher frees the slot itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from plait.server.config import ServerConfig
from plait.server.metrics import ServerMetrics

log = logging.getLogger("plait.server")


# --------------------------------------------------------------------------- what goes in


@dataclass(frozen=True)
class Sampling:
    """How a request's rows are decoded."""

    max_tokens: int
    """Most new tokens per row."""
    stop: tuple[str, ...] = ()
    """Strings that end a row (not included in its text)."""
    temperature: float = 0.0
    """0 = greedy; above 0 samples."""
    top_p: float = 1.0
    """Nucleus mass kept when sampling."""
    seed: int | None = None
    """Seeds the sampling generator of the batch the request runs in."""

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def group_key(self) -> tuple:
        """Requests with equal keys can share one engine batch."""
        return (True, self.temperature, self.top_p, self.seed) if self.do_sample else (False,)


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt and the text the router sees for it."""

    tokens: list[int]
    route_text: str


@dataclass
class GenerationRequest:
    """One request: its prompts are decoded as rows of a batch, each under `model`."""

    model: str
    """auto, base or an adapter reference."""
    prompts: list[Prompt]
    sampling: Sampling
    top_k: int = 1
    """Blend size for `auto`."""
    stream: bool = False
    """Send Delta/Finished events as tokens are decoded."""


# --------------------------------------------------------------------------- what comes out


@dataclass(frozen=True)
class Started:
    """Row `index` is about to decode; `served` says how (`Served.to_dict()`)."""

    index: int
    served: dict


@dataclass(frozen=True)
class Delta:
    """New text of row `index` (streams only)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Row `index` is finished: `reason` is stop or length (streams only)."""

    index: int
    reason: str


@dataclass(frozen=True)
class RowResult:
    """The answer of one row."""

    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Done:
    """Every row is finished (the last event)."""

    rows: list[RowResult]


@dataclass(frozen=True)
class Failed:
    """The request failed (the last event)."""

    error: BaseException


class QueueFullError(Exception):
    """The batcher's queue is full; retry later."""


# --------------------------------------------------------------------------- a request in flight


@dataclass
class _Row:
    """One prompt of a request and its decoding state (owned by the worker thread)."""

    index: int
    prompt: Prompt
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False
    finish_reason: str | None = None
    eos: bool = False
    text: str | None = None
    last_token_at: float | None = None
    """perf_counter() of its latest token (for /metrics)."""


class Ticket:
    """A submitted request: iterate it for its events; `Batcher.cancel(ticket)` abandons it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.arrived = time.perf_counter()
        self.cancelled = False
        self.rows = [_Row(i, p) for i, p in enumerate(request.prompts)]
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._closed = False

    def emit(self, event: Any) -> None:
        """Hand an event to the ticket's reader (thread-safe)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self) -> Started | Delta | Finished | Done | Failed:
        """The next event (waits for it); Done or Failed is the last."""
        event = await self._events.get()
        self._closed = self._closed or isinstance(event, (Done, Failed))
        return event

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while not self._closed:
            yield await self.next_event()


# --------------------------------------------------------------------------- the batcher


class Batcher:
    """Static dynamic batching over a `plait.service.RoutedModel`.

    Args:
        routed: the routed model (engine + router + registry) to serve.
        config: limits and batching settings.
        metrics: where to report tokens, latencies, batch sizes and the queue (`/metrics`).
    """

    def __init__(self, routed, config: ServerConfig, metrics: ServerMetrics | None = None):
        self.rm = routed
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.tokenizer = routed.engine.tokenizer
        self.eos = set(routed.engine._eos_ids(None))
        self._queue: asyncio.Queue | None = None
        self._carry: deque[Ticket] = deque()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-batch")
        self._worker: asyncio.Task | None = None
        self._stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch_rows": 0, "errors": 0,
                       "cancelled": 0, "decode_steps": 0, "resolve_s": 0.0, "decode_s": 0.0}
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ interface
    async def start(self) -> None:
        """Start the batch loop (on the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._worker = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        """Stop the batch loop; a running batch is abandoned."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue a request (call on the event loop); raises QueueFullError when the queue is full."""
        ticket = Ticket(request, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(ticket)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.config.max_queue} requests are waiting") from None
        self._count("requests")
        self.metrics.queue_depth(self.queue_depth())
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Abandon a request: dropped if still queued, its rows finished at the next decode step.

        Returns:
            Whether this call cancelled it (False: answered already, or cancelled before).
        """
        if ticket.cancelled or ticket._closed:
            return False
        ticket.cancelled = True
        self._count("cancelled")
        return True

    def stats(self) -> dict[str, Any]:
        """Counters since start (requests, batches, rows, errors, cancelled, decode steps, seconds)."""
        with self._stats_lock:
            return dict(self._stats)

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def run_exclusive(self, fn: Callable, *args: Any) -> Any:
        """Run `fn(*args)` on the batch thread, between batches (e.g. routing, which may load adapters)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ gathering
    def _count(self, name: str, by: float = 1) -> None:
        with self._stats_lock:
            self._stats[name] += by

    async def _next(self, deadline: float | None) -> Ticket | None:
        """The next waiting ticket, waiting until `deadline` (None: forever); None on timeout."""
        if self._carry:
            return self._carry.popleft()
        if deadline is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                return None
            try:
                return await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                return None

    async def _gather(self) -> list[Ticket]:
        first = await self._next(None)
        batch, rows = [first], len(first.rows)
        deadline = asyncio.get_running_loop().time() + self.config.max_wait_ms / 1000
        while rows < self.config.max_batch:
            nxt = await self._next(deadline)
            if nxt is None:
                break
            if rows + len(nxt.rows) > self.config.max_batch:
                self._carry.appendleft(nxt)  # first in the next batch
                break
            batch.append(nxt)
            rows += len(nxt.rows)
        self.metrics.queue_depth(self.queue_depth())
        return [t for t in batch if not t.cancelled]

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                await self.run_exclusive(self._run_batch, batch)
            except Exception as e:  # noqa: BLE001 - a batch must never take the worker down
                log.exception("batch failed")
                for t in batch:
                    t.emit(Failed(e))

    # ------------------------------------------------------------------ one batch (worker thread)
    def _run_batch(self, batch: list[Ticket]) -> None:
        """Resolve every request's adapters and decode the batch.

        Every row's adapters are held (`RoutedModel.decide(hold=True)`) from the moment they are
        resolved until the batch is decoded, so loading a later request's adapter never evicts
        one an earlier row of the batch decodes with (`--max-adapters`).
        """
        try:
            self.rm.refresh()  # a newer router version serves from this batch on
        except Exception:  # noqa: BLE001 - keep serving with the router we have
            log.exception("router refresh failed; serving with the loaded router")
        held: list[str] = []
        try:
            self._resolve_and_decode(batch, held)
        finally:
            self.rm.release(held)

    def _resolve_and_decode(self, batch: list[Ticket], held: list[str]) -> None:
        from plait.service import held_refs

        t0 = time.perf_counter()
        decided = self._route_auto(batch)
        for served in decided.values():
            held.extend(held_refs(served))
        groups: dict[tuple, list[tuple[Ticket, list]]] = {}
        for t in batch:
            served = self._served(t, decided)
            if served is None:
                continue
            if id(t) not in decided:
                held.extend(held_refs(served))
            groups.setdefault(t.request.sampling.group_key(), []).append((t, served))
        self._count("resolve_s", time.perf_counter() - t0)
        for group in groups.values():
            group = [(t, s) for t, s in group if not t.cancelled]
            if not group:
                continue
            try:
                self._decode(group)
            except Exception as e:  # noqa: BLE001
                log.exception("decoding a batch failed")
                for t, _ in group:
                    self._count("errors")
                    t.emit(Failed(e))

    def _served(self, t: Ticket, decided: dict[int, list]) -> list | None:
        """How `t`'s rows are served (the batch's auto decision, else its own, adapters held), or None
        when resolving it failed: then `t` has its Failed and the others are served."""
        try:
            return decided.get(id(t)) or self.rm.decide([r.prompt.route_text for r in t.rows],
                                                        t.request.model, t.request.top_k, hold=True)
        except Exception as e:  # noqa: BLE001 - this request fails, the others are served
            self._count("errors")
            t.emit(Failed(e))
            return None

    def _route_auto(self, batch: list[Ticket]) -> dict[int, list]:
        """Route all `auto` requests of a batch in one router call per top_k (by ticket id).

        When that call fails (e.g. one routed adapter fails its hash check) nothing is
        returned and every request is decided on its own, so only the affected ones fail.
        The adapters of what is returned are held (the caller releases them).
        """
        by_k: dict[int, list[Ticket]] = {}
        for t in batch:
            if t.request.model == "auto":
                by_k.setdefault(t.request.top_k, []).append(t)
        out: dict[int, list] = {}
        for k, tickets in by_k.items():
            if len(tickets) < 2:
                continue
            try:
                served = self.rm.decide([r.prompt.route_text for t in tickets for r in t.rows], "auto", k, hold=True)
            except Exception:  # noqa: BLE001 - fall back to one decision per request
                continue
            i = 0
            for t in tickets:
                out[id(t)] = served[i:i + len(t.rows)]
                i += len(t.rows)
        return out

    def _decode(self, group: list[tuple[Ticket, list]]) -> None:
        engine = self.rm.engine
        entries = [(t, row, s) for t, served in group for row, s in zip(t.rows, served)]
        for t, row, s in entries:
            t.emit(Started(row.index, s.to_dict()))
        ids, mask = engine._pad([row.prompt.tokens for _, row, _ in entries], "left")
        sampling = group[0][0].request.sampling

        def on_step(new_ids, _done) -> bool:
            now = time.perf_counter()
            self._count("decode_steps")
            self.metrics.batch_step(len(entries))  # a static batch computes every row until it ends
            for (t, row, _), tok in zip(entries, new_ids.tolist()):
                if t.cancelled and not row.finished:  # the client went away: stop this row here
                    row.finished, row.finish_reason = True, "cancelled"
                if not row.finished:
                    self._clock(t, row, now)
                    self._step_row(t, row, tok)
            return all(row.finished for _, row, _ in entries)

        t0 = time.perf_counter()
        with self.rm._lock:  # adapters are only added under this lock, never during a batch
            engine.generate_ids(ids, mask, [s.routing() for _, _, s in entries],
                                max_new_tokens=max(t.request.sampling.max_tokens for t, _ in group),
                                do_sample=sampling.do_sample, temperature=sampling.temperature or 1.0,
                                top_p=sampling.top_p, seed=sampling.seed, on_step=on_step)
        with self._stats_lock:
            self._stats["decode_s"] += time.perf_counter() - t0
            self._stats["batches"] += 1
            self._stats["rows"] += len(entries)
            self._stats["max_batch_rows"] = max(self._stats["max_batch_rows"], len(entries))
        for t, _ in group:
            if not t.cancelled:
                t.emit(Done([self._result(row) for row in t.rows]))

    def _clock(self, t: Ticket, row: _Row, now: float) -> None:
        """Report a row's new token to the metrics: its first (time to first token) or a later one."""
        if row.last_token_at is None:
            self.metrics.first_token(now - t.arrived)
        else:
            self.metrics.token(now - row.last_token_at)
        row.last_token_at = now

    def _step_row(self, t: Ticket, row: _Row, tok: int) -> None:
        delta = self._feed(t.request, row, tok)
        if t.request.stream and delta:
            t.emit(Delta(row.index, delta))
        if row.finished and t.request.stream:
            t.emit(Finished(row.index, row.finish_reason))

    def _result(self, row: _Row) -> RowResult:
        if not row.finished:  # cannot happen (max_new_tokens covers every row); stay safe
            row.finished, row.finish_reason = True, "length"
        if row.text is None:
            row.text = self._decode_text(row.tokens)
        return RowResult(row.index, row.text, row.finish_reason, len(row.prompt.tokens),
                         len(row.tokens) + int(row.eos))

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _feed(self, req: GenerationRequest, row: _Row, tok: int) -> str:
        """Add one decoded token to a row; returns the text that may be sent now."""
        stop = req.sampling.stop
        if tok in self.eos:
            row.finished, row.finish_reason, row.eos = True, "stop", True
        else:
            row.tokens.append(tok)
            if len(row.tokens) >= req.sampling.max_tokens:
                row.finished, row.finish_reason = True, "length"
        if not (req.stream or stop):
            return ""
        text = self._decode_text(row.tokens)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            text = text[:min(hits)]
            row.finished, row.finish_reason = True, "stop"
        if row.finished:
            row.text = text
            safe = len(text)
        else:
            # hold back a possible start of a stop string and an unfinished multi-byte character
            safe = len(text) - max((len(s) - 1 for s in stop), default=0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        if safe <= len(row.sent) or not text.startswith(row.sent):
            return ""
        delta = text[len(row.sent):safe]
        row.sent += delta
        return delta
