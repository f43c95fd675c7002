"""What every part of the registry shares: the engine, the artifact store, the MLflow link, and
the row helpers (resolve a reference, build a `VersionInfo`, lock a version, retry a write).

`RegistryContext` is the base of each focused part (`registry.domains`, `registry.versions`,
...); `registry.client.Registry` composes the parts into the one facade.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from registry import db
from registry.entities import VersionInfo
from registry.errors import BadInputError, ConflictError, NotFoundError
from registry.models import Adapter, AdapterVersion, Alias, Domain, Lineage, MlflowPending
from registry.names import Ref, parse_ref, validate_name
from registry.store import ArtifactStore

RELATIONS = ("trained-from-base", "warm-start", "merge", "import")
#: a domain's frozen row sets: `eval` (audits only), `validation` (router calibration and the
#: choice of which version serves the domain), `train` (its first training rows, for baselines)
SPLITS = ("eval", "validation", "train")
#: the alias the audit gate guards (`set_alias`, `rollback_alias`)
PRODUCTION = "production"
_WRITE_RETRIES = 20


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


class RegistryContext:
    """The state and row helpers the registry's parts share.

    Args:
        db_url: any SQLAlchemy URL; `sqlite:///path/registry.db` by default in a workspace.
        artifact_root: folder of the content-addressed artifact store.
        tracking_uri: MLflow tracking URI to mirror versions and aliases into, or None.
        defer_mirror: queue the MLflow mirror of a new version or alias move instead of writing
            it at once, until this process opens MLflow for something else (a run) or calls
            `drain_mlflow`; a command that only registers or moves an alias then never pays
            for importing MLflow and opening its store (several seconds). The CLI defers.
    """

    def __init__(self, db_url: str, artifact_root: Path, tracking_uri: str | None = None,
                 defer_mirror: bool = False):
        self.db_url = db_url
        self.engine = db.make_engine(db_url)
        db.create_schema(self.engine)
        self.store = ArtifactStore(Path(artifact_root))
        self._tracking = None
        self.tracking_uri = tracking_uri
        self.defer_mirror = defer_mirror

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
                                f"version for domain {domain!r} needs another adapter name")

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

    # ----------------------------------------------------------------- the MLflow outbox
    def _queue_mirror(self, s: Session, version_id: int, alias: str | None = None) -> None:
        """Queue a version (or an alias of it) for MLflow in the caller's write transaction."""
        if self.tracking_uri:
            s.add(MlflowPending(version_id=version_id, alias=alias))

    def _mirror_queued(self) -> None:
        """After a commit that queued a mirror: drain the queue now, unless mirroring is deferred
        and this process has not opened MLflow. The registry stays the system of record, so a
        failing mirror only warns (the queue keeps what was not mirrored)."""
        if not self.tracking_uri or (self.defer_mirror and self._tracking is None):
            return
        try:
            self.drain_mlflow()
        except Exception as e:  # noqa: BLE001 - MLflow is a mirror, never a reason to fail a write
            import warnings

            warnings.warn(f"MLflow mirror failed ({type(e).__name__}: {e}); the registry is unchanged "
                          f"and `plait registry sync-mlflow` mirrors it again", stacklevel=3)

    def pending_mirrors(self, ref: str | None = None) -> int:
        """How many queued changes MLflow has not mirrored yet (of version `ref` and its aliases
        when given)."""
        with self._session() as s:
            q = select(func.count()).select_from(MlflowPending)
            if ref is not None:
                q = q.where(MlflowPending.version_id == self._resolve_row(s, ref)[1].id)
            return s.exec(q).one()

    def drain_mlflow(self) -> int:
        """Mirror the queued versions and alias moves into MLflow, oldest first; returns how many.

        An alias is mirrored to where it points now. A trained version whose run is not yet
        linked (its logging failed) stays queued: `sync_mlflow` logs its run first.
        """
        if not self.tracking_uri:
            return 0
        with self._session() as s:
            queued = [(p.id, p.version_id, p.alias) for p in s.exec(select(MlflowPending).order_by(MlflowPending.id))]
        done: list[int] = []
        mirrored: set[tuple[int, str | None]] = set()
        try:
            for pid, version_id, alias in queued:
                if (version_id, alias) not in mirrored and not self._mirror_one(version_id, alias):
                    continue
                mirrored.add((version_id, alias))
                done.append(pid)
        finally:
            if done:
                with self._session(write=True) as s:
                    for row in s.exec(select(MlflowPending).where(MlflowPending.id.in_(done))):
                        s.delete(row)
        return len(mirrored)

    @staticmethod
    def _run_missing(info: VersionInfo) -> bool:
        """A trained version whose MLflow run was never linked (its logging failed)."""
        trained = any(p["relation"] in ("trained-from-base", "warm-start") for p in info.parents)
        return info.mlflow_run_id is None and trained and "steps" in info.config

    def _mirror_one(self, version_id: int, alias: str | None) -> bool:
        """Mirror one queued entry; False leaves it queued (a trained version without its run)."""
        with self._session() as s:
            row = s.get(AdapterVersion, version_id)
            adapter = s.get(Adapter, row.adapter_id)
            info = self._info(s, adapter, row)
            target = None
            if alias is not None:
                pointer = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)).first()
                target = pointer and s.get(AdapterVersion, pointer.version_id).version
        if alias is None:
            if self._run_missing(info):
                return False
            self.tracking.mirror_version(info, self.store.path(info.location))
        elif target is not None:
            self.tracking.mirror_alias(info.name, alias, target)
        return True
