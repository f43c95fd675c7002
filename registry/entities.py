"""The registry's value objects: plain dataclasses detached from the database.

As in MLflow's `mlflow/entities/model_registry/`, these are what the `Registry` facade
returns, so callers never hold a database session; `registry.tracking` mirrors them into
MLflow and imports them from here, not from the facade.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


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
    """One adapter at a glance: its ready-version count, newest version and aliases."""

    name: str
    domain: str
    kind: str
    versions: int
    latest: int | None
    aliases: dict[str, int]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        # by hand, not `asdict` (a deep copy of every field): `plait registry list` makes thousands
        return {"name": self.name, "domain": self.domain, "kind": self.kind, "versions": self.versions,
                "latest": self.latest, "aliases": dict(self.aliases), "created_at": self.created_at.isoformat()}


@dataclass
class RouterInfo:
    """A registered router version and the exact adapter refs it covers, detached from the database."""

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
    """A recorded audit: the domains it judged, whether it passed, and its summary."""

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
