"""A workspace: one base model, one registry database, one MLflow store, one artifact tree.

    .plait/
      plait.toml      base model, database URL, MLflow tracking URI
      registry.db     the registry (SQLite, WAL) unless db_url points elsewhere
      mlflow.db       MLflow runs and the mirrored model registry (created on first use)
      mlartifacts/    MLflow's run artifacts (adapters and audit reports logged to runs)
      artifacts/      the content-addressed artifact store
      checkpoints/    in-progress training checkpoints, one slot per adapter name

`Workspace` is the Python entry point of plait; the CLI is a thin layer over it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from registry.client import Registry
from registry.errors import BadInputError, ConflictError, NotFoundError

DEFAULT_WORKSPACE = ".plait"
CONFIG_FILE = "plait.toml"
#: the registry database password, kept out of plait.toml; it replaces any password in `db_url`
DB_PASSWORD_ENV = "PLAIT_DB_PASSWORD"


def mask_password(url: str) -> str:
    """`url` with its password, if any, shown as `***`: `postgresql://user:***@host/db`.

    Every place plait prints a database URL or tracking URI goes through this, so a
    password never reaches a terminal, a log or `--json` output.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{slash}{tail}"


def _with_env_password(url: str) -> str:
    """`url` with the password from PLAIT_DB_PASSWORD when that is set (any driver)."""
    password = os.environ.get(DB_PASSWORD_ENV)
    if not password or not url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # registry.db reports the bad URL when it opens it
    if not parsed.username:
        raise BadInputError(f"{DB_PASSWORD_ENV} is set but the registry URL {mask_password(url)} names no user; "
                            f"put the user in the URL (postgresql+psycopg2://USER@host/db)")
    return parsed.set(password=password).render_as_string(hide_password=False)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by its owner only (0600): it may hold a password."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class WorkspaceConfig:
    """The settings in `plait.toml`."""

    base_model: str = "smollm2"
    """Base model: a local folder, a .gguf file, a cached Hugging Face id, or `smollm2`."""
    db_url: str = ""
    """SQLAlchemy URL of the registry; empty means `registry.db` in the workspace."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty means `mlflow.db` in the workspace, `none` turns MLflow off."""
    router: str = ""
    """Router kind the continual loop keeps up to date; empty means the default (hybrid)."""
    repoint_margin: float = 0.01
    """Nats of validation loss a new version must gain on an earlier domain before the router
    serves that domain with it (backward transfer; see `plait.continual`); `inf` turns it off."""

    def __post_init__(self):
        m = self.repoint_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or m < 0:
            raise BadInputError(f"setting repoint_margin = {m!r} in {CONFIG_FILE} must be a number of nats >= 0, "
                                f"e.g. repoint_margin = 0.01 (inf turns re-pointing off)")
        self.repoint_margin = float(m)
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if key != "repoint_margin" and not isinstance(value, str):
                raise BadInputError(f"setting {key} = {value!r} in {CONFIG_FILE} must be a string, e.g. "
                                    f"{key} = \"...\"; fix it or re-create the workspace with `plait init`")

    def masked(self) -> dict[str, str]:
        """The settings with any password in a URL shown as `***`, for messages and output."""
        return {k: mask_password(v) if isinstance(v := getattr(self, k), str) else v for k in self.__dataclass_fields__}

    def to_toml(self) -> str:
        lines = ["# plait workspace settings (see `plait init --help`)"]
        for key, value in (("base_model", self.base_model), ("db_url", self.db_url),
                           ("tracking_uri", self.tracking_uri), ("router", self.router),
                           ("repoint_margin", self.repoint_margin)):
            text = ("inf" if value == math.inf else repr(value)) if isinstance(value, float) else json.dumps(value)
            lines.append(f"{key} = {text}")  # JSON strings are valid TOML basic strings; floats in TOML's spelling
        return "\n".join(lines) + "\n"


class Workspace:
    """An existing workspace folder.

    Args:
        path: the workspace folder (default `$PLAIT_WORKSPACE` or `./.plait`).

    Raises:
        NotFoundError: there is no `plait.toml` in `path`.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path or os.environ.get("PLAIT_WORKSPACE") or DEFAULT_WORKSPACE).expanduser().absolute()
        cfg_file = self.path / CONFIG_FILE
        if not cfg_file.is_file():
            raise NotFoundError(f"no plait workspace at {self.path}; create one with `plait init --workspace {self.path}`")
        try:
            raw = tomllib.loads(cfg_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadInputError(f"{cfg_file} is not valid TOML ({e}); fix or re-create it with `plait init`") from None
        known = set(WorkspaceConfig.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise BadInputError(f"{cfg_file} has unknown setting(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(known))}")
        self.config = WorkspaceConfig(**raw)

    @classmethod
    def init(cls, path: str | os.PathLike | None = None, *, base_model: str = "smollm2", db_url: str = "",
             tracking_uri: str = "") -> Workspace:
        """Create a workspace (or open it again when it exists with the same settings).

        Raises:
            ConflictError: the folder is a workspace with other settings.
        """
        root = Path(path or os.environ.get("PLAIT_WORKSPACE") or DEFAULT_WORKSPACE).expanduser().absolute()
        base = str(base_model)
        if Path(base).expanduser().exists():  # a local path: store it absolute so the workspace can move
            base = str(Path(base).expanduser().resolve())
        config = WorkspaceConfig(base_model=base, db_url=db_url, tracking_uri=tracking_uri)
        cfg_file = root / CONFIG_FILE
        if cfg_file.is_file():
            existing = cls(root)
            config.repoint_margin = existing.config.repoint_margin  # a tuned setting is not another workspace
            if existing.config != config:
                raise ConflictError(f"{root} is already a workspace with other settings ({existing.config.masked()}); "
                                    f"edit {cfg_file} or choose another --workspace")
            with contextlib.suppress(OSError):  # a workspace made before plait wrote it 0600
                cfg_file.chmod(0o600)
            existing.registry  # noqa: B018 - a damaged database is reported now, not "ready"
            return existing
        root.mkdir(parents=True, exist_ok=True)
        (root / "artifacts").mkdir(exist_ok=True)
        _write_private(cfg_file, config.to_toml())
        try:
            ws = cls(root)
            ws.registry  # noqa: B018 - creates the database schema now, not on first use
        except BaseException:
            cfg_file.unlink()  # a bad --db leaves no half-made workspace behind to trip the next command
            raise
        return ws

    # ----------------------------------------------------------------- settings
    @property
    def db_url(self) -> str:
        """The registry URL to connect with: `db_url`, with the password from PLAIT_DB_PASSWORD
        when that is set. It may hold a password: print `describe()` or `mask_password(...)`."""
        return _with_env_password(self.config.db_url) or f"sqlite:///{self.path / 'registry.db'}"

    @property
    def tracking_uri(self) -> str | None:
        uri = self.config.tracking_uri
        if uri.lower() == "none":
            return None
        return uri or f"sqlite:///{self.path / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.path / "artifacts"

    @cached_property
    def registry(self) -> Registry:
        """The workspace's registry (opened on first use)."""
        return Registry(self.db_url, self.artifact_root, tracking_uri=self.tracking_uri, defer_mirror=True)

    @cached_property
    def router_kind(self) -> str:
        """The `router` setting; when empty, the default kind, except in a workspace that
        already has a router of the previous default (`embedding`) and none of the current
        one: it keeps routing as it was built."""
        from routing.routers import DEFAULT_ROUTER, LEGACY_DEFAULT_ROUTERS

        if self.config.router:
            return self.config.router
        for kind in (DEFAULT_ROUTER, *LEGACY_DEFAULT_ROUTERS):
            try:
                self.registry.get_router(kind)
                return kind
            except NotFoundError:
                continue
        return DEFAULT_ROUTER

    @cached_property
    def routed_model(self):
        """The base with the router and adapters (`plait.service.RoutedModel`), loaded on first use."""
        from plait.service import RoutedModel

        return RoutedModel(self)

    def add_domain(self, domain: str, data, eval_data=None, *, audit: bool = True, log=None, **train_options):
        """Train a new domain and fold it into the system (see `plait.continual.add_domain`).

        Args:
            log: called with one line per domain re-pointed to the new version (None: silent).
            train_options: `training.trainer.TrainConfig` fields (method, steps, rank, ...); `init`
                defaults to auto (start from the best related registered version, see
                `training.warmstart`) unless `from_ref` is given.
        """
        from plait.continual import add_domain
        from training.trainer import TrainConfig

        if train_options.get("from_ref") is None:
            train_options.setdefault("init", "auto")
        result = add_domain(self, domain, data, eval_data, TrainConfig(**train_options), audit=audit, log=log)
        if result is not None and "routed_model" in self.__dict__:
            self.routed_model.refresh()
        return result

    def route(self, texts: list[str], top_k: int = 1) -> list[dict]:
        """Per input: {domain, adapters [{ref, domain, weight}], scores, confidence}."""
        return [s.to_dict() for s in self.routed_model.route(list(texts), top_k=top_k)]

    def generate(self, texts: list[str], model: str = "auto", **options) -> list[dict]:
        """Generate for every input in one mixed-adapter batch: {text, model, domain, adapters}."""
        return [{"text": text, **s.to_dict()} for text, s in self.routed_model.generate(list(texts), model, **options)]

    @cached_property
    def base_fingerprint(self) -> str:
        """Fingerprint of the workspace's base model (hashing its weights once; cached)."""
        from training.base import fingerprint

        return fingerprint(self.config.base_model)

    def describe(self) -> dict[str, Any]:
        """The workspace's settings for output; passwords in URLs are shown as `***`."""
        return {"workspace": str(self.path), "base_model": self.config.base_model,
                "db_url": mask_password(self.db_url), "tracking_uri": self.tracking_uri and mask_password(self.tracking_uri),
                "artifacts": str(self.artifact_root)}
