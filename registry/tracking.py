"""The MLflow link: runs for training, and a mirror of the registry in MLflow's Model Registry.

plait's own registry is the system of record; MLflow is where people look at runs and
versions. Each plait adapter is a registered model of the same name; each version is a model
version tagged with its plait version number, domain, kind, sha256 and base fingerprint;
aliases are mirrored as MLflow aliases. MLflow is imported here only, on first use, so the
CLI starts fast.

The default tracking URI is a SQLite file in the workspace: MLflow 3's file store is in
maintenance mode and refuses to start unless MLFLOW_ALLOW_FILE_STORE is set. MLflow creates
and migrates its schema when a client first opens the database, in every process, with no
lock of its own: jobs that open a fresh `mlflow.db` together fail inside that migration. So
every opening of a SQLite store holds a file lock (`mlflow.db.lock`) while MLflow checks its
schema; the first process to need MLflow creates the store (not `plait init`, which stays fast). Run artifacts go where the experiment
says; plait creates its experiments with their artifact location inside the workspace
(`mlartifacts/<experiment>`), not MLflow's default `./mlruns` of whatever folder plait runs in.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.entities import VersionInfo

TRAIN_EXPERIMENT = "plait-train"
AUDIT_EXPERIMENT = "plait-audit"
#: tracking URIs whose server decides where run artifacts go; any other (a database URI) writes
#: them to the experiment's artifact location from this process
_SERVER_SCHEMES = ("http://", "https://", "databricks")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite tracking database (nothing for other URIs)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db_file = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/path -> /abs/path
    db_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{db_file}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel when the process dies
        yield
    finally:
        os.close(fd)


class Tracking:
    """A thin wrapper over `mlflow.MlflowClient` for one tracking URI.

    Args:
        uri: the MLflow tracking (and model registry) URI.
        artifact_root: where the experiments plait creates keep their run artifacts (a folder
            in the workspace); ignored for a tracking server, which decides that itself.
    """

    def __init__(self, uri: str, artifact_root: Path | None = None):
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # after the import: mlflow configures its logger on import
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = uri
        self.is_server = uri.startswith(_SERVER_SCHEMES)
        self.artifact_root = Path(artifact_root) if artifact_root is not None and not self.is_server else None
        with _store_lock(uri):  # the client creates or migrates the schema as it opens the store
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            if not self.is_server:
                self.client.search_registered_models(max_results=1)  # opens the model registry store too

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created with its artifacts under `artifact_root` if new.

        An experiment that exists keeps the artifact location it was created with (MLflow
        cannot move it): a workspace made before plait chose the location keeps writing there.
        """
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.artifact_root / name).as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by another process in between
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # ----------------------------------------------------------------- model registry mirror
    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name, tags={"plait": "adapter"})
            except MlflowException:  # created concurrently
                self.client.get_registered_model(name)

    def _find(self, name: str, version: int):
        found = self.client.search_model_versions(f"name='{name}' and tags.plait_version='{version}'")
        return found[0] if found else None

    def mirror_version(self, info: VersionInfo, source: Path) -> str:
        """Create the MLflow model version for a plait version (once); returns its MLflow number."""
        self._ensure_model(info.name)
        existing = self._find(info.name, info.version)
        if existing is not None:
            return existing.version
        tags = {"plait_version": str(info.version), "domain": info.domain, "kind": info.kind,
                "sha256": info.sha256, "base_fingerprint": info.base_fingerprint, "plait_ref": info.ref}
        mv = self.client.create_model_version(info.name, source=Path(source).as_uri(), run_id=info.mlflow_run_id,
                                              tags=tags, description=info.description or None)
        return mv.version

    def mirror_alias(self, name: str, alias: str, version: int) -> None:
        """Point the MLflow alias at the model version that mirrors plait's `version`."""
        mv = self._find(name, version)
        if mv is not None:
            self.client.set_registered_model_alias(name, alias, mv.version)

    # ----------------------------------------------------------------- runs
    @contextlib.contextmanager
    def run(self, experiment: str, run_name: str, params: dict[str, Any] | None = None,
            tags: dict[str, str] | None = None) -> Iterator[TrackedRun]:
        """An MLflow run that ends FINISHED on success and FAILED on error."""
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags or {})
        tracked = TrackedRun(self.client, run.info.run_id)
        if params:
            tracked.log_params(params)
        try:
            yield tracked
        except BaseException:
            self.client.set_terminated(run.info.run_id, status="FAILED")
            raise
        self.client.set_terminated(run.info.run_id, status="FINISHED")


class TrackedRun:
    """The run handle the trainer and the audit log into."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)
