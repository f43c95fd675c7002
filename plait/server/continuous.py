"""Continuous batching for `plait serve` (`--scheduler continuous`, the default).

The interface is the static `Batcher`'s (plait/server/batcher.py: `start`, `submit` -> Ticket,
events Started/Delta/Finished/Done/Failed, `cancel`, `stop`, `stats`, `queue_depth`,
`run_exclusive`), so the HTTP side does not know which scheduler runs. What differs is when
rows enter and leave the engine batch: at every decode step, not once per batch (the
iteration-level scheduling of Orca, Yu et al. OSDI 2022; vLLM and LoRAX schedule this way).

One step, on the batch thread:

    1. waiting requests that fit in the free slots (`max_batch` rows in all) are resolved
       (router refresh, `model` -> adapters, as the static batcher does), their prompts are
       prefilled in one forward pass, and each row's first token is picked;
    2. their KV cache joins the running batch's (`CompositionEngine.join_states`: the shorter
       cache is left-padded with masked columns, so nobody's positions move);
    3. one decode step runs every row, each with its own routing (the engine's mixed-adapter
       batch) and its own sampling: greedy rows take the argmax, sampled rows draw from their
       own `torch.Generator` seeded from the request's `seed` (row i of a request: seed + i),
       so a seeded request samples the same tokens whatever else the server is running;
    4. rows that ended (eos, their own `max_tokens`, a stop string, a cancelled request) leave
       the batch at once (`CompositionEngine.keep_rows`), freeing their slots and, when they
       were the longest, their cache columns.

Under greedy decoding a row gets the same tokens as the same request served alone.

Adapters: each row holds its adapters (`RoutedModel.decide(hold=True)`) from admission until
it leaves, so loading another request's adapter never evicts one a running row decodes with
(`--max-adapters`, routing/residency.py). Metrics (`ServerMetrics`, /metrics): time to first
token and per-token latency per row, the batch size of every decode step, the queue depth.

Counters (`stats()`): those of the static batcher, where `batches` counts the times the
running batch emptied (a busy period ended), `rows` the rows admitted, `max_batch_rows` the
largest running batch, `decode_steps` the decode steps; plus `running_rows` (the batch now),
`joined` (rows that joined a batch already decoding), `left` (rows that left while others
went on), `prefills` and `row_steps` (the sum of batch sizes over decode steps:
`row_steps / decode_steps` is the mean batch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from plait.server.batcher import Batcher, Done, Failed, Started, Ticket, _Row
from plait.server.config import ServerConfig
from plait.server.metrics import ServerMetrics
from plait.service import held_refs

log = logging.getLogger("plait.server")

_SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)


@dataclass
class _Running:
    """One row in the running batch (owned by the batch thread)."""

    ticket: Ticket
    row: _Row
    gen: torch.Generator | None  # None: greedy
    held: list[str]  # adapter refs this row holds until it leaves (RoutedModel.release)
    next_token: int = -1  # picked, not yet fed to the model


class ContinuousBatcher(Batcher):
    """Continuous (step-level) batching over a `plait.service.RoutedModel`.

    Args:
        routed: the routed model (engine + router + registry) to serve.
        config: limits and batching settings (`max_batch` bounds the running batch).
        metrics: where to report tokens, latencies, batch sizes and the queue (`/metrics`).
    """

    def __init__(self, routed, config: ServerConfig, metrics: ServerMetrics | None = None):
        super().__init__(routed, config, metrics)
        self._stats.update({"running_rows": 0, "joined": 0, "left": 0, "prefills": 0, "row_steps": 0})
        self._state = None  # routing.engine.DecodeState of the running rows, or None
        self._running: list[_Running] = []  # in the state's row order

    # ------------------------------------------------------------------ the loop (event loop)
    def _take_nowait(self, free: int) -> list[Ticket]:
        """Waiting tickets that fit in `free` slots, in arrival order (cancelled ones dropped)."""
        out: list[Ticket] = []
        while True:
            if self._carry:
                t = self._carry.popleft()
            else:
                try:
                    t = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    return out
            if t.cancelled:
                continue
            if len(t.rows) > free:
                self._carry.appendleft(t)  # first in line at a later step (no overtaking)
                return out
            out.append(t)
            free -= len(t.rows)

    async def _batch_loop(self) -> None:
        while True:
            admitted: list[Ticket] = []
            if not self._running:
                first = await self._next(None)  # idle: wait for work
                if first.cancelled:
                    continue
                admitted.append(first)
            used = len(self._running) + sum(len(t.rows) for t in admitted)
            admitted += self._take_nowait(self.config.max_batch - used)
            self.metrics.queue_depth(self.queue_depth())
            try:
                await self.run_exclusive(self._step, admitted)
            except Exception as e:  # noqa: BLE001 - a step must never take the worker down
                log.exception("a decode step failed")
                self._fail_all(e, admitted)

    def _fail_all(self, error: BaseException, admitted: list[Ticket]) -> None:
        """Fail every running and just-admitted request and empty the batch."""
        tickets = {id(t): t for t in admitted}
        tickets.update({id(r.ticket): r.ticket for r in self._running})
        for t in tickets.values():
            if not t._closed and not t.cancelled:
                self._count("errors")
                t.emit(Failed(error))
        self._release(self._running)
        self._running, self._state = [], None
        with self._stats_lock:
            self._stats["running_rows"] = 0

    # ------------------------------------------------------------------ one step (batch thread)
    def _step(self, admitted: list[Ticket]) -> None:
        """Admit `admitted`, then run one decode step of every running row."""
        if admitted:
            self._admit(admitted)
        self._drop_finished()
        if not self._running:
            return
        engine = self.rm.engine
        t0 = time.perf_counter()
        try:
            with self.rm._lock:  # adapters are only added under this lock, never during a step
                logits = engine.decode_step(self._state, [r.next_token for r in self._running])
        except Exception as e:  # noqa: BLE001 - every running request fails, the server goes on
            log.exception("decoding failed")
            self._fail_all(e, [])
            return
        with self._stats_lock:
            self._stats["decode_s"] += time.perf_counter() - t0
            self._stats["decode_steps"] += 1
            self._stats["row_steps"] += len(self._running)
        self.metrics.batch_step(len(self._running))
        self._feed_picks(self._running, logits)
        self._drop_finished()

    def _admit(self, tickets: list[Ticket]) -> None:
        """Resolve, prefill and pick the first token of every row of `tickets`; join them to the batch."""
        try:
            self.rm.refresh()  # a newer router version serves from this step on
        except Exception:  # noqa: BLE001 - keep serving with the router we have
            log.exception("router refresh failed; serving with the loaded router")
        t0 = time.perf_counter()
        decided = self._route_auto(tickets)  # holds the adapters of what it decides
        entries: list[tuple[Ticket, _Row, Any]] = []
        for t in tickets:
            served = self._served(t, decided)
            if served is None:
                continue
            entries += [(t, row, s) for row, s in zip(t.rows, served)]
        self._count("resolve_s", time.perf_counter() - t0)
        if not entries:
            return
        for t, row, s in entries:
            t.emit(Started(row.index, s.to_dict()))
        new = [_Running(t, row, self._generator(t, row), held_refs([s])) for t, row, s in entries]
        t0 = time.perf_counter()
        try:
            with self.rm._lock:
                state, logits = self.rm.engine.prefill([row.prompt.tokens for _, row, _ in entries],
                                                       [s.routing() for _, _, s in entries])
        except Exception as e:  # noqa: BLE001 - these requests fail, the running ones go on
            log.exception("prefill failed")
            self._release(new)
            for t in {id(t): t for t, _, _ in entries}.values():
                self._count("errors")
                t.emit(Failed(e))
            return
        self._count("decode_s", time.perf_counter() - t0)
        self._count("prefills")
        self._count("rows", len(new))
        if self._running:
            self._count("joined", len(new))
        self._running += new  # from here on, leaving the batch releases their holds
        self._feed_picks(new, logits)
        self._state = state if self._state is None else self.rm.engine.join_states(self._state, state)
        with self._stats_lock:
            self._stats["running_rows"] = len(self._running)
            self._stats["max_batch_rows"] = max(self._stats["max_batch_rows"], len(self._running))

    def _generator(self, t: Ticket, row: _Row) -> torch.Generator | None:
        sampling = t.request.sampling
        if not sampling.do_sample:
            return None
        gen = torch.Generator(device=self.rm.engine.device)
        if sampling.seed is None:
            gen.seed()
        else:  # row i of a request: seed + i, so its prompts do not sample alike
            gen.manual_seed((sampling.seed + row.index) % _SEED_SPACE)
        return gen

    def _release(self, rows: list[_Running]) -> None:
        """Give back the adapter holds of rows that leave (each row's, once)."""
        refs = [ref for r in rows for ref in r.held]
        for r in rows:
            r.held = []
        if refs:
            self.rm.release(refs)

    def _feed_picks(self, rows: list[_Running], logits: torch.Tensor) -> None:
        """Pick each row's next token from `logits` [B, V] and add it to the row."""
        now = time.perf_counter()
        picks = logits.argmax(-1).tolist()
        pick = self.rm.engine._pick
        for i, r in enumerate(rows):
            if r.gen is not None:
                s = r.ticket.request.sampling
                # one row at a time, [1, V]: the draws equal those of this request decoded alone
                picks[i] = int(pick(logits[i:i + 1], True, s.temperature, s.top_p, r.gen)[0])
        for r, tok in zip(rows, picks):
            r.next_token = tok
            if r.row.finished:
                continue
            if r.ticket.cancelled:  # the client went away: this row stops here, its slot frees now
                r.row.finished, r.row.finish_reason = True, "cancelled"
                continue
            self._clock(r.ticket, r.row, now)
            self._step_row(r.ticket, r.row, tok)

    def _drop_finished(self) -> None:
        """Rows that ended leave the batch; a request whose rows all ended gets its Done."""
        for r in self._running:
            if r.ticket.cancelled and not r.row.finished:
                r.row.finished, r.row.finish_reason = True, "cancelled"
        keep = [i for i, r in enumerate(self._running) if not r.row.finished]
        if len(keep) == len(self._running):
            return
        gone = [r for r in self._running if r.row.finished]
        self._release(gone)
        self._state = self.rm.engine.keep_rows(self._state, keep) if self._state is not None else None
        self._running = [self._running[i] for i in keep]
        with self._stats_lock:  # before the answers go out: a client reading stats after its answer sees them
            if self._running:
                self._stats["left"] += len(gone)
            else:
                self._stats["batches"] += 1  # the running batch emptied: one busy period ended
            self._stats["running_rows"] = len(self._running)
        for t in {id(r.ticket): r.ticket for r in gone}.values():
            if not t.cancelled and not t._closed and all(row.finished for row in t.rows):
                t.emit(Done([self._result(row) for row in t.rows]))


def make_batcher(routed, config: ServerConfig, metrics: ServerMetrics | None = None) -> Batcher:
    """The batcher `config.scheduler` names: `ContinuousBatcher` or the static `Batcher`."""
    cls = ContinuousBatcher if config.scheduler == "continuous" else Batcher
    return cls(routed, config, metrics)


__all__ = ["ContinuousBatcher", "make_batcher"]
