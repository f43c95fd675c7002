"""The continual loop: add a domain = train -> register -> freeze its eval and validation
sets -> update the router -> re-point the domains the new version serves better.

(The forgetting audit then runs over every domain; see `plait.audit`.) Nothing here touches
an earlier adapter or the base: the trainer only creates a new version, and the router's
`add_domain` only adds the new domain's state. Every step leaves a record in the registry:
the adapter version (with lineage and metrics), the domain's frozen evaluation and
validation sets, and a new router version bound to the exact adapter versions it routes
between, with its held-out routing accuracy and confusion matrix.

Backward transfer: a later version may serve an earlier domain better than that domain's own
adapter. After each real version, `repoint_domains` measures it on every other domain's
validation split (`ValidationLosses`, each figure once, stored as a metric) and moves the
domains it improves by more than the workspace's `repoint_margin` in a new router version.
The eval split is never read here: it stays an honest test for the audit.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait._runtime import fewer_gc_passes
from plait.audit import run_audit
from plait.datasets import AUDIT_CONTROL, CALIBRATION_CONTROL  # noqa: F401 - AUDIT_CONTROL: re-exported
from registry.errors import BadInputError, NotFoundError, StaleRouterError
from registry.names import BASELINE_DOMAIN
from routing.routers import ROUTER_TEXT_CHARS, router_runtime, row_input  # noqa: F401 - re-exported
from training.data import VALIDATION_MAX_ROWS

#: how many training texts of a domain the router learns from (prototypes and word counts have a
#: fixed size whatever the number; the embedding router's kNN bank keeps one vector per text)
ROUTER_TEXTS_PER_DOMAIN = 1024
#: at most this many domains' validation rows calibrate and judge each router update (`calibration_domains`)
CALIBRATION_MAX_DOMAINS = 256


@dataclass
class AddDomainResult:
    train: Any  # training.trainer.TrainResult
    router: Any  # registry.client.RouterInfo: the newest router version after this domain
    audit: Any = None  # plait.audit.AuditResult
    repointed: list = field(default_factory=list)  # [Repoint]: domains whose serving version changed
    validation_seconds: float = 0.0  # time spent measuring validation losses for re-pointing

    def summary(self) -> dict[str, Any]:
        out = {"train": self.train.summary(), "router": self.router.to_dict(),
               "repointed": [m.to_dict() for m in self.repointed], "validation_seconds": self.validation_seconds}
        if self.audit is not None:
            out["audit"] = self.audit.summary()
        return out


def heldout_texts(reg, domain: str) -> tuple[list[str], str]:
    """The texts a router is calibrated and judged on for `domain`, and where they came from.

    The domain's frozen validation split; a domain made before validation splits existed
    (schema 1) falls back to its stored training rows (never to the eval split, which only
    the audit reads) until it is trained again.
    """
    for split in ("validation", "train"):
        try:
            rows = reg.get_domain_rows(domain, split)
        except NotFoundError:
            continue
        return [row_input(r) for r in rows[:VALIDATION_MAX_ROWS]], split
    return [], "none"


def calibration_domains(domains: list[str]) -> list[str]:
    """The domains a router update calibrates and judges the router on: every domain up to
    `CALIBRATION_MAX_DOMAINS`; above that, the ones whose names hash lowest (sha256), a fixed
    sample on every machine that changes little as domains arrive. The threshold is one number
    on the best cosine, which a few hundred domains' validation rows pin down as well as
    thousands do; reading and scoring every domain's rows made each update grow with the
    square of the domains (issue 16)."""
    import hashlib

    if len(domains) <= CALIBRATION_MAX_DOMAINS:
        return list(domains)
    ranked = sorted(domains, key=lambda d: hashlib.sha256(d.encode()).hexdigest())[:CALIBRATION_MAX_DOMAINS]
    keep = set(ranked)
    return [d for d in domains if d in keep]


def _heldout_sets(reg, domains: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """`heldout_texts` of every domain: ({domain: texts}, {domain: split}), the validation sets
    read with one registry query (issue 16: not one per domain); the few without one fall back
    one by one."""
    validation = reg.get_many_domain_rows(list(domains), "validation")
    heldout, sources = {}, {}
    for d in domains:
        if d in validation:
            texts, sources[d] = [row_input(r) for r in validation[d][:VALIDATION_MAX_ROWS]], "validation"
        else:
            texts, sources[d] = heldout_texts(reg, d)
        if texts:
            heldout[d] = texts
    return heldout, sources


def update_router(ws, domain: str, train_texts: list[str], ref: str, *, kind: str | None = None,
                  engine=None) -> Any:
    """Add `domain` (served by adapter version `ref`) to the newest router and register the result.

    The other domains' router state is loaded as stored and left as it is; the threshold is
    calibrated again over every domain's frozen validation set (`heldout_texts`) and the
    calibration control texts, and the held-out accuracy is measured on the same sets.
    Concurrent jobs each adding a domain all land (`change_router`).

    Returns:
        the new router version (`registry.client.RouterInfo`).
    """
    reg = ws.registry
    kind = kind or ws.router_kind

    def apply(router) -> dict:  # runs again on the newest router when another writer registered first
        if domain in router.domains:  # a new version of a known domain: same routing state, new target
            router.set_ref(domain, ref)
        else:
            info, path = reg.artifact_path(ref)
            data = {"perplexity": ref, "arrow": path}.get(kind, train_texts[:ROUTER_TEXTS_PER_DOMAIN])
            if kind == "perplexity":
                engine.add_adapter(ref, path, kind=info.kind, fingerprint=info.base_fingerprint) \
                    if ref not in engine.adapters else None
            router.add_domain(domain, data, ref=ref)
        return {}

    return change_router(ws, apply, kind=kind, engine=engine)


# ----------------------------------------------------------------------------- router compare-and-swap
#: how many times a router change is rebuilt on a newer version before giving up; each lost race
#: means another writer's change landed, so N concurrent writers need at most N - 1 retries
ROUTER_CHANGE_ATTEMPTS = 16


def change_router(ws, apply: Callable[[Any], dict | None], *, kind: str | None = None, engine=None) -> Any:
    """Apply one change to the newest router and register it against the version it was built from.

    `apply(router)` edits a loaded router in place (add a domain, point a domain at another
    version) and returns metrics to record beside the calibration, or None when it changed
    nothing (then nothing is registered and the newest version is returned). The registry refuses the new version when another writer registered one since
    the load (`StaleRouterError`, checked inside its write transaction); then the newest version
    is loaded again and `apply` runs again on it, so concurrent changes (independent `plait
    train` jobs) all land and no version drops a domain its parent covers. After `apply` the
    threshold is calibrated again over every domain's frozen validation set (`heldout_texts`;
    above `CALIBRATION_MAX_DOMAINS` domains, a fixed sample of them: `calibration_domains`) and
    the calibration control texts, and the held-out accuracy is measured on the same sets.

    Args:
        ws: the `plait.Workspace`.
        apply: the change; it must be safe to run again on a fresh router.
        kind: the router kind (default: the workspace's).
        engine: the loaded base, for the routers that score with it (perplexity, arrow).

    Returns:
        the new router version (`registry.client.RouterInfo`).

    Raises:
        StaleRouterError: other writers got in first `ROUTER_CHANGE_ATTEMPTS` times in a row.
    """
    reg = ws.registry
    kind = kind or ws.router_kind
    runtime = router_runtime(kind, engine)
    with fewer_gc_passes():
        return _change_router(reg, kind, runtime, apply)


def _change_router(reg, kind: str, runtime: dict, apply: Callable[[Any], dict | None]) -> Any:
    """`change_router`'s load, apply, calibrate, register and retry loop."""
    from routing.routers import get_router_class, load_router, read_files
    from routing.routers._features import cached_embeddings

    for attempt in range(1, ROUTER_CHANGE_ATTEMPTS + 1):
        try:
            current = reg.get_router(kind)
            router, parent = load_router(read_files(reg.router_path(current)), **runtime), current.version
        except NotFoundError:
            current, router, parent = None, get_router_class(kind)(**runtime), 0
        extra = apply(router)
        if extra is None:
            return current
        heldout, sources = _heldout_sets(reg, calibration_domains(router.domains))
        # the held-out texts are frozen: their embeddings are cached by content hash, so only the
        # new domain's rows are encoded (routing.routers._features)
        with cached_embeddings():
            calibration = router.calibrate(heldout, list(CALIBRATION_CONTROL))
            heldout_metrics = router.evaluate(heldout, reuse_calibration=True)  # scored once, by calibrate
            metrics = {"calibration": calibration.to_dict(), "heldout": heldout_metrics,
                       "heldout_split": sources, "heldout_domains": f"{len(sources)} of {len(router.domains)}",
                       **extra}
        try:
            return reg.register_router(kind, kind=kind, files=router.to_files(),
                                       covers=[router.refs[d] for d in router.domains], metrics=metrics,
                                       parent_version=parent)
        except StaleRouterError:
            if attempt == ROUTER_CHANGE_ATTEMPTS:
                raise
            time.sleep(random.uniform(0, 0.02 * attempt))  # let the writers that collided spread out
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- backward transfer
@dataclass
class Repoint:
    """One domain moved to another adapter version because its validation loss dropped."""

    domain: str
    old_ref: str
    new_ref: str
    old_loss: float
    new_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"re-pointed {self.domain}: {self.old_ref} -> {self.new_ref}, validation loss "
                f"{self.old_loss:.4f} -> {self.new_loss:.4f}")


def can_serve_others(info) -> bool:
    """Whether version `info` may be re-pointed to: a real domain's trained version, never a
    baseline of the audit (domain `plait-baselines`) nor an imported adapter."""
    return info.domain != BASELINE_DOMAIN and not any(p.get("relation") == "import" for p in info.parents)


class ValidationLosses:
    """Each (version, domain) validation loss, measured once and stored as a metric.

    The metric is `validation_loss@<max_length>` (eval_domain = the domain) on the version:
    mean token loss (nats) over the domain's frozen validation rows, texts cut at
    `max_length` tokens (the training length of the run that asks), measured with the
    workspace's composition engine. A figure already stored is read, never measured again.
    """

    def __init__(self, ws, max_length: int):
        self.ws, self.reg, self.max_length = ws, ws.registry, max_length
        self.name = f"validation_loss@{max_length}"
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.measured = 0  # figures computed (not read) by this object
        self.seconds = 0.0

    def has_split(self, domain: str) -> bool:
        return bool(self._rows(domain))

    def _rows(self, domain: str) -> list[dict[str, Any]]:
        if domain not in self.rows:
            try:
                self.rows[domain] = self.reg.get_domain_rows(domain, "validation")
            except NotFoundError:
                self.rows[domain] = []
        return self.rows[domain]

    def __call__(self, ref: str, domain: str) -> float:
        for m in reversed(self.reg.get_metrics(ref)):
            if m["name"] == self.name and m["eval_domain"] == domain:
                return m["value"]
        t0 = time.perf_counter()
        rows = self._rows(domain)
        prompts = all(r.get("prompt") is not None and r.get("completion") is not None for r in rows)
        texts = [r["prompt"] if prompts else (r.get("text") or r.get("prompt", "")) for r in rows]
        completions = [r["completion"] for r in rows] if prompts else None
        rm = self.ws.routed_model
        from routing.engine import Routing

        with rm._lock:
            exact = rm.ensure_adapter(ref)
            kept, rm.engine.max_length = rm.engine.max_length, self.max_length
            try:
                value = float(rm.engine.loss(texts, Routing.one(exact), completions=completions).mean())
            finally:
                rm.engine.max_length = kept
        self.reg.log_metrics(ref, {self.name: value}, eval_domain=domain)
        self.measured += 1
        self.seconds += time.perf_counter() - t0
        return value


def choose_own_target(domain: str, new_ref: str, served: str | None, losses: ValidationLosses,
                      margin: float) -> tuple[str, Repoint | None]:
    """On a retrain: the version `domain` is served by next.

    Its newest own version (of any of the domain's adapters) replaces the old target, as it
    always has, unless the router serves the domain with another domain's version (`served`,
    re-pointed earlier) that is better on the domain's validation split by more than
    `margin`: then that one stays.

    Returns:
        the ref to serve, and the `Repoint` when the other version was kept.
    """
    if served is None or not losses.has_split(domain):
        return new_ref, None
    try:
        if losses.reg.get_version(served).domain == domain:
            return new_ref, None
    except NotFoundError:  # the served version is gone (archived): nothing to keep
        return new_ref, None
    own, other = losses(new_ref, domain), losses(served, domain)
    if own - other > margin:
        return served, Repoint(domain, new_ref, served, own, other)
    return new_ref, None


def _load_stored_router(ws, info):
    from routing.routers import load_router, read_files

    engine = ws.routed_model.engine if info.kind in ("perplexity", "arrow") else None
    return load_router(read_files(ws.registry.router_path(info)), **router_runtime(info.kind, engine))


def repoint_domains(ws, router_info, new_info, losses: ValidationLosses, margin: float) -> tuple[Any, list[Repoint]]:
    """Re-point every other domain whose validation loss `new_info` beats by more than `margin`.

    Compares the new version with the version the newest router serves each domain with, on
    that domain's frozen validation split; the domains that improve are moved in one new router
    version (so the move is in the router's history and can be rolled back), registered
    against the version it was built from (`change_router`: a concurrent writer's change is
    kept and the comparison made again on top of it). Returns the router version now newest
    and the moves made.
    """
    if not can_serve_others(new_info):
        return router_info, []
    moves: list[Repoint] = []

    def apply(router) -> dict | None:
        moves.clear()
        for d in router.domains:
            served = router.refs[d]
            if d == new_info.domain or served == new_info.ref or not losses.has_split(d):
                continue
            old, new = losses(served, d), losses(new_info.ref, d)  # each figure measured once, then stored
            if old - new > margin:
                router.set_ref(d, new_info.ref)
                moves.append(Repoint(d, served, new_info.ref, old, new))
        return {"repointed": [m.to_dict() for m in moves], "repoint_margin": margin} if moves else None

    engine = ws.routed_model.engine if router_info.kind in ("perplexity", "arrow") else None
    info = change_router(ws, apply, kind=router_info.kind, engine=engine)
    return info, list(moves)


def add_domain(ws, domain: str, data: str | Path, eval_data: str | Path | None = None, config=None, *,
               audit: bool = True, audit_options: dict[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> AddDomainResult | None:
    """Train `domain`, register it, freeze its eval and validation sets, update the router,
    re-point the domains the new version serves better, then audit.

    In a data-parallel run (`accelerate launch`, `torchrun`) every process trains and rank 0
    alone does the rest; the other ranks return None once the version is registered.

    Args:
        ws: the `plait.Workspace`.
        data / eval_data: the domain's data files (see `training.data`).
        config: a `training.trainer.TrainConfig`.
        audit: run the forgetting audit afterwards.
        log: called with one line per re-pointed domain and the time validation took (None: silent;
            the result's `repointed` holds the moves).
    """
    from training.data import frozen_splits, load_domain_data
    from training.trainer import TrainConfig, train_domain

    config = config or TrainConfig()
    reg = ws.registry
    dd = load_domain_data(data, eval_data, config.eval_fraction, config.validation_fraction,
                          frozen=frozen_splits(reg, domain))
    result = train_domain(reg, ws.config.base_model, domain, dd, config=config)
    if result is None:  # a data-parallel rank other than 0: rank 0 registered the version
        return None
    # the trainer froze the domain's eval and validation rows; keep its first training rows
    # too, so baselines (sequential fine-tuning) can be rebuilt from the registry alone
    try:
        reg.get_domain_rows(domain, "train")
    except NotFoundError:
        reg.set_domain_rows(domain, "train", [r.normalised() for r in dd.train])
    margin = ws.config.repoint_margin
    losses = ValidationLosses(ws, config.max_length)
    try:
        previous = reg.get_router(ws.router_kind)
    except NotFoundError:
        previous = None
    retrain = len(reg.search_versions(domain=domain)) > 1  # only then can the domain be served by another
    served = _load_stored_router(ws, previous).refs.get(domain) if previous is not None and retrain else None
    on = margin != math.inf  # repoint_margin = inf: every domain is served by its own newest version
    target, kept = choose_own_target(domain, result.version.ref, served, losses, margin) if on else \
        (result.version.ref, None)
    router = update_router(ws, domain, [row_input(r) for r in dd.train], target)
    router, moves = repoint_domains(ws, router, result.version, losses, margin) if on else (router, [])
    moves = ([kept] if kept else []) + moves
    for line in [m.line() for m in moves] + ([f"validation: {losses.measured} loss(es) measured in "
                                              f"{losses.seconds:.1f} s"] if losses.measured else []):
        if log:
            log(line)
    out = AddDomainResult(result, router, repointed=moves, validation_seconds=losses.seconds)
    if audit:

        out.audit = run_audit(ws, **(audit_options or {}))
    return out
