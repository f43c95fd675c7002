"""`Registry`: the one facade over the registry's tables, artifact store and MLflow link.

Verbs follow MLflow's client: `create_`/`register_`, `get_`, `search_`, `set_`. Every
method opens its own short transaction and returns plain dataclasses, so callers never
hold a database session. Writes store the artifact first (atomic, content-addressed) and
then commit the version row, so a version is never visible before its files are complete;
a crash between the two leaves an unreferenced artifact that `gc` removes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from registry import db
from registry.errors import BadInputError, ConflictError, IntegrityError, NotFoundError, RefusedError, StaleRouterError
from registry.hashing import read_safetensors_header
from registry.models import (Adapter, AdapterVersion, Alias, AliasEvent, Audit, Domain, Lineage, Metric,
                             RouterVersion, utcnow)
from registry.names import Ref, parse_ref, validate_name
from registry.store import ArtifactStore, _fault

RELATIONS = ("trained-from-base", "warm-start", "merge", "import")
#: a domain's frozen row sets: `eval` (audits only), `validation` (router calibration and the
#: choice of which version serves the domain), `train` (its first training rows, for baselines)
SPLITS = ("eval", "validation", "train")
#: the alias the audit gate guards (`set_alias`, `rollback_alias`)
PRODUCTION = "production"
_WRITE_RETRIES = 20


@dataclass
class VersionInfo:
    """A registered adapter version, detached from the database."""

    id: int
    name: str
    domain: str
    kind: str
    version: int
    base_fingerprint: str
    config: dict[str, Any]
    sha256: str
    size_bytes: int
    location: str
    data_fingerprint: str | None
    mlflow_run_id: str | None
    status: str
    description: str
    created_at: datetime
    parents: list[dict[str, Any]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """The exact reference, `NAME:VERSION`."""
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass
class AdapterSummary:
    name: str
    domain: str
    kind: str
    versions: int
    latest: int | None
    aliases: dict[str, int]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass
class RouterInfo:
    id: int
    name: str
    version: int
    kind: str
    sha256: str
    size_bytes: int
    location: str
    covers: list[str]
    metrics: dict[str, Any]
    status: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass
class AuditInfo:
    id: int
    created_at: datetime
    domains: list[str]
    passed: bool
    summary: dict[str, Any]
    report_location: str | None
    mlflow_run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


def _with_write_retries(fn):
    """Run a write transaction, retrying on version-number races and lock time-outs."""
    for attempt in range(_WRITE_RETRIES):
        try:
            return fn()
        except (SAIntegrityError, OperationalError) as e:
            if isinstance(e, OperationalError) and "locked" not in str(e) and "deadlock" not in str(e):
                raise
            if attempt == _WRITE_RETRIES - 1:
                raise
            time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}: use {', '.join(SPLITS)}")


def _validate_filters(**filters: str | None) -> None:
    """Search filters are names: an invalid one is a typo to report, not an empty result."""
    for what, value in filters.items():
        if value:
            validate_name(value, f"{what} filter")


class Registry:
    """The system of record for adapter versions, routers and audits.

    Args:
        db_url: any SQLAlchemy URL; `sqlite:///path/registry.db` by default in a workspace.
        artifact_root: folder of the content-addressed artifact store.
        tracking_uri: MLflow tracking URI to mirror versions and aliases into, or None.
    """

    def __init__(self, db_url: str, artifact_root: Path, tracking_uri: str | None = None):
        self.db_url = db_url
        self.engine = db.make_engine(db_url)
        db.create_schema(self.engine)
        self.store = ArtifactStore(Path(artifact_root))
        self._tracking = None
        self.tracking_uri = tracking_uri

    @property
    def tracking(self):
        """The MLflow link (imported on first use), or None when tracking is off."""
        if self._tracking is None and self.tracking_uri:
            from registry.tracking import Tracking

            # run artifacts beside the artifact store (in a workspace: <workspace>/mlartifacts), like checkpoints
            self._tracking = Tracking(self.tracking_uri, artifact_root=self.store.root.parent / "mlartifacts")
        return self._tracking

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------- internals
    def _session(self, write: bool = False):
        return db.session(self.engine, write=write)

    @staticmethod
    def _adapter_row(s: Session, name: str) -> Adapter:
        row = s.exec(select(Adapter).where(Adapter.name == name)).first()
        if row is None:
            raise NotFoundError(f"no adapter named {name!r}; `plait registry list` shows the adapters")
        return row

    def _resolve_row(self, s: Session, ref: str | Ref) -> tuple[Adapter, AdapterVersion]:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        adapter = self._adapter_row(s, r.name)
        if r.version is not None:
            row = s.exec(select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id,
                                                      AdapterVersion.version == r.version)).first()
            if row is None:
                top = s.exec(select(func.max(AdapterVersion.version)).where(
                    AdapterVersion.adapter_id == adapter.id)).one()
                raise NotFoundError(f"{r}: adapter {r.name!r} has no version {r.version} (newest: {top})")
            return adapter, row
        if r.alias is not None:
            alias = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == r.alias)).first()
            if alias is None:
                known = s.exec(select(Alias.name).where(Alias.adapter_id == adapter.id)).all()
                raise NotFoundError(f"{r}: adapter {r.name!r} has no alias {r.alias!r} "
                                    f"(aliases: {', '.join(sorted(known)) or 'none'})")
            return adapter, s.get(AdapterVersion, alias.version_id)
        row = s.exec(select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id,
                                                  AdapterVersion.status == "ready")
                     .order_by(AdapterVersion.version.desc()).limit(1)).first()
        if row is None:
            raise NotFoundError(f"{r}: adapter {r.name!r} has no ready version")
        return adapter, row

    def _info(self, s: Session, adapter: Adapter, row: AdapterVersion) -> VersionInfo:
        domain = s.get(Domain, adapter.domain_id)
        parents = []
        for edge in s.exec(select(Lineage).where(Lineage.child_id == row.id).order_by(Lineage.id)).all():
            if edge.parent_id is not None:
                p = s.get(AdapterVersion, edge.parent_id)
                pa = s.get(Adapter, p.adapter_id)
                parents.append({"ref": f"{pa.name}:{p.version}", "relation": edge.relation, "weight": edge.weight})
            else:
                parents.append({"base": edge.parent_base, "relation": edge.relation, "weight": edge.weight})
        aliases = sorted(s.exec(select(Alias.name).where(Alias.version_id == row.id)).all())
        return VersionInfo(
            id=row.id, name=adapter.name, domain=domain.name, kind=adapter.kind, version=row.version,
            base_fingerprint=row.base_fingerprint, config=json.loads(row.config_json), sha256=row.sha256,
            size_bytes=row.size_bytes, location=row.location, data_fingerprint=row.data_fingerprint,
            mlflow_run_id=row.mlflow_run_id, status=row.status, description=row.description,
            created_at=row.created_at, parents=parents, aliases=aliases)

    @staticmethod
    def _check_line(s: Session, adapter: Adapter, kind: str, domain: str) -> None:
        """An adapter's versions share its kind and domain: refuse a version of another."""
        dname = s.get(Domain, adapter.domain_id).name
        if adapter.kind != kind or dname != domain:
            raise ConflictError(f"adapter {adapter.name!r} is a {adapter.kind} adapter of domain {dname!r}; a {kind} "
                                f"version for domain {domain!r} needs another name (--name)")

    @staticmethod
    def _lock_version(s: Session, version_id: int) -> AdapterVersion:
        """The version row, locked for this transaction and read fresh.

        `SELECT ... FOR UPDATE` on PostgreSQL, so archive and alias moves of one version queue
        and the second sees what the first committed (`populate_existing` re-reads a row the
        session already holds); SQLite's write transactions (`BEGIN IMMEDIATE`) already exclude
        each other, and SQLAlchemy emits no FOR UPDATE there.
        """
        return s.exec(select(AdapterVersion).where(AdapterVersion.id == version_id).with_for_update()
                      .execution_options(populate_existing=True)).one()

    @staticmethod
    def _domain_row(s: Session, name: str, create: bool, description: str = "") -> Domain:
        row = s.exec(select(Domain).where(Domain.name == name)).first()
        if row is None:
            if not create:
                raise NotFoundError(f"no domain named {name!r}; `plait registry domains` lists them")
            top = s.exec(select(func.max(Domain.position))).one()
            row = Domain(name=name, position=(top or 0) + 1, description=description)
            s.add(row)
            s.flush()
        return row

    # ----------------------------------------------------------------- domains
    def create_domain(self, name: str, description: str = "") -> str:
        """Add a domain (or return the existing one); domains keep the order they were added in."""
        validate_name(name, "domain name")

        def tx():
            with self._session(write=True) as s:
                return self._domain_row(s, name, create=True, description=description).name

        return _with_write_retries(tx)

    def set_domain_rows(self, domain: str, split: str, rows: list[dict[str, Any]]) -> str:
        """Freeze a domain's `eval`, `validation` or `train` rows as a JSONL artifact; set once, then kept.

        Returns:
            the rows' sha256. Setting them again with other rows is refused: audits compare
            figures over time, which only means something on the same rows.
        """
        validate_name(domain, "domain name")
        _check_split(split)
        if not rows:
            raise BadInputError(f"the {split} set of domain {domain!r} is empty; give at least one row")
        payload = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
        with self._session() as s:  # decide before writing any byte
            row = s.exec(select(Domain).where(Domain.name == domain)).first()
            if row is not None and getattr(row, f"{split}_sha256"):
                sha, loc = getattr(row, f"{split}_sha256"), getattr(row, f"{split}_location")
                current = self.store.verify(loc, sha, what=f"{split} set of domain {domain!r}")
                if (current / f"{split}.jsonl").read_bytes() == payload:
                    return sha
                raise ConflictError(f"domain {domain!r} already has a frozen {split} set (sha256 {sha[:12]}); "
                                    f"audits keep using it")
        stored = self.store.put({f"{split}.jsonl": payload})

        def tx():
            with self._session(write=True) as s:
                row = self._domain_row(s, domain, create=True)
                sha_col = getattr(Domain, f"{split}_sha256")
                # freeze only if still unfrozen: another writer may have frozen it since the check
                # above, and whoever it told "stored" keeps that promise
                frozen = s.execute(update(Domain).where(Domain.id == row.id, sha_col.is_(None)).values(
                    {f"{split}_sha256": stored.sha256, f"{split}_location": stored.location,
                     f"{split}_rows": len(rows)})).rowcount
                if frozen == 0:
                    current = s.exec(select(sha_col).where(Domain.id == row.id)).one()
                    if current != stored.sha256:
                        raise ConflictError(f"domain {domain!r} already has a frozen {split} set (sha256 "
                                            f"{current[:12]}); audits keep using it")
                return stored.sha256

        return _with_write_retries(tx)

    def get_domain_rows(self, domain: str, split: str = "eval") -> list[dict[str, Any]]:
        """A domain's frozen `eval`, `validation` or `train` rows, after the file's hash check.

        Raises:
            NotFoundError: the domain has no such set (a domain made before validation splits
                existed gets one when it is trained again).
        """
        _check_split(split)
        with self._session() as s:
            row = self._domain_row(s, domain, create=False)
            sha, loc = getattr(row, f"{split}_sha256"), getattr(row, f"{split}_location")
            if not sha:
                raise NotFoundError(f"domain {domain!r} has no {split} set yet; train it with plait train")
        path = self.store.verify(loc, sha, what=f"{split} set of domain {domain!r}")
        return [json.loads(line) for line in (path / f"{split}.jsonl").read_text().splitlines() if line.strip()]

    def set_domain_eval(self, domain: str, rows: list[dict[str, Any]]) -> str:
        return self.set_domain_rows(domain, "eval", rows)

    def get_domain_eval(self, domain: str) -> list[dict[str, Any]]:
        return self.get_domain_rows(domain, "eval")

    def search_domains(self) -> list[dict[str, Any]]:
        """Every domain in the order it was added, with its adapters."""
        with self._session() as s:
            out = []
            for d in s.exec(select(Domain).order_by(Domain.position)).all():
                names = s.exec(select(Adapter.name).where(Adapter.domain_id == d.id).order_by(Adapter.name)).all()
                out.append({"name": d.name, "position": d.position, "description": d.description,
                            "adapters": list(names), "eval_sha256": d.eval_sha256, "eval_rows": d.eval_rows,
                            "validation_rows": d.validation_rows,
                            "created_at": d.created_at.isoformat()})
            return out

    # ----------------------------------------------------------------- versions
    def register_version(
        self,
        name: str,
        *,
        domain: str,
        kind: str,
        files: Path | dict[str, Path | bytes],
        base_fingerprint: str,
        config: dict[str, Any] | None = None,
        parents: Sequence[tuple[str, str] | tuple[str, str, float]] = (),
        base_relation: str = "trained-from-base",
        data_fingerprint: str | None = None,
        mlflow_run_id: str | None = None,
        metrics: dict[str, float] | None = None,
        description: str = "",
        mirror: bool = True,
    ) -> VersionInfo:
        """Store an artifact and register it as the next version of adapter `name`.

        Args:
            name: adapter name; created on first registration with `domain` and `kind`.
            files: the artifact: a folder, or relative file name -> path or bytes.
            base_fingerprint: fingerprint of the base model the adapter was trained on.
            parents: (ref, relation[, weight]) edges to earlier versions (warm-start, merge).
                Without parents the version gets one edge to its base (`base_relation`).
            metrics: name -> value, recorded with eval_domain = the adapter's domain.
            mirror: mirror the version into MLflow now (the trainer mirrors it once its run is logged).

        Returns:
            the new version. Its number is unique per adapter, even under concurrent writers.
        """
        validate_name(name, "adapter name")
        validate_name(domain, "domain name")
        validate_name(kind, "adapter kind")
        for rel in [base_relation, *(p[1] for p in parents)]:
            if rel not in RELATIONS:
                raise BadInputError(f"unknown lineage relation {rel!r}: use one of {', '.join(RELATIONS)}")
        if not base_fingerprint:
            raise BadInputError("a version needs the fingerprint of its base model")
        with self._session() as s:  # check everything before any byte is written
            existing = s.exec(select(Adapter).where(Adapter.name == name)).first()
            if existing is not None:
                self._check_line(s, existing, kind, domain)
            for ref, *_ in parents:
                self._resolve_row(s, ref)
        if isinstance(files, dict):
            stored = self.store.put(files)
        else:
            stored = self.store.put_dir(Path(files))
        _fault("registry.before_commit")
        config_json = json.dumps(config or {}, sort_keys=True)

        def tx():
            with self._session(write=True) as s:
                # the checks again, under the adapter's row lock: a writer that created the
                # adapter since (as another kind or domain) must not gain this version; two
                # writers creating it at once meet the unique name and the loser retries here
                adapter = s.exec(select(Adapter).where(Adapter.name == name).with_for_update()).first()
                if adapter is None:
                    adapter = Adapter(name=name, domain_id=self._domain_row(s, domain, create=True).id, kind=kind)
                    s.add(adapter)
                    s.flush()
                else:
                    self._check_line(s, adapter, kind, domain)
                parent_ids = [(self._resolve_row(s, ref)[1].id, rel, w[0] if w else None)
                              for ref, rel, *w in parents]
                top = s.exec(select(func.max(AdapterVersion.version)).where(
                    AdapterVersion.adapter_id == adapter.id)).one()
                row = AdapterVersion(
                    adapter_id=adapter.id, version=(top or 0) + 1, base_fingerprint=base_fingerprint,
                    config_json=config_json, sha256=stored.sha256, size_bytes=stored.size_bytes,
                    location=stored.location, data_fingerprint=data_fingerprint, mlflow_run_id=mlflow_run_id,
                    description=description)
                s.add(row)
                s.flush()
                if parent_ids:
                    for pid, rel, w in parent_ids:
                        s.add(Lineage(child_id=row.id, parent_id=pid, relation=rel, weight=w))
                else:
                    s.add(Lineage(child_id=row.id, parent_base=base_fingerprint, relation=base_relation))
                for mname, value in (metrics or {}).items():
                    s.add(Metric(version_id=row.id, eval_domain=domain, name=mname, value=float(value)))
                s.flush()
                return self._info(s, adapter, row)

        info = _with_write_retries(tx)
        _fault("registry.after_commit")
        if mirror:
            self._mirror(lambda t: t.mirror_version(info, self.store.path(info.location)))
        return info

    def get_version(self, ref: str) -> VersionInfo:
        """Resolve `NAME`, `NAME:VERSION` or `NAME@ALIAS` to a version."""
        with self._session() as s:
            return self._info(s, *self._resolve_row(s, ref))

    def search_versions(self, name: str | None = None, domain: str | None = None, kind: str | None = None,
                        base: str | None = None, metric: str | None = None, min_value: float | None = None,
                        max_value: float | None = None, include_archived: bool = False) -> list[VersionInfo]:
        """Versions matching every given filter, by adapter name then version.

        Args:
            base: base fingerprint (a prefix is enough).
            metric: keep versions that have this metric (within min_value/max_value if given).
        """
        _validate_filters(name=name, domain=domain, kind=kind)
        with self._session() as s:
            q = select(Adapter, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            if name:
                q = q.where(Adapter.name == name)
            if domain:
                q = q.join(Domain, Domain.id == Adapter.domain_id).where(Domain.name == domain)
            if kind:
                q = q.where(Adapter.kind == kind)
            if base:
                q = q.where(AdapterVersion.base_fingerprint.startswith(base))
            if not include_archived:
                q = q.where(AdapterVersion.status == "ready")
            if metric:
                m = select(Metric.version_id).where(Metric.name == metric)
                if min_value is not None:
                    m = m.where(Metric.value >= min_value)
                if max_value is not None:
                    m = m.where(Metric.value <= max_value)
                q = q.where(AdapterVersion.id.in_(m))
            rows = s.exec(q.order_by(Adapter.name, AdapterVersion.version)).all()
            return [self._info(s, a, v) for a, v in rows]

    def search_adapters(self, domain: str | None = None, kind: str | None = None) -> list[AdapterSummary]:
        """One summary per adapter (version count, newest version, aliases), by name."""
        _validate_filters(domain=domain, kind=kind)
        with self._session() as s:
            q = select(Adapter, Domain.name).join(Domain, Domain.id == Adapter.domain_id)
            if domain:
                q = q.where(Domain.name == domain)
            if kind:
                q = q.where(Adapter.kind == kind)
            rows = s.exec(q.order_by(Adapter.name)).all()
            ids = [a.id for a, _ in rows]
            counts = {aid: (n, top) for aid, n, top in s.exec(
                select(AdapterVersion.adapter_id, func.count(), func.max(AdapterVersion.version))
                .where(AdapterVersion.status == "ready").group_by(AdapterVersion.adapter_id)).all()}
            aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
            for aid, alias, version in s.exec(select(Alias.adapter_id, Alias.name, AdapterVersion.version)
                                              .join(AdapterVersion, AdapterVersion.id == Alias.version_id)).all():
                aliases.setdefault(aid, {})[alias] = version
            return [AdapterSummary(a.name, dname, a.kind, *counts.get(a.id, (0, None)), aliases.get(a.id, {}),
                                   a.created_at) for a, dname in rows]

    # ----------------------------------------------------------------- lineage
    def get_lineage(self, ref: str, direction: str = "both") -> dict[str, Any]:
        """The lineage graph around a version.

        Args:
            direction: "up" (ancestors), "down" (descendants) or "both".

        Returns:
            {"root": ref, "nodes": [...], "edges": [{"child", "parent", "relation", "weight"}]};
            a base model appears as the node `base:<fingerprint>`.
        """
        if direction not in ("up", "down", "both"):
            raise BadInputError(f"unknown lineage direction {direction!r}: use up, down or both")
        with self._session() as s:
            _, start = self._resolve_row(s, ref)
            names: dict[int, str] = {}

            def label(vid: int) -> str:
                if vid not in names:
                    v = s.get(AdapterVersion, vid)
                    names[vid] = f"{s.get(Adapter, v.adapter_id).name}:{v.version}"
                return names[vid]

            edges, seen, frontier = [], {start.id}, [start.id]
            nodes = {label(start.id)}
            while frontier:
                vid = frontier.pop()
                found = []
                if direction in ("up", "both"):
                    found += s.exec(select(Lineage).where(Lineage.child_id == vid)).all()
                if direction in ("down", "both"):
                    found += s.exec(select(Lineage).where(Lineage.parent_id == vid)).all()
                for e in found:
                    parent = label(e.parent_id) if e.parent_id is not None else f"base:{e.parent_base}"
                    edge = {"child": label(e.child_id), "parent": parent, "relation": e.relation, "weight": e.weight}
                    if edge not in edges:
                        edges.append(edge)
                    nodes.update([edge["child"], parent])
                    for nxt in (e.parent_id, e.child_id):
                        if nxt is not None and nxt not in seen:
                            # when walking one direction only, do not turn around at a node
                            if (direction == "up" and nxt == e.child_id) or (direction == "down" and nxt == e.parent_id):
                                continue
                            seen.add(nxt)
                            frontier.append(nxt)
            return {"root": label(start.id), "nodes": sorted(nodes), "edges": edges}

    # ----------------------------------------------------------------- aliases
    def set_alias(self, ref: str, alias: str, *, force: bool = False) -> VersionInfo:
        """Point `alias` of the referenced adapter at the referenced version (create or move).

        Args:
            force: promote to `production` even where the audit gate refuses it.

        Raises:
            ConflictError: the version is archived.
            RefusedError: `alias` is `production` and the newest audit that covered the
                version failed, or the registry has audits and none covered the version.
        """
        validate_name(alias, "alias")

        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                return self._point_alias(s, adapter, row.id, alias, force)

        info = _with_write_retries(tx)
        self._mirror(lambda t: t.mirror_alias(info.name, alias, info.version))
        return info

    def rollback_alias(self, name: str, alias: str, *, force: bool = False) -> VersionInfo:
        """Move `alias` back to the version it pointed at before its latest move.

        The history is read and the alias moved in one write transaction (under the alias's
        row lock on PostgreSQL), so a concurrent move cannot slip in between; the target must
        be ready and, for `production`, pass the audit gate as in `set_alias`.
        """
        validate_name(name, "adapter name")
        validate_name(alias, "alias")

        def tx():
            with self._session(write=True) as s:
                adapter = self._adapter_row(s, name)
                s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias).with_for_update()).first()
                last = s.exec(select(AliasEvent).where(AliasEvent.adapter_id == adapter.id, AliasEvent.alias == alias)
                              .order_by(AliasEvent.id.desc()).limit(1)).first()
                if last is None or last.previous_version_id is None:
                    raise NotFoundError(f"alias {name}@{alias} has no earlier version to roll back to")
                return self._point_alias(s, adapter, last.previous_version_id, alias, force)

        info = _with_write_retries(tx)
        self._mirror(lambda t: t.mirror_alias(info.name, alias, info.version))
        return info

    def _point_alias(self, s: Session, adapter: Adapter, version_id: int, alias: str, force: bool) -> VersionInfo:
        """Move `alias` to a version inside the caller's write transaction, checks under row locks.

        Locks are taken alias row first, then version row, in every path (rollback too), so
        two moves never wait on each other crosswise.
        """
        cur = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias).with_for_update()
                     .execution_options(populate_existing=True)).first()
        row = self._lock_version(s, version_id)
        if row.status != "ready":
            raise ConflictError(f"{adapter.name}:{row.version} is {row.status}; only ready versions get aliases")
        if alias == PRODUCTION and not force:
            self._audit_gate(s, f"{adapter.name}:{row.version}", row.id)
        previous = cur.version_id if cur else None
        if cur is None:
            s.add(Alias(adapter_id=adapter.id, name=alias, version_id=row.id))
        else:
            cur.version_id, cur.updated_at = row.id, utcnow()
            s.add(cur)
        s.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_id=row.id, previous_version_id=previous))
        s.flush()
        return self._info(s, adapter, row)

    @staticmethod
    def _audit_gate(s: Session, ref: str, version_id: int) -> None:
        """Refuse `production` for a version whose newest covering audit failed or that no audit covered.

        An audit covered a version when it recorded a figure for it (its Metric rows) or lists
        it in its summary's `covers` (an audit stopped by an integrity failure measures nothing
        but still judged the versions its router served). A registry with no audit at all has
        no gate: adapters imported or trained without audits are promoted as before.
        """
        if s.exec(select(func.count()).select_from(Audit)).one() == 0:
            return
        ids = set(s.exec(select(Metric.audit_id).where(Metric.version_id == version_id,
                                                       Metric.audit_id.is_not(None)).distinct()).all())
        for aid, summary in s.exec(select(Audit.id, Audit.summary_json).where(
                Audit.summary_json.contains(f'"{ref}"', autoescape=True))).all():
            if ref in (json.loads(summary).get("covers") or []):
                ids.add(aid)
        if not ids:
            raise RefusedError(f"no audit covered {ref}: production needs a passed audit that measured this version "
                               f"(audits measure the versions the router serves; route it and run an audit)")
        newest = s.get(Audit, max(ids))
        if not newest.passed:
            reasons = json.loads(newest.summary_json).get("reasons") or []
            why = f" ({' '.join(str(reasons[0]).split())[:200]})" if reasons else ""
            raise RefusedError(f"the latest audit that covered {ref} (#{newest.id}) failed{why}; production needs "
                               f"a passed audit of this version")

    def delete_alias(self, name: str, alias: str) -> None:
        def tx():
            with self._session(write=True) as s:
                adapter = self._adapter_row(s, name)
                cur = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)).first()
                if cur is None:
                    raise NotFoundError(f"adapter {name!r} has no alias {alias!r}")
                s.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_id=None, previous_version_id=cur.version_id))
                s.delete(cur)

        _with_write_retries(tx)

    # ----------------------------------------------------------------- metrics
    def log_metrics(self, ref: str, metrics: dict[str, float], eval_domain: str | None = None,
                    audit_id: int | None = None) -> None:
        """Record metrics of a version, measured on `eval_domain` (default: its own domain)."""
        if eval_domain is not None:
            validate_name(eval_domain, "domain name")
        for k, v in metrics.items():
            if not isinstance(k, str) or not k or len(k) > 128:
                raise BadInputError(f"invalid metric name {k!r}: use 1-128 characters")
            if not isinstance(v, (int, float)):
                raise BadInputError(f"metric {k!r} has non-numeric value {v!r}")

        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                dom = eval_domain or s.get(Domain, adapter.domain_id).name
                for k, v in metrics.items():
                    s.add(Metric(version_id=row.id, eval_domain=dom, name=k, value=float(v), audit_id=audit_id))

        _with_write_retries(tx)

    def log_audit_metrics(self, audit_id: int, rows: list[dict[str, Any]]) -> None:
        """Record an audit's figures in one transaction.

        Args:
            rows: {"ref", "eval_domain", "name", "value", "stage"} each.
        """
        def tx():
            with self._session(write=True) as s:
                ids: dict[str, int] = {}
                for r in rows:
                    if r["ref"] not in ids:
                        ids[r["ref"]] = self._resolve_row(s, r["ref"])[1].id
                    s.add(Metric(version_id=ids[r["ref"]], eval_domain=r["eval_domain"], name=r["name"],
                                 value=float(r["value"]), audit_id=audit_id, stage=r.get("stage")))

        _with_write_retries(tx)

    def search_audit_metrics(self, name_prefix: str = "") -> list[dict[str, Any]]:
        """Every audit figure whose name starts with `name_prefix`, oldest first."""
        with self._session() as s:
            q = select(Metric, AdapterVersion.version, Adapter.name).join(
                AdapterVersion, AdapterVersion.id == Metric.version_id).join(
                Adapter, Adapter.id == AdapterVersion.adapter_id).where(Metric.audit_id.is_not(None))
            if name_prefix:
                q = q.where(Metric.name.startswith(name_prefix))
            return [{"ref": f"{a}:{v}", "name": m.name, "value": m.value, "eval_domain": m.eval_domain,
                     "audit_id": m.audit_id, "stage": m.stage} for m, v, a in s.exec(q.order_by(Metric.id)).all()]

    def get_metrics(self, ref: str, audit_id: int | None = None) -> list[dict[str, Any]]:
        """Every metric of a version, oldest first."""
        with self._session() as s:
            _, row = self._resolve_row(s, ref)
            q = select(Metric).where(Metric.version_id == row.id)
            if audit_id is not None:
                q = q.where(Metric.audit_id == audit_id)
            return [{"name": m.name, "value": m.value, "eval_domain": m.eval_domain, "audit_id": m.audit_id,
                     "stage": m.stage, "created_at": m.created_at.isoformat()}
                    for m in s.exec(q.order_by(Metric.id)).all()]

    # ----------------------------------------------------------------- artifacts
    def artifact_path(self, ref: str | VersionInfo, *, allow_archived: bool = False) -> tuple[VersionInfo, Path]:
        """The version and its artifact folder, after the folder's sha256 matched the registry.

        This is the only way plait reads adapter weights from the store. The version is read
        again (a `VersionInfo` may be stale). Loaders check the weights' format with
        `registry.hashing.check_safetensors_folder`.

        Args:
            allow_archived: also return an archived version (the audit re-reading the
                versions of past stages, an export); serving and training refuse them.

        Raises:
            ConflictError: the version is archived and `allow_archived` is False.
            IntegrityError: the files do not match the recorded hash.
        """
        info = self.get_version(ref.ref if isinstance(ref, VersionInfo) else ref)
        if info.status != "ready" and not allow_archived:
            raise ConflictError(f"adapter version {info.ref} is {info.status}: it is no longer served or loaded and gc "
                                f"may delete its files; use a ready version of {info.name}")
        path = self.store.verify(info.location, info.sha256, what=f"adapter version {info.ref}")
        return info, path

    def import_peft(self, src: Path, *, name: str, domain: str, base_fingerprint: str,
                    kind: str = "lora", description: str = "") -> VersionInfo:
        """Register a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

        Args:
            kind: the adapter kind to record. The registry reads no training code, so the caller
                detects it (`training.methods.detect_folder`: a `use_dora` config is `dora`).

        Raises:
            NotFoundError: the folder does not exist.
            BadInputError: not a PEFT LoRA folder, or its weights are pickle files.
        """
        validate_name(name, "adapter name")
        validate_name(domain, "domain name")
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"{src} is not a directory; give the folder holding adapter_config.json")
        cfg_path, weights = src / "adapter_config.json", src / "adapter_model.safetensors"
        if not cfg_path.is_file():
            raise BadInputError(f"{src} is not a PEFT adapter directory: it has no adapter_config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter with peft") from None
        if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
            raise BadInputError(f"{cfg_path} has peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                                f"only LoRA adapters can be imported")
        if not weights.is_file():
            if (src / "adapter_model.bin").exists():
                raise BadInputError(f"{src} holds pickle weights (adapter_model.bin), which plait never loads; "
                                    f"re-save with safe_serialization=True")
            raise BadInputError(f"{src} is not a PEFT adapter directory: it has no adapter_model.safetensors")
        try:
            header, _ = read_safetensors_header(weights)
        except IntegrityError as e:
            raise BadInputError(str(e)) from None
        if not set(header) - {"__metadata__"}:
            raise BadInputError(f"{weights} holds no tensors; re-save the adapter with peft")
        return self.register_version(
            name, domain=domain, kind=kind, files={"adapter_config.json": cfg_path, "adapter_model.safetensors": weights},
            base_fingerprint=base_fingerprint, config=config, base_relation="import",
            description=description or f"imported from {src.resolve()}")

    def export_version(self, ref: str, out_dir: Path) -> Path:
        """Copy a verified version's files to `out_dir` (PEFT layout), writable."""
        info, path = self.artifact_path(ref, allow_archived=True)  # an export is how an archived one is kept
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise BadInputError(f"{out_dir} exists and is not an empty directory; choose a new folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot create the export folder {out_dir} ({e.strerror}); choose a writable path") from None
        for f in sorted(path.rglob("*")):
            if f.is_file():
                dest = out_dir / f.relative_to(path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
        return out_dir

    def verify(self) -> list[dict[str, Any]]:
        """Check every ready version's and router's artifact against its recorded hash, and
        every live router's coverage.

        A live router (see `live_routers`) covers exact refs; each must exist with a present,
        hash-matching artifact, and, for the newest router of each name (the one served),
        be ready: an archived version there fails every request routed to it.

        Returns:
            one row per artifact: {"ref", "sha256", "ok", "error"}; one row per live router
            with ref `coverage of router NAME:V`.
        """
        with self._session() as s:
            rows = [(f"{a.name}:{v.version}", v.location, v.sha256) for a, v in s.exec(
                select(Adapter, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                .where(AdapterVersion.status == "ready").order_by(Adapter.name, AdapterVersion.version)).all()]
            rows += [(f"router {r.name}:{r.version}", r.location, r.sha256) for r in s.exec(
                select(RouterVersion).where(RouterVersion.status == "ready").order_by(RouterVersion.id)).all()]
            for d in s.exec(select(Domain).order_by(Domain.position)).all():
                rows += [(f"{split} set {d.name}", getattr(d, f"{split}_location"), getattr(d, f"{split}_sha256"))
                         for split in SPLITS if getattr(d, f"{split}_location")]
            coverage = self._coverage(s)
        checked: dict[tuple[str, str], str | None] = {}

        def check(location: str, sha: str, what: str) -> str | None:
            if (location, sha) not in checked:
                try:
                    self.store.verify(location, sha, what=what)
                    checked[(location, sha)] = None
                except IntegrityError as e:
                    checked[(location, sha)] = str(e)
            return checked[(location, sha)]

        report = [{"ref": ref, "sha256": sha, "ok": (err := check(loc, sha, ref)) is None, "error": err}
                  for ref, loc, sha in rows]
        for router, targets in coverage:
            errors = [problem or check(loc, sha, ref) for ref, loc, sha, problem in targets]
            errors = [e for e in errors if e]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            report.append({"ref": f"coverage of router {router.name}:{router.version}", "sha256": router.sha256,
                           "ok": not errors, "error": "; ".join(errors[:3]) + more if errors else None})
        return report

    def _coverage(self, s: Session) -> list[tuple[RouterVersion, list[tuple[str, str | None, str | None, str | None]]]]:
        """Per live router: (ref, location, sha256, problem found without hashing) of every covered ref."""
        versions = {f"{name}:{v.version}": v for name, v in s.exec(
            select(Adapter.name, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)).all()}
        out = []
        for router, covers, served in self._live_routers(s):
            targets = []
            for ref in covers:
                v = versions.get(ref)
                problem = None
                if v is None:
                    problem = f"router {router.name}:{router.version} covers {ref}, which does not exist"
                elif served and v.status != "ready":
                    problem = (f"router {router.name}:{router.version} serves {ref}, which is {v.status}: requests "
                               f"routed to it fail")
                targets.append((ref, v.location if v else None, v.sha256 if v else None, problem))
            out.append((router, targets))
        return out

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

    def archive(self, ref: str, *, force: bool = False) -> VersionInfo:
        """Mark a version archived: it is no longer resolved by NAME and `gc` may delete its files.

        Args:
            force: archive a version a live router still covers (gc keeps its files while
                one does; serving it by NAME:V is refused from now on).

        Raises:
            ConflictError: an alias points at the version (move the alias first).
            RefusedError: a live router covers the version and `force` is False.
        """
        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                row = self._lock_version(s, row.id)  # queues with alias moves of this version
                exact = f"{adapter.name}:{row.version}"
                held = s.exec(select(Alias.name).where(Alias.version_id == row.id)).all()
                if held:
                    raise ConflictError(f"{exact} is the target of alias(es) {', '.join(held)}; "
                                        f"move them first (plait registry alias)")
                routers = [f"{r.name}:{r.version}" for r, covers, _ in self._live_routers(s) if exact in covers]
                if routers and not force:
                    raise RefusedError(f"{exact} is covered by live router version(s) {', '.join(routers)}, which can "
                                       f"still route requests or audits to it; archive it after a newer router "
                                       f"replaces it")
                row.status = "archived"
                s.add(row)
                s.flush()
                return self._info(s, adapter, row)

        return _with_write_retries(tx)

    def gc(self, grace_s: float = 600.0) -> dict[str, int]:
        """Delete artifacts nothing live references, and stale temp folders.

        Kept: every ready version, router and frozen domain split, and every version a live
        router covers (archived with force or not). Aliases point at ready versions only.

        Args:
            grace_s: keep anything younger than this, so a writer between storing its
                artifact and committing its version never loses the files.
        """
        if not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
            raise BadInputError(f"invalid gc grace period {grace_s!r}: give a number of seconds >= 0")
        with self._session() as s:
            live = set(s.exec(select(AdapterVersion.location).where(AdapterVersion.status == "ready")).all())
            live |= set(s.exec(select(RouterVersion.location).where(RouterVersion.status == "ready")).all())
            for split in SPLITS:
                column = getattr(Domain, f"{split}_location")
                live |= set(s.exec(select(column).where(column.is_not(None))).all())
            live |= {loc for _, targets in self._coverage(s) for _, loc, _, _ in targets if loc}
        removed = freed = 0
        now = time.time()
        for loc in self.store.locations():
            if loc in live:
                continue
            try:
                if now - self.store.path(loc).stat().st_mtime >= grace_s:
                    freed += self.store.remove(loc)
                    removed += 1
            except FileNotFoundError:  # another gc (another process) removed it first
                continue
        return {"artifacts_removed": removed, "bytes_freed": freed,
                "temp_removed": self.store.remove_stale_temp(grace_s)}

    # ----------------------------------------------------------------- routers
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
        with self._session() as s:
            for ref in covers:
                self._resolve_row(s, ref)
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

    @staticmethod
    def _router_info(row: RouterVersion) -> RouterInfo:
        return RouterInfo(row.id, row.name, row.version, row.kind, row.sha256, row.size_bytes, row.location,
                          json.loads(row.covers_json), json.loads(row.metrics_json), row.status, row.created_at)

    def search_router_versions(self, name: str) -> list[RouterInfo]:
        """Every version of router `name`, oldest first."""
        with self._session() as s:
            rows = s.exec(select(RouterVersion).where(RouterVersion.name == name).order_by(RouterVersion.version)).all()
            return [self._router_info(r) for r in rows]

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

    # ----------------------------------------------------------------- audits
    def create_audit(self, *, domains: list[str], passed: bool, summary: dict[str, Any],
                     report_location: str | None = None, mlflow_run_id: str | None = None,
                     covers: list[str] | None = None) -> AuditInfo:
        """Record an audit.

        Args:
            covers: exact refs of the versions the audit judged, kept as the summary's
                `covers`; the production gate reads it together with the audit's figures.
        """
        if covers is not None:
            summary = {**summary, "covers": list(covers)}

        def tx():
            with self._session(write=True) as s:
                row = Audit(domains_json=json.dumps(domains), passed=passed, summary_json=json.dumps(summary),
                            report_location=report_location, mlflow_run_id=mlflow_run_id)
                s.add(row)
                s.flush()
                return self._audit_info(row)

        return _with_write_retries(tx)

    @staticmethod
    def _audit_info(row: Audit) -> AuditInfo:
        return AuditInfo(row.id, row.created_at, json.loads(row.domains_json), row.passed,
                         json.loads(row.summary_json), row.report_location, row.mlflow_run_id)

    def get_latest_audit(self) -> AuditInfo | None:
        with self._session() as s:
            row = s.exec(select(Audit).order_by(Audit.id.desc()).limit(1)).first()
            return self._audit_info(row) if row else None

    def search_audits(self) -> list[AuditInfo]:
        with self._session() as s:
            return [self._audit_info(r) for r in s.exec(select(Audit).order_by(Audit.id)).all()]

    # ----------------------------------------------------------------- misc
    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, for before/after comparisons in tests and audits."""
        from sqlmodel import SQLModel

        out = {}
        with self.engine.connect() as conn:
            for table in SQLModel.metadata.sorted_tables:
                rows = conn.execute(table.select().order_by(*table.primary_key.columns)).mappings().all()
                out[table.name] = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
                                   for r in rows]
        return out

    def set_mlflow_run(self, ref: str, run_id: str) -> VersionInfo:
        """Record the MLflow run a version was trained in, then mirror the version (linked to it)."""
        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                row.mlflow_run_id = run_id
                s.add(row)
                s.flush()
                return self._info(s, adapter, row)

        info = _with_write_retries(tx)
        self._mirror(lambda t: t.mirror_version(info, self.store.path(info.location)))
        return info

    def sync_mlflow(self) -> int:
        """Bring MLflow level with the registry (idempotent); returns the versions seen.

        Every ready version and alias is mirrored. A trained version whose run never reached
        MLflow (its tracking failed after it was registered) gets a run rebuilt from what the
        registry holds: its config as params, its metrics, its artifact; the per-step loss
        history lived only in the lost run and is absent (the run is tagged `plait.restored`).
        """
        if not self.tracking_uri:
            raise BadInputError("this workspace has no MLflow tracking URI; set tracking_uri in plait.toml")
        versions = self.search_versions()
        for info in versions:
            trained = any(p["relation"] in ("trained-from-base", "warm-start") for p in info.parents)
            if info.mlflow_run_id is None and trained and "steps" in info.config:
                info = self._restore_run(info)
            self.tracking.mirror_version(info, self.store.path(info.location))
            for alias in info.aliases:
                self.tracking.mirror_alias(info.name, alias, info.version)
        return len(versions)

    def _restore_run(self, info: VersionInfo) -> VersionInfo:
        """Log a trained version's run from what the registry holds, and link the version to it."""
        from registry.tracking import TRAIN_EXPERIMENT

        metrics = {m["name"]: m["value"] for m in self.get_metrics(info.ref)
                   if m["audit_id"] is None and m["eval_domain"] == info.domain}
        params = {"domain": info.domain, "name": info.name, "base_fingerprint": info.base_fingerprint,
                  "data_fingerprint": info.data_fingerprint,
                  **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in info.config.items()}}
        _, path = self.artifact_path(info)  # hash-checked: the run gets the registered bytes
        with self.tracking.run(TRAIN_EXPERIMENT, f"{info.name}-{info.domain}", params,
                               tags={"plait.domain": info.domain, "plait.kind": info.kind,
                                     "plait.restored": "sync-mlflow"}) as run:
            run.log_metrics(metrics, step=int(info.config["steps"]))
            run.log_artifacts(path, "adapter")
        return self.set_mlflow_run(info.ref, run.run_id)

    def _mirror(self, fn) -> None:
        """Mirror into MLflow; the registry stays the system of record, so failures only warn."""
        if not self.tracking_uri:
            return
        try:
            fn(self.tracking)
        except Exception as e:  # noqa: BLE001 - MLflow is a mirror, never a reason to fail a write
            import warnings

            warnings.warn(f"MLflow mirror failed ({type(e).__name__}: {e}); the registry is unchanged "
                          f"and `plait registry sync-mlflow` mirrors it again", stacklevel=2)
