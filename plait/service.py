"""The routed model of a workspace: one engine, the current router, adapters from the registry.

`RoutedModel` is what `plait route`, `plait generate`, the audit and `plait serve` use. It
holds one `CompositionEngine` (one copy of the base), loads adapters into it from the
registry on demand (every load hash-checked, every adapter checked against the base
fingerprint), and keeps the router in step with the registry: `refresh()` picks up a newer
router version, and every request resolves adapter references again, so a version
registered or an alias moved while a server runs is served from the next request on.

How `model` strings map to routings (the server's `model` field, `plait generate --model`):

    auto            the router decides per input (top-k blend; below its threshold, the base)
    base            the base model alone
    NAME[:V|@A]     that adapter version for every input

When the router picks a domain, the adapter it serves is the version its alias (default
`production`) points at if that alias exists, else the exact version the router was fitted
with. An adapter that fails its hash check is refused; other requests go on being served.

Residency: the engine holds at most `max_adapters` adapters (default: sized for the machine,
`routing.residency.default_max_adapters`); a request for another one loads it from the
registry, evicting the least recently used adapter no running row holds. A caller that decodes
with adapters holds them for the time it decodes, so that no load in between evicts them:

    with routed.using(["law", "news:2"]) as refs:      # loaded (hash-checked) and held
        routed.engine.generate(texts, [Routing.one(r) for r in refs])

or `refs = routed.acquire([...])` ... `routed.release(refs)` when the hold spans calls (a
continuous batcher: acquire when a row joins, release when it leaves), or
`served = routed.decide(texts, model, hold=True)` ... `routed.release(held_refs(served))`.
`--preload REF,...` adapters (an alias reference follows its alias) and the adapters a router
needs resident (`needs_all_adapters`: perplexity) are pinned and never evicted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.names import parse_ref

log = logging.getLogger("plait.service")


@dataclass
class Served:
    """How one input was (or will be) served."""

    model: str
    domain: str | None
    adapters: list[dict[str, Any]] = field(default_factory=list)  # [{ref, domain, weight}]
    scores: dict[str, float] | None = None
    confidence: float | None = None

    def routing(self):
        from routing.engine import Routing

        return Routing.merged([(a["ref"], a["weight"]) for a in self.adapters])

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "domain": self.domain, "adapters": self.adapters}
        if self.scores is not None:
            d["scores"], d["confidence"] = dict(self.scores), self.confidence
        return d


def held_refs(served: Iterable[Served]) -> list[str]:
    """The refs `decide(..., hold=True)` acquired for `served`: one per adapter entry of each row."""
    return [a["ref"] for s in served for a in s.adapters]


class RoutedModel:
    """The base model with every registered adapter a request may need, and the router.

    Args:
        workspace: a `plait.Workspace`.
        router: router kind to use (default: the workspace's; see `routing.routers`).
        alias: the alias served for a routed domain when it exists.
        quantize_4bit: hold the base in 4-bit NF4 instead of full precision.
        engine: a loaded `CompositionEngine` to use instead of loading the workspace's base.
        max_adapters: most adapters loaded at once (`plait serve --max-adapters`); None: the
            engine's own limit when it has one, else `routing.residency.default_max_adapters`
            for the largest registered adapter.
        preload: adapter references loaded at start and pinned (`--preload`); an alias
            reference (`law@production`) pins the version the alias points at, and the pin
            follows the alias when it moves.

    Raises:
        BadInputError: `max_adapters` is not a positive integer, or the pinned adapters (the
            preloads plus those the router needs resident) do not fit in it.
    """

    def __init__(self, workspace, *, router: str | None = None, alias: str = "production",
                 quantize_4bit: bool = False, engine=None, max_adapters: int | None = None,
                 preload: Sequence[str] = ()):
        from routing.engine import CompositionEngine
        from routing.residency import check_max_adapters
        from routing.routers import get_router_class

        self.ws = workspace
        self.registry = workspace.registry
        self.router_kind = router or workspace.router_kind
        get_router_class(self.router_kind)  # an unknown kind is refused before the base loads
        check_max_adapters(max_adapters)
        self.preload = [check_model_name(r) for r in preload]
        for r in self.preload:
            if r in ("auto", "base"):
                raise BadInputError(f"--preload {r!r} is not an adapter reference; give NAME, NAME:V or NAME@ALIAS")
        self.alias = alias
        self.engine = engine or CompositionEngine.from_base(workspace.config.base_model, quantize_4bit=quantize_4bit)
        if max_adapters is not None or self.engine.residency.max_adapters is None:
            self.engine.residency.max_adapters = max_adapters or self._default_max_adapters()
        self.router = None
        self.router_info = None
        self._lock = threading.RLock()
        self._pins: dict[str, str] = {}  # what pinned it ("preload:REF", "router:REF") -> exact ref
        self._exact_refs: dict[str, str] = {}  # NAME:V references resolved once
        self.refresh()  # also pins (and loads) the preloads

    @property
    def max_adapters(self) -> int | None:
        """Most adapters the engine holds at once."""
        return self.engine.residency.max_adapters

    def _default_max_adapters(self) -> int:
        from routing.residency import default_max_adapters

        return default_max_adapters(self.registry.largest_version_bytes())

    def residency_stats(self) -> dict[str, Any]:
        """Residency counters: hits, misses, loads, evictions, load_seconds, resident, max_adapters,
        pinned, in_flight (see `routing.residency`)."""
        return self.engine.residency.stats()

    # ----------------------------------------------------------------- registry sync
    def refresh(self) -> bool:
        """Load the newest version of the router if it changed; returns whether it did.

        Also moves the pins of alias preloads whose alias moved (`sync_pins`).

        Raises:
            BadInputError: the new router needs more adapters resident than `max_adapters`
                allows (the router in use is kept).
        """
        from routing.routers import load_router, read_files

        try:
            info = self.registry.get_router(self.router_kind)
        except NotFoundError:
            self.sync_pins()
            return False
        if self.router_info is not None and info.id == self.router_info.id:
            self.sync_pins()
            return False
        router = load_router(read_files(self.registry.router_path(info)), **self._router_runtime(info.kind))
        with self._lock:
            self.sync_pins(router)  # refuses a router that cannot fit before it is used
            self.router, self.router_info = router, info
        return True

    # ----------------------------------------------------------------- residency
    def sync_pins(self, router: Any = None) -> None:
        """Pin (and load) the preloads and the adapters `router` (default: the current one) needs resident.

        A pin no longer wanted (an alias that moved, a router replaced) is dropped; the adapter
        stays loaded until evicted like any other. Exact refs are resolved once; an alias or a
        bare name costs one registry query per call (the batcher calls this once per batch).

        Raises:
            BadInputError: the pins do not fit in `max_adapters`, or a preload names no version.
        """
        with self._lock:
            router = router if router is not None else self.router
            wanted = {f"preload:{r}": self._resolve_pin(r, preload=True) for r in self.preload}
            needed = list(router.resident_adapters()) if getattr(router, "needs_all_adapters", False) else []
            for name in needed:
                exact = self._resolve_pin(name, preload=False)
                if exact is not None:
                    wanted[f"router:{name}"] = exact
            self._check_pins_fit(router, needed, set(wanted.values()))
            res = self.engine.residency
            for exact in set(self._pins.values()) - set(wanted.values()):
                res.unpin(exact)
            for exact in wanted.values():
                res.pin(exact)
            self._pins = wanted
            for exact in dict.fromkeys(wanted.values()):
                if exact not in self.engine.adapters:
                    self.ensure_adapter(exact, count=False)

    def _resolve_pin(self, ref: str, *, preload: bool) -> str | None:
        """The exact version `ref` names now; a router adapter the registry lacks is skipped (None)."""
        exact = self._exact_refs.get(ref)
        if exact is not None:  # NAME:V never moves: resolved once
            return exact
        try:
            exact = self.registry.get_version(ref).ref
        except NotFoundError:
            if preload:
                raise BadInputError(f"--preload {ref}: no such adapter version; give NAME, NAME:V or NAME@ALIAS "
                                    f"of a registered adapter") from None
            log.warning("the router needs adapter %r, which the registry does not know; it is not pinned", ref)
            return None
        if parse_ref(ref).version is not None:
            self._exact_refs[ref] = exact
        return exact

    def _check_pins_fit(self, router: Any, needed: list[str], pinned: set[str]) -> None:
        limit = self.engine.residency.max_adapters
        if limit is None or len(pinned) <= limit:
            return
        if len(set(needed)) > limit:
            raise BadInputError(f"the {router.kind} router needs all {len(set(needed))} of its adapters resident, "
                                f"but --max-adapters is {limit}; give --max-adapters {len(pinned)} or more")
        if not needed:
            raise BadInputError(f"--preload names {len(pinned)} adapters, but --max-adapters is {limit}; give "
                                f"--max-adapters {len(pinned)} or more, or preload fewer")
        raise BadInputError(f"--preload and the {router.kind} router pin {len(pinned)} adapters, but --max-adapters "
                            f"is {limit}; give --max-adapters {len(pinned)} or more, or preload fewer")

    def _router_runtime(self, kind: str) -> dict[str, Any]:
        if kind == "perplexity":
            return {"scorer": self.engine}
        if kind == "arrow":
            return {"model": self.engine.model, "tokenizer": self.engine.tokenizer}
        return {}

    def ensure_adapter(self, ref: str, *, allow_archived: bool = False, hold: bool = False,
                       count: bool = True) -> str:
        """Load the version `ref` resolves to now (hash-checked) and return its exact ref.

        When `max_adapters` are loaded, loading another evicts the least recently used one
        that is neither held nor pinned.

        Args:
            allow_archived: load an archived version too (the audit re-measuring past
                stages); serving refuses them, even when one is still loaded.
            hold: also hold the version for a running row (taken before it loads, so no
                load in between evicts it); give it back with `release([exact ref])`.
            count: count the lookup as a residency hit or miss (False for loads of pins).

        Raises:
            ConflictError: the version is archived and `allow_archived` is False.
            IntegrityError: its files fail their checks or cannot be loaded as safetensors.
            AdapterSlotsFullError: it is not loaded and every loaded adapter is held.
        """
        info = self.registry.get_version(ref)
        res = self.engine.residency
        with self._lock:
            if hold:
                res.acquire([info.ref])
            try:
                if info.ref in self.engine.adapters and (allow_archived or info.status == "ready"):
                    if count:
                        res.lookup(info.ref)
                    return info.ref
                if count:
                    res.lookup(info.ref)
                self._load(info, allow_archived)
            except BaseException:
                if hold:
                    res.release([info.ref])
                raise
        return info.ref

    def _load(self, info, allow_archived: bool) -> None:
        from safetensors import SafetensorError

        from registry.hashing import check_safetensors_folder

        with self.engine.residency.loading(info.ref):  # the hash check counts in the load time
            info, path = self.registry.artifact_path(info, allow_archived=allow_archived)
            check_safetensors_folder(path, f"adapter version {info.ref}")
            try:
                self.engine.add_adapter(info.ref, path, kind=info.kind, fingerprint=info.base_fingerprint)
            except SafetensorError as e:  # stored data that does not load is an integrity failure, not a crash
                raise IntegrityError(f"adapter version {info.ref} could not be loaded ({e}); restore its files "
                                     f"or archive it") from None

    def acquire(self, refs: Iterable[str], *, allow_archived: bool = False) -> list[str]:
        """Load (hash-checked) and hold adapters for a running row or batch; pair with `release`.

        Args:
            refs: adapter references (NAME, NAME:V, NAME@ALIAS), each held once.

        Returns:
            The exact refs, in order: what to route with and what to `release`.

        Raises:
            AdapterSlotsFullError: one does not fit (nothing stays held then); and as `ensure_adapter`.
        """
        exact: list[str] = []
        try:
            for r in refs:
                exact.append(self.ensure_adapter(r, allow_archived=allow_archived, hold=True))
        except BaseException:
            self.release(exact)
            raise
        return exact

    def release(self, exact_refs: Iterable[str]) -> None:
        """Give back holds taken by `acquire`, `ensure_adapter(hold=True)` or `decide(hold=True)`."""
        self.engine.residency.release(exact_refs)

    @contextmanager
    def using(self, refs: Iterable[str], *, allow_archived: bool = False) -> Iterator[list[str]]:
        """`acquire(refs)` for the block; yields the exact refs."""
        exact = self.acquire(refs, allow_archived=allow_archived)
        try:
            yield exact
        finally:
            self.release(exact)

    def _serving_ref(self, router_ref: str, hold: bool = False) -> str:
        name = parse_ref(router_ref).name
        try:
            return self.ensure_adapter(f"{name}@{self.alias}", hold=hold)
        except NotFoundError:
            return self.ensure_adapter(router_ref, hold=hold)

    # ----------------------------------------------------------------- decisions
    def decide(self, texts: list[str], model: str = "auto", top_k: int = 1, *, hold: bool = False) -> list[Served]:
        """How each input is served under `model` (auto, base, or an adapter reference).

        Args:
            hold: hold every adapter entry of every row (loaded and held in one step, so
                deciding later rows cannot evict earlier rows' adapters); give them back with
                `release(held_refs(served))` once decoded. On an error nothing stays held.
        """
        if model == "base":
            return [Served("base", None) for _ in texts]
        if not hold:
            return self._decide(texts, model, top_k, None)
        held: list[str] = []
        try:
            return self._decide(texts, model, top_k, held)
        except BaseException:
            self.release(held)
            raise

    def _decide(self, texts: list[str], model: str, top_k: int, held: list[str] | None) -> list[Served]:
        """`decide`; with `held` a list, every adapter entry is held and its ref appended there."""
        hold = held is not None
        if model != "auto":
            exact = self.ensure_adapter(model, hold=hold)
            if hold:  # one hold per row, as `held_refs` gives them back
                held.append(exact)
                self.engine.residency.acquire([exact] * (len(texts) - 1))
                held.extend([exact] * (len(texts) - 1))
            info = self.registry.get_version(exact)
            return [Served(model, info.domain, [{"ref": exact, "domain": info.domain, "weight": 1.0}])
                    for _ in texts]
        if self.router is None:
            kinds = sorted({r.name for r in self.registry.search_routers()})
            if kinds:
                raise NotFoundError(f"this workspace has no {self.router_kind!r} router; it has "
                                    f"{', '.join(kinds)}: use --router {kinds[0]} (routers are fitted as domains "
                                    f"are trained, for the workspace's router kind)")
            raise NotFoundError("this workspace has no router yet: train a domain first (plait train)")
        out = []
        for d in self.router.route(texts, top_k=top_k):
            adapters = []
            for a in d.adapters:
                ref = self._serving_ref(a.ref, hold)
                if hold:
                    held.append(ref)
                adapters.append({"ref": ref, "domain": a.domain, "weight": a.weight})
            out.append(Served("auto", d.domain, adapters, d.scores, d.confidence))
        return out

    def route(self, texts: list[str], top_k: int = 1) -> list[Served]:
        return self.decide(texts, "auto", top_k)

    def generate(self, texts: list[str], model: str = "auto", *, top_k: int = 1, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False) -> list[tuple[str, Served]]:
        """Generate for every input in one mixed-adapter batch; returns (text, how served) pairs."""
        served = self.decide(texts, model, top_k, hold=True)
        try:
            with self._lock:
                outs = self.engine.generate(texts, [s.routing() for s in served], max_new_tokens=max_new_tokens,
                                            do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                                            chat=chat)
        finally:
            self.release(held_refs(served))
        return list(zip(outs, served))

    def loss(self, texts: list[str], served: list[Served], completions: list[str] | None = None):
        """Per-row mean token loss under each row's serving decision (its adapters loaded again if evicted)."""
        with self._lock, self.using(dict.fromkeys(held_refs(served))):
            return self.engine.loss(texts, [s.routing() for s in served], completions=completions)


def check_model_name(model: str) -> str:
    """Validate a `model` string: auto, base or an adapter reference."""
    if model in ("auto", "base"):
        return model
    try:
        parse_ref(model)
    except BadInputError:
        raise BadInputError(f"model {model!r} is not auto, base or an adapter reference (NAME, NAME:3, NAME@alias)"
                            ) from None
    return model


__all__ = ["RoutedModel", "Served", "check_model_name", "held_refs"]
