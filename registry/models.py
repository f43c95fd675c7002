"""The registry's tables (SQLModel). Engine and sessions live in `registry.db`.

    Domain ─< Adapter ─< AdapterVersion ─< Metric
                 │             │  ╲
                 └─< Alias ────┘   Lineage (child -> parent version, or -> base fingerprint)
    RouterVersion (artifact bound to a set of adapter versions)   Audit (forgetting audits)
    SchemaVersion (`plait_schema_version`: which migration the database is at; see registry.db)

Version numbers are unique per adapter (a unique constraint; writers retry on conflict).
An alias points at one version of its adapter; every move is kept in AliasEvent so a
rollback knows where the alias was before.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Domain(SQLModel, table=True):
    """A data domain (legal, medical, ...). `position` is the order domains were added in."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    position: int = Field(index=True)
    description: str = ""
    # the domain's frozen evaluation set (a JSONL artifact in the store), so every later
    # audit measures the domain on exactly the rows it was first measured on
    eval_sha256: str | None = None
    eval_location: str | None = None
    eval_rows: int | None = None
    # its frozen validation set (schema 2): disjoint from the eval set, never trained on; the
    # router calibrates on it and the continual loop chooses which version serves the domain by it
    validation_sha256: str | None = None
    validation_location: str | None = None
    validation_rows: int | None = None
    # its first training rows, kept so baselines (sequential fine-tuning) can be rebuilt later
    train_sha256: str | None = None
    train_location: str | None = None
    train_rows: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Adapter(SQLModel, table=True):
    """A named line of adapter versions for one domain and one kind."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    domain_id: int = Field(foreign_key="domain.id", index=True)
    kind: str = Field(index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class AdapterVersion(SQLModel, table=True):
    """One immutable adapter artifact with its provenance."""

    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_version"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    version: int
    base_fingerprint: str = Field(index=True, max_length=80)
    config_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    sha256: str = Field(index=True, max_length=64)
    size_bytes: int
    location: str  # relative to the artifact store root
    data_fingerprint: str | None = None
    mlflow_run_id: str | None = None
    status: str = Field(default="ready", index=True, max_length=16)  # ready | archived
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class Lineage(SQLModel, table=True):
    """An edge from a version to a parent version, or to the base model it was trained on.

    relation: trained-from-base | warm-start | merge | import. A merge has several edges.
    """

    id: int | None = Field(default=None, primary_key=True)
    child_id: int = Field(foreign_key="adapterversion.id", index=True)
    parent_id: int | None = Field(default=None, foreign_key="adapterversion.id", index=True)
    parent_base: str | None = None  # base fingerprint when the parent is the base model
    relation: str = Field(max_length=32)
    weight: float | None = None  # a merge's coefficient for this parent


class Alias(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("adapter_id", "name", name="uq_alias"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    name: str = Field(max_length=64)
    version_id: int = Field(foreign_key="adapterversion.id", index=True)
    updated_at: datetime = Field(default_factory=utcnow)


class AliasEvent(SQLModel, table=True):
    """History of alias moves, newest last; rollbacks read it."""

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    alias: str = Field(max_length=64)
    version_id: int | None = Field(default=None, foreign_key="adapterversion.id")  # None: deleted
    previous_version_id: int | None = Field(default=None, foreign_key="adapterversion.id")
    at: datetime = Field(default_factory=utcnow)


class Metric(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="adapterversion.id", index=True)
    eval_domain: str | None = Field(default=None, index=True, max_length=64)
    name: str = Field(index=True, max_length=128)
    value: float
    audit_id: int | None = Field(default=None, foreign_key="audit.id", index=True)
    stage: int | None = Field(default=None, index=True)  # continual stage (domains seen - 1) of an audit figure
    created_at: datetime = Field(default_factory=utcnow)


class RouterVersion(SQLModel, table=True):
    """A fitted router: an artifact bound to the exact adapter versions it routes between."""

    __table_args__ = (UniqueConstraint("name", "version", name="uq_router_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    version: int
    kind: str = Field(max_length=64)
    sha256: str = Field(max_length=64)
    size_bytes: int
    location: str
    covers_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))  # adapter version refs
    metrics_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    status: str = Field(default="ready", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)


class MlflowPending(SQLModel, table=True):
    """A registry change MLflow has not mirrored yet (the outbox `registry.sync` drains).

    Written in the same transaction as the change, so a version or alias move is never lost
    to the mirror, whatever happens to the process after its commit. `alias` None: the version
    itself; else the alias, mirrored to wherever it points when the outbox is drained.
    """

    __tablename__ = "mlflow_pending"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="adapterversion.id", index=True)
    alias: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class SchemaVersion(SQLModel, table=True):
    """plait's schema version: one row, written by `registry.db.migrate`.

    Named apart from MLflow's own `alembic_version`, so both may live in one database.
    """

    __tablename__ = "plait_schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int
    updated_at: datetime = Field(default_factory=utcnow)


class Audit(SQLModel, table=True):
    """One forgetting audit; its figures are Metric rows carrying this audit's id."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    domains_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    passed: bool = True
    summary_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    report_location: str | None = None
    mlflow_run_id: str | None = None
