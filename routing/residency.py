"""Adapter residency: which adapters stay loaded on the engine when at most N may be.

A server that names hundreds of adapters cannot keep them all on one base, so the composition
engine (`routing.engine.CompositionEngine`) holds at most `max_adapters` of them and loads the
others on demand, as S-LoRA (arXiv:2311.03285), LoRAX (`--max-active-adapters`) and vLLM
(`max_loras`; in-flight adapters pinned since vllm#14497) do. This module is the policy only:
it keeps the resident names in least-recently-used order and decides which one to evict; the
engine does the loading and unloading.

Three kinds of hold keep a resident adapter from being evicted:

- an *in-flight* hold: `acquire(names)` before a row (or batch) decodes with the adapters,
  `release(names)` once it is done. Holds are counted per name, so two rows using one adapter
  hold it twice; a name may be acquired before it is loaded (that is how a loader makes the
  load and the hold one atomic step).
- a *permanent* pin: `pin(name)` / `unpin(name)`, for `plait serve --preload REF,...` (an alias
  reference's pin follows the alias) and the adapters a router needs resident (perplexity).
- nothing else: every other resident adapter is a candidate, the least recently used first.

When a new adapter must be loaded and every resident one is held, the load is refused with
`AdapterSlotsFullError` (the server answers that one request 503) rather than exceeding the limit:
memory stays bounded by the setting whatever clients name.

Counters (`stats()`): hits and misses (a lookup that found the adapter resident, or not),
loads (completed loads), evictions (adapters dropped to make room), load_seconds (the wall time
of the loads: hash check, file read and stacking), resident, max_adapters (None = no limit),
pinned and in_flight (adapters with a permanent pin / an in-flight hold).

The default limit (`default_max_adapters`) is sized for the machine: a quarter of the memory
available when the server starts, divided by the largest adapter's size, clamped to
[`MIN_DEFAULT_ADAPTERS`, `MAX_DEFAULT_ADAPTERS`].
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from registry.errors import PlaitError
from registry.names import whole_number

MIN_DEFAULT_ADAPTERS = 8
"""Smallest default limit: a small machine still serves a few domains at once."""
MAX_DEFAULT_ADAPTERS = 1024
"""Largest default limit (LoRAX's `--max-active-adapters` default); give more explicitly."""
MEMORY_SHARE = 0.25
"""Share of the memory available at start that the default limit lets adapters take."""
NOMINAL_ADAPTER_BYTES = 16 * 2**20
"""Adapter size assumed by the default limit when no adapter is registered yet."""


class AdapterSlotsFullError(PlaitError):
    """Every adapter slot holds an adapter that a running request uses (or a pinned one); the server
    answers 503 and the request may be retried (exit code 1)."""


def check_max_adapters(value: Any, option: str = "max_adapters") -> int | None:
    """`value` if it is None (no limit) or a whole number >= 1 (`registry.names.whole_number`).

    Raises:
        BadInputError: naming the value and the fix.
    """
    return None if value is None else whole_number(value, option, 1, example=32)


def available_memory_bytes() -> int:
    """Memory the system can still give (MemAvailable), else its physical memory."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_adapters(adapter_bytes: int | None, available_bytes: int | None = None) -> int:
    """The default limit: MEMORY_SHARE of the available memory over the size of one adapter.

    Args:
        adapter_bytes: the size of the largest adapter that may be served (its artifact's bytes:
            the engine holds the tensors in the compute dtype, fp32 like the files); None or 0
            uses NOMINAL_ADAPTER_BYTES.
        available_bytes: memory available now (default: `available_memory_bytes()`).

    Returns:
        An int in [MIN_DEFAULT_ADAPTERS, MAX_DEFAULT_ADAPTERS].
    """
    size = adapter_bytes if adapter_bytes and adapter_bytes > 0 else NOMINAL_ADAPTER_BYTES
    avail = available_memory_bytes() if available_bytes is None else available_bytes
    return max(MIN_DEFAULT_ADAPTERS, min(MAX_DEFAULT_ADAPTERS, int(avail * MEMORY_SHARE // size)))


class Residency:
    """An LRU of resident adapter names with in-flight holds and permanent pins (see the module).

    Args:
        max_adapters: most adapters resident at once; None = no limit.
        evict: unloads one adapter (the engine's `remove_adapter`); it must call `forget(name)`.
    """

    def __init__(self, max_adapters: int | None = None, evict: Callable[[str], None] | None = None):
        self.max_adapters = check_max_adapters(max_adapters)
        self._evict = evict
        self._lock = threading.RLock()
        self._order: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._holds: Counter[str] = Counter()  # in-flight holds per name
        self._pins: set[str] = set()  # permanent pins
        self._local = threading.local()  # per thread: depth of nested `loading` blocks (they count once)
        self.counters = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_seconds": 0.0}

    # ------------------------------------------------------------------ what is resident
    @property
    def resident(self) -> list[str]:
        """Resident names, least recently used first."""
        with self._lock:
            return list(self._order)

    def lookup(self, name: str) -> bool:
        """Count a request for `name`: a hit (and a use) when resident, else a miss."""
        with self._lock:
            hit = name in self._order
            self.counters["hits" if hit else "misses"] += 1
            if hit:
                self._order.move_to_end(name)
            return hit

    def touch(self, names: Iterable[str]) -> None:
        """Mark resident `names` as just used (no counter moves)."""
        with self._lock:
            for n in names:
                if n in self._order:
                    self._order.move_to_end(n)

    def added(self, name: str) -> None:
        """`name` is now resident (the most recently used)."""
        with self._lock:
            self._order[name] = None
            self._order.move_to_end(name)

    def forget(self, name: str) -> None:
        """`name` is no longer resident (unloaded by anyone)."""
        with self._lock:
            self._order.pop(name, None)

    # ------------------------------------------------------------------ holds
    def acquire(self, names: Iterable[str]) -> None:
        """Hold `names` for a running row or batch: none of them is evicted until `release`."""
        with self._lock:
            self._holds.update(names)

    def release(self, names: Iterable[str]) -> None:
        """Give back holds taken by `acquire` (one per name given)."""
        with self._lock:
            for n in names:
                if self._holds[n] <= 1:
                    self._holds.pop(n, None)
                else:
                    self._holds[n] -= 1

    @contextmanager
    def holding(self, names: Iterable[str]) -> Iterator[None]:
        """`acquire(names)` for the duration of the block."""
        names = list(names)
        self.acquire(names)
        try:
            yield
        finally:
            self.release(names)

    def pin(self, name: str) -> None:
        """Never evict `name` until `unpin(name)` (preloaded adapters, a router's adapters)."""
        with self._lock:
            self._pins.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pins.discard(name)

    @property
    def pinned(self) -> set[str]:
        """Names with a permanent pin."""
        with self._lock:
            return set(self._pins)

    def is_held(self, name: str) -> bool:
        """Whether `name` may not be evicted now (pinned or in flight)."""
        with self._lock:
            return name in self._pins or self._holds[name] > 0

    # ------------------------------------------------------------------ room for one more
    def make_room(self, name: str) -> list[str]:
        """Evict least recently used unheld adapters until `name` fits; returns the evicted names.

        Call it holding the engine's lock (the engine's `add_adapter` does): `evict` takes that
        lock too, and the engine lock is always taken before this object's.

        Raises:
            AdapterSlotsFullError: the engine is full and every resident adapter is held.
        """
        evicted: list[str] = []
        with self._lock:
            if self.max_adapters is None or name in self._order:
                return evicted
            while len(self._order) >= self.max_adapters:
                victim = next((n for n in self._order if not self.is_held(n)), None)
                if victim is None:
                    raise AdapterSlotsFullError(self._full_message(name))
                if self._evict is None:
                    raise AdapterSlotsFullError(f"cannot load adapter {name!r}: {self.max_adapters} adapters are "
                                                f"resident and this residency has no way to evict one")
                self._evict(victim)  # calls forget(victim)
                self._order.pop(victim, None)
                self.counters["evictions"] += 1
                evicted.append(victim)
        return evicted

    def _full_message(self, name: str) -> str:
        pinned = sum(1 for n in self._order if n in self._pins)
        why = f" ({pinned} of them pinned: preloaded adapters or the router's)" if pinned else ""
        return (f"cannot load adapter {name!r}: all {self.max_adapters} adapter slots are in use by running "
                f"requests{why}; raise the adapter limit (now {self.max_adapters}) or retry when they finish")

    @contextmanager
    def loading(self, name: str) -> Iterator[None]:
        """Time one load of `name` and count it when the block succeeds (nested blocks count once)."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        t0 = time.perf_counter()
        try:
            yield
            if depth == 0:
                with self._lock:
                    self.counters["loads"] += 1
                    self.counters["load_seconds"] += time.perf_counter() - t0
        finally:
            self._local.depth = depth

    # ------------------------------------------------------------------ counters
    def stats(self) -> dict[str, Any]:
        """hits, misses, loads, evictions, load_seconds, resident, max_adapters, pinned, in_flight."""
        with self._lock:
            return {**self.counters, "resident": len(self._order), "max_adapters": self.max_adapters,
                    "pinned": len(self._pins), "in_flight": sum(1 for c in self._holds.values() if c > 0)}


__all__ = ["AdapterSlotsFullError", "MAX_DEFAULT_ADAPTERS", "MEMORY_SHARE", "MIN_DEFAULT_ADAPTERS",
           "NOMINAL_ADAPTER_BYTES", "Residency", "available_memory_bytes", "check_max_adapters",
           "default_max_adapters"]
