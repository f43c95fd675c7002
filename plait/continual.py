"""The continual loop: add a domain = train -> register -> freeze its eval set -> update the router.

(The forgetting audit then runs over every domain; see `plait.audit`.) Nothing here touches
an earlier adapter or the base: the trainer only creates a new version, and the router's
`add_domain` only adds the new domain's state. Every step leaves a record in the registry:
the adapter version (with lineage and metrics), the domain's frozen evaluation set, and a
new router version bound to the exact adapter versions it routes between, with its
held-out routing accuracy and confusion matrix.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.datasets import CONTROL_TEXTS
from registry.errors import BadInputError, NotFoundError, StaleRouterError

#: how many training texts of a domain the router learns from (prototypes and word counts have a
#: fixed size whatever the number; the embedding router's kNN bank keeps one vector per text)
ROUTER_TEXTS_PER_DOMAIN = 1024
#: how much of each text a router sees (the encoders truncate further; word counts use it all)
ROUTER_TEXT_CHARS = 8000
#: the control texts used to calibrate the router's fallback threshold; the audit uses the
#: other half (CONTROL_TEXTS[1::2]), so the threshold is never judged on its own data
CALIBRATION_CONTROL = CONTROL_TEXTS[0::2]
AUDIT_CONTROL = CONTROL_TEXTS[1::2]


def row_input(row: Any, max_chars: int = ROUTER_TEXT_CHARS) -> str:
    """What a router sees of a data row: its text, or its prompt."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k, None)
    return (get("text") or get("prompt") or "")[:max_chars]


def row_dict(row: Any) -> dict[str, str]:
    """A data row as the JSON object stored in a domain's frozen eval set."""
    if isinstance(row, dict):
        return {k: v for k, v in row.items() if k in ("text", "prompt", "completion") and v is not None}
    return {k: getattr(row, k) for k in ("text", "prompt", "completion") if getattr(row, k, None) is not None}


@dataclass
class AddDomainResult:
    train: Any  # training.trainer.TrainResult
    router: Any  # registry.client.RouterInfo
    audit: Any = None  # plait.audit.AuditResult

    def summary(self) -> dict[str, Any]:
        out = {"train": self.train.summary(), "router": self.router.to_dict()}
        if self.audit is not None:
            out["audit"] = self.audit.summary()
        return out


def router_runtime(kind: str, engine=None) -> dict[str, Any]:
    """The live objects a router kind scores with (none for the text routers: hybrid, embedding, lexical)."""
    if kind in ("perplexity", "arrow"):
        if engine is None:
            raise BadInputError(f"the {kind} router needs the base model loaded; use it through plait.RoutedModel")
        return {"scorer": engine} if kind == "perplexity" else {"model": engine.model, "tokenizer": engine.tokenizer}
    return {}


def update_router(ws, domain: str, train_texts: list[str], ref: str, *, kind: str | None = None,
                  engine=None) -> Any:
    """Add `domain` (served by adapter version `ref`) to the newest router and register the result.

    The other domains' router state is loaded as stored and left as it is; the threshold is
    calibrated again over every domain's frozen eval set and the calibration control texts.
    Concurrent jobs each adding a domain all land (`change_router`).

    Returns:
        the new router version (`registry.client.RouterInfo`).
    """
    reg = ws.registry
    kind = kind or ws.router_kind

    def apply(router) -> None:  # runs again on the newest router when another writer registered first
        if domain in router.domains:  # a new version of a known domain: same routing state, new target
            router.set_ref(domain, ref)
        else:
            info, path = reg.artifact_path(ref)
            data = {"perplexity": ref, "arrow": path}.get(kind, train_texts[:ROUTER_TEXTS_PER_DOMAIN])
            if kind == "perplexity":
                engine.add_adapter(ref, path, kind=info.kind, fingerprint=info.base_fingerprint) \
                    if ref not in engine.adapters else None
            router.add_domain(domain, data, ref=ref)

    return change_router(ws, apply, kind=kind, engine=engine)


# ----------------------------------------------------------------------------- router compare-and-swap
#: how many times a router change is rebuilt on a newer version before giving up; each lost race
#: means another writer's change landed, so N concurrent writers need at most N - 1 retries
ROUTER_CHANGE_ATTEMPTS = 16


def change_router(ws, apply: Callable[[Any], None], *, kind: str | None = None, engine=None) -> Any:
    """Apply one change to the newest router and register it against the version it was built from.

    `apply(router)` edits a loaded router in place (add a domain, point a domain at another
    version). The registry refuses the new version when another writer registered one since
    the load (`StaleRouterError`, checked inside its write transaction); then the newest version
    is loaded again and `apply` runs again on it, so concurrent changes (independent `plait
    train` jobs) all land and no version drops a domain its parent covers. After `apply` the
    threshold is calibrated again over every domain's frozen eval set and the calibration
    control texts.

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
    from routing.routers import get_router_class, load_router, read_files

    reg = ws.registry
    kind = kind or ws.router_kind
    runtime = router_runtime(kind, engine)
    for attempt in range(1, ROUTER_CHANGE_ATTEMPTS + 1):
        try:
            current = reg.get_router(kind)
            router, parent = load_router(read_files(reg.router_path(current)), **runtime), current.version
        except NotFoundError:
            router, parent = get_router_class(kind)(**runtime), 0
        apply(router)
        heldout = {d: [row_input(r) for r in reg.get_domain_eval(d)] for d in router.domains}
        calibration = router.calibrate(heldout, list(CALIBRATION_CONTROL))
        metrics = {"calibration": calibration.to_dict(), "heldout": router.evaluate(heldout)}
        try:
            return reg.register_router(kind, kind=kind, files=router.to_files(),
                                       covers=[router.refs[d] for d in router.domains], metrics=metrics,
                                       parent_version=parent)
        except StaleRouterError:
            if attempt == ROUTER_CHANGE_ATTEMPTS:
                raise
            time.sleep(random.uniform(0, 0.02 * attempt))  # let the writers that collided spread out
    raise AssertionError("unreachable")


def add_domain(ws, domain: str, data: str | Path, eval_data: str | Path | None = None, config=None, *,
               audit: bool = True, audit_options: dict[str, Any] | None = None) -> AddDomainResult | None:
    """Train `domain`, register it, freeze its eval set, update the router, then audit.

    In a data-parallel run (`accelerate launch`, `torchrun`) every process trains and rank 0
    alone does the rest; the other ranks return None once the version is registered.

    Args:
        ws: the `plait.Workspace`.
        data / eval_data: the domain's data files (see `training.data`).
        config: a `training.trainer.TrainConfig`.
        audit: run the forgetting audit afterwards.
    """
    from training.data import load_domain_data
    from training.trainer import TrainConfig, train_domain

    config = config or TrainConfig()
    dd = load_domain_data(data, eval_data, config.eval_fraction)
    result = train_domain(ws.registry, ws.config.base_model, domain, dd, config=config)
    if result is None:  # a data-parallel rank other than 0: rank 0 registered the version
        return None
    # the trainer froze the domain's eval rows; keep its first training rows too, so baselines
    # (sequential fine-tuning) can be rebuilt from the registry alone
    try:
        ws.registry.get_domain_rows(domain, "train")
    except NotFoundError:
        ws.registry.set_domain_rows(domain, "train", [row_dict(r) for r in dd.train])
    router = update_router(ws, domain, [row_input(r) for r in dd.train], result.version.ref)
    out = AddDomainResult(result, router)
    if audit:
        from plait.audit import run_audit

        out.audit = run_audit(ws, **(audit_options or {}))
    return out
