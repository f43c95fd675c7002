"""The registry's link to MLflow: recording a version's run and bringing MLflow level with the
registry (the registry stays the system of record; `RegistryContext._mirror` only warns).
"""

from __future__ import annotations

import json

from registry.context import RegistryContext, _with_write_retries
from registry.entities import VersionInfo
from registry.errors import BadInputError


class MlflowSync(RegistryContext):
    """The `Registry` part that mirrors into MLflow."""

    def set_mlflow_run(self, ref: str, run_id: str) -> VersionInfo:
        """Record the MLflow run a version was trained in, then mirror the version (linked to it)."""
        def tx():
            with self._session(write=True) as s:
                adapter, row = self._resolve_row(s, ref)
                row.mlflow_run_id = run_id
                s.add(row)
                self._queue_mirror(s, row.id)
                s.flush()
                return self._info(s, adapter, row)

        info = _with_write_retries(tx)
        self._mirror_queued()
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
            if self._run_missing(info):
                info = self._restore_run(info)
            self.tracking.mirror_version(info, self.store.path(info.location))
            for alias in info.aliases:
                self.tracking.mirror_alias(info.name, alias, info.version)
        self.drain_mlflow()  # what was queued is mirrored now: empty the queue
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
