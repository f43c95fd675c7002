"""`Registry`: the one facade over the registry's tables, artifact store and MLflow link.

Verbs follow MLflow's client: `create_`/`register_`, `get_`, `search_`, `set_`. Every
method opens its own short transaction and returns plain dataclasses (`registry.entities`),
so callers never hold a database session. Writes store the artifact first (atomic,
content-addressed) and then commit the version row, so a version is never visible before
its files are complete; a crash between the two leaves an unreferenced artifact that `gc`
removes.

The facade holds no logic of its own: each concern is one part over the shared
`registry.context.RegistryContext` (engine, store, MLflow link, row helpers), and `Registry`
composes them:

- `registry.domains`: domains and their frozen row splits;
- `registry.versions`: versions, lineage, metrics, verified artifacts, archiving;
- `registry.aliases`: aliases and the production gate;
- `registry.routers`: router versions (compare-and-swap) and which are live;
- `registry.audits`: audit records;
- `registry.maintenance`: PEFT import/export, verify, gc, dump;
- `registry.sync`: the MLflow run link and `sync_mlflow`.

The parts are mixins over one context rather than objects the facade forwards to: every
public method keeps its one signature and docstring where it is implemented, and a class-level
patch of a `Registry` method (as tests do) is what every caller sees. A part reaches another
only through `self`: `archive` and `verify` ask `Routers._live_routers` which routers are live,
`import_peft` calls `register_version`, and `sync_mlflow` reads versions, metrics and artifacts.
"""

from __future__ import annotations

from registry.aliases import Aliases
from registry.audits import Audits
from registry.context import PRODUCTION, RELATIONS, SPLITS
from registry.domains import Domains
from registry.entities import AdapterSummary, AuditInfo, RouterInfo, VersionInfo
from registry.maintenance import Maintenance
from registry.routers import Routers
from registry.sync import MlflowSync
from registry.versions import Versions

__all__ = ["PRODUCTION", "RELATIONS", "SPLITS", "AdapterSummary", "AuditInfo", "Registry", "RouterInfo",
           "VersionInfo"]


class Registry(Domains, Versions, Aliases, Routers, Audits, Maintenance, MlflowSync):
    """The system of record for adapter versions, routers and audits.

    Args:
        db_url: any SQLAlchemy URL; `sqlite:///path/registry.db` by default in a workspace.
        artifact_root: folder of the content-addressed artifact store.
        tracking_uri: MLflow tracking URI to mirror versions and aliases into, or None.
        defer_mirror: queue MLflow mirrors until this process opens MLflow anyway or calls
            `drain_mlflow` (see `RegistryContext`).
    """
