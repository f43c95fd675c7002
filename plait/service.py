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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from registry.errors import BadInputError, IntegrityError, NotFoundError
from registry.names import parse_ref


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

        return Routing.blend([(a["ref"], a["weight"]) for a in self.adapters])

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "domain": self.domain, "adapters": self.adapters}
        if self.scores is not None:
            d["scores"], d["confidence"] = self.scores, self.confidence
        return d


class RoutedModel:
    """The base model with every registered adapter a request may need, and the router.

    Args:
        workspace: a `plait.Workspace`.
        router: router kind to use (default: the workspace's; see `routing.routers`).
        alias: the alias served for a routed domain when it exists.
        quantize_4bit: hold the base in 4-bit NF4 instead of full precision.
    """

    def __init__(self, workspace, *, router: str | None = None, alias: str = "production",
                 quantize_4bit: bool = False, engine=None):
        from routing.engine import CompositionEngine
        from routing.routers import get_router_class

        self.ws = workspace
        self.registry = workspace.registry
        self.router_kind = router or workspace.router_kind
        get_router_class(self.router_kind)  # an unknown kind is refused before the base loads
        self.alias = alias
        self.engine = engine or CompositionEngine.from_base(workspace.config.base_model, quantize_4bit=quantize_4bit)
        self.router = None
        self.router_info = None
        self._lock = threading.RLock()
        self.refresh()

    # ----------------------------------------------------------------- registry sync
    def refresh(self) -> bool:
        """Load the newest version of the router if it changed; returns whether it did."""
        from routing.routers import load_router, read_files

        try:
            info = self.registry.get_router(self.router_kind)
        except NotFoundError:
            return False
        if self.router_info is not None and info.id == self.router_info.id:
            return False
        router = load_router(read_files(self.registry.router_path(info)), **self._router_runtime(info.kind))
        with self._lock:
            self.router, self.router_info = router, info
        return True

    def _router_runtime(self, kind: str) -> dict[str, Any]:
        if kind == "perplexity":
            return {"scorer": self.engine}
        if kind == "arrow":
            return {"model": self.engine.model, "tokenizer": self.engine.tokenizer}
        return {}

    def ensure_adapter(self, ref: str, *, allow_archived: bool = False) -> str:
        """Load the version `ref` resolves to now (hash-checked) and return its exact ref.

        Args:
            allow_archived: load an archived version too (the audit re-measuring past
                stages); serving refuses them, even when one is still loaded.

        Raises:
            ConflictError: the version is archived and `allow_archived` is False.
            IntegrityError: its files fail their checks or cannot be loaded as safetensors.
        """
        from safetensors import SafetensorError

        from registry.hashing import check_safetensors_folder

        info = self.registry.get_version(ref)
        with self._lock:
            if info.ref in self.engine.adapters and (allow_archived or info.status == "ready"):
                return info.ref
            info, path = self.registry.artifact_path(info, allow_archived=allow_archived)
            check_safetensors_folder(path, f"adapter version {info.ref}")
            try:
                self.engine.add_adapter(info.ref, path, kind=info.kind, fingerprint=info.base_fingerprint)
            except SafetensorError as e:  # stored data that does not load is an integrity failure, not a crash
                raise IntegrityError(f"adapter version {info.ref} could not be loaded ({e}); restore its files "
                                     f"or archive it") from None
        return info.ref

    def _serving_ref(self, router_ref: str) -> str:
        name = parse_ref(router_ref).name
        try:
            return self.ensure_adapter(f"{name}@{self.alias}")
        except NotFoundError:
            return self.ensure_adapter(router_ref)

    # ----------------------------------------------------------------- decisions
    def decide(self, texts: list[str], model: str = "auto", top_k: int = 1) -> list[Served]:
        """How each input is served under `model` (auto, base, or an adapter reference)."""
        if model == "base":
            return [Served("base", None) for _ in texts]
        if model != "auto":
            exact = self.ensure_adapter(model)
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
            adapters = [{"ref": self._serving_ref(a.ref), "domain": a.domain, "weight": a.weight} for a in d.adapters]
            out.append(Served("auto", d.domain, adapters, d.scores, d.confidence))
        return out

    def route(self, texts: list[str], top_k: int = 1) -> list[Served]:
        return self.decide(texts, "auto", top_k)

    def generate(self, texts: list[str], model: str = "auto", *, top_k: int = 1, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False) -> list[tuple[str, Served]]:
        """Generate for every input in one mixed-adapter batch; returns (text, how served) pairs."""
        served = self.decide(texts, model, top_k)
        with self._lock:
            outs = self.engine.generate(texts, [s.routing() for s in served], max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                                        chat=chat)
        return list(zip(outs, served))

    def loss(self, texts: list[str], served: list[Served], completions: list[str] | None = None):
        """Per-row mean token loss under each row's serving decision."""
        with self._lock:
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


__all__ = ["RoutedModel", "Served", "check_model_name"]
