"""Router versions: registering them with compare-and-swap, reading them, and which are live."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from registry.context import RegistryContext, _with_write_retries
from registry.entities import RouterInfo
from registry.errors import NotFoundError, StaleRouterError
from registry.models import Adapter, AdapterVersion, RouterVersion
from registry.names import parse_ref, validate_name


class Routers(RegistryContext):
    """The `Registry` part for router versions."""

    def register_router(self, name: str, *, kind: str, files: dict[str, Path | bytes], covers: Iterable[str],
                        metrics: dict[str, Any] | None = None, parent_version: int | None = None) -> RouterInfo:
        """Store a fitted router bound to the adapter versions it covers (exact refs).

        Args:
            parent_version: the version of router `name` this one was built from (0: built from
                nothing). The write transaction checks that it is still the newest, so of two writers
                that both loaded version N only one registers N + 1; the other is told to rebuild on
                N + 1 instead of silently dropping its change (compare-and-swap). None skips the check.

        Raises:
            StaleRouterError: `parent_version` is no longer the newest version; reload and retry
                (`plait.continual.change_router` does).
        """
        validate_name(name, "router name")
        validate_name(kind, "router kind")
        covers = list(covers)
        self._check_refs_exist(covers)
        stored = self.store.put(files)

        def tx():
            with self._session(write=True) as s:
                # SQLite: the write lock is held from BEGIN IMMEDIATE, so this read is the newest;
                # PostgreSQL: two writers that read the same top collide on uq_router_version, the
                # loser retries (`_with_write_retries`) and reads the winner's version here
                top = s.exec(select(func.max(RouterVersion.version)).where(RouterVersion.name == name)).one() or 0
                if parent_version is not None and top != parent_version:
                    raise StaleRouterError(
                        f"router {name!r} is at version {top}, not {parent_version} as when this change was built "
                        f"(another writer registered one in between); reload the newest version and apply the "
                        f"change again")
                row = RouterVersion(name=name, version=top + 1, kind=kind, sha256=stored.sha256,
                                    size_bytes=stored.size_bytes, location=stored.location,
                                    covers_json=json.dumps(covers), metrics_json=json.dumps(metrics or {}))
                s.add(row)
                s.flush()
                return self._router_info(row)

        return _with_write_retries(tx)

    def _check_refs_exist(self, refs: list[str]) -> None:
        """Every ref resolves (NotFoundError names the first that does not); the exact ones, a
        router's usual covers, are checked in one query, not one per domain."""
        parsed = [parse_ref(ref) for ref in refs]
        with self._session() as s:
            names = sorted({r.name for r in parsed if r.version is not None})
            found = set(s.exec(select(Adapter.name, AdapterVersion.version)
                               .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                               .where(Adapter.name.in_(names))).all()) if names else set()
            for r in parsed:
                if r.version is None or (r.name, r.version) not in found:
                    self._resolve_row(s, r)  # an alias or a latest: resolve it; a missing ref: its usual error

    @staticmethod
    def _router_info(row: RouterVersion, metrics: bool = True) -> RouterInfo:
        return RouterInfo(row.id, row.name, row.version, row.kind, row.sha256, row.size_bytes, row.location,
                          json.loads(row.covers_json), json.loads(row.metrics_json) if metrics else {}, row.status,
                          row.created_at)

    def search_router_versions(self, name: str, metrics: bool = True) -> list[RouterInfo]:
        """Every version of router `name`, oldest first.

        Args:
            metrics: read each version's held-out metrics (False: `metrics` is {}; an audit
                reading every stage's router skips what grows with each version's domains).
        """
        from sqlalchemy.orm import defer

        with self._session() as s:
            q = select(RouterVersion).where(RouterVersion.name == name).order_by(RouterVersion.version)
            rows = s.exec(q if metrics else q.options(defer(RouterVersion.metrics_json))).all()
            return [self._router_info(r, metrics) for r in rows]

    def get_router(self, name: str, version: int | None = None) -> RouterInfo:
        """A router version (the newest when `version` is None)."""
        validate_name(name, "router name")
        with self._session() as s:
            q = select(RouterVersion).where(RouterVersion.name == name)
            q = q.where(RouterVersion.version == version) if version else q.order_by(RouterVersion.version.desc())
            row = s.exec(q.limit(1)).first()
            if row is None:
                raise NotFoundError(f"no router {name!r}" + (f" version {version}" if version else "")
                                    + "; train a domain to fit one")
            return self._router_info(row)

    def search_routers(self) -> list[RouterInfo]:
        with self._session() as s:
            rows = s.exec(select(RouterVersion).order_by(RouterVersion.name, RouterVersion.version)).all()
            return [self._router_info(r) for r in rows]

    def router_path(self, info: RouterInfo) -> Path:
        """A router's artifact folder after its hash check."""
        return self.store.verify(info.location, info.sha256, what=f"router {info.ref}")

    @staticmethod
    def _live_routers(s: Session) -> list[tuple[RouterVersion, list[str], bool]]:
        """(row, covers, served) of every router version plait can still use.

        Live: the newest version of each router name (routing, generation and `plait serve`
        load it, and the audit measures it as the current stage; `served` is True for it),
        and for each name the newest version covering each number of domains (the audit
        measures, and re-measures when figures are missing, the system after domain i with
        it; the merged baseline merges its adapters). plait has no router rollback: an older
        router version is never served again, so its versions are not kept alive.
        """
        newest: dict[str, RouterVersion] = {}
        stage: dict[tuple[str, int], tuple[RouterVersion, list[str]]] = {}
        for r in s.exec(select(RouterVersion).where(RouterVersion.status == "ready")
                        .order_by(RouterVersion.name, RouterVersion.version)).all():
            covers = json.loads(r.covers_json)
            newest[r.name] = r
            stage[(r.name, len(covers))] = (r, covers)
        served = {r.id for r in newest.values()}
        live = {r.id: (r, covers) for r, covers in stage.values()}
        for r in newest.values():
            live.setdefault(r.id, (r, json.loads(r.covers_json)))
        return [(r, covers, r.id in served) for r, covers in sorted(live.values(), key=lambda t: (t[0].name, t[0].version))]

    def live_routers(self) -> list[RouterInfo]:
        """The router versions plait can still serve or audit (see `_live_routers`), by name and version."""
        with self._session() as s:
            return [self._router_info(r) for r, _, _ in self._live_routers(s)]
