"""Engine and sessions for the registry database (any SQLAlchemy URL).

SQLite is the default: WAL journal (readers never block the writer), a busy timeout, and
write transactions opened with `BEGIN IMMEDIATE` so two writers queue on the lock instead
of failing when a read transaction tries to upgrade. PostgreSQL works through the same
code; there the version-number race is settled by the unique constraint plus a retry.

The schema carries a version (`plait_schema_version`); a database made by an older plait is
migrated when it opens (`create_schema`; a SQLite file is backed up first), one made by a
newer plait is refused with a message saying to upgrade plait.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlmodel import Session, SQLModel, create_engine

from registry import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from registry.errors import BadInputError

BUSY_TIMEOUT_S = 60


def make_engine(url: str) -> Engine:
    """Create an engine for `url` with plait's SQLite settings where it is SQLite.

    Raises:
        BadInputError: the URL does not parse, or names a database whose driver is missing.
    """
    if not isinstance(url, str) or not url:
        raise BadInputError(f"invalid registry database URL {url!r}: use a SQLAlchemy URL such as "
                            f"sqlite:///path/registry.db or postgresql+psycopg2://user@host/db")
    try:
        return _make_engine(url)
    except (ArgumentError, ImportError) as e:
        raise BadInputError(f"invalid registry database URL {url!r} ({type(e).__name__}: {e}); use a SQLAlchemy "
                            f"URL such as sqlite:///path/registry.db or postgresql+psycopg2://user@host/db") from None


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")  # first: the WAL switch may wait
            if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            mode = "IMMEDIATE" if conn.get_execution_options().get("plait_write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """Create a fresh database's tables, or bring an older plait database up to `SCHEMA_VERSION`.

    The check is two cheap queries when the schema is current. Creation and migration run in
    one write transaction (SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so several
    processes opening the same database at once queue instead of failing with "database is
    locked", and the second finds the work done. A SQLite file is copied to
    `<file>.bak-<old version>` before it is migrated.

    Raises:
        BadInputError: the database was written by a newer plait (its schema version is higher).
    """
    with translate_db_errors(engine):
        current = schema_version(engine)
        if current == SCHEMA_VERSION and set(SQLModel.metadata.tables) <= set(inspect(engine).get_table_names()):
            return
        _check_not_newer(engine, current)
        if current is not None and current < SCHEMA_VERSION:
            backup_sqlite(engine, current)
        with engine.execution_options(plait_write=True).begin() as conn:
            if engine.dialect.name == "postgresql":  # concurrent CREATE TABLEs race on the catalog
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7471)")
            _migrate(conn)


# ----------------------------------------------------------------------------- schema versions
#
# Why a short list of steps and not an Alembic script folder: plait's migrations are a few
# additive changes that must run inside plait's own locked write transaction when a registry
# opens, and ship inside the package with nothing to configure. Each step uses Alembic's
# `Operations` for the DDL (portable across SQLite and PostgreSQL; `batch_alter_table` when a
# later step needs SQLite's copy-and-move), and the version lives in plait's own table,
# `plait_schema_version`, never in `alembic_version`, which MLflow owns in a shared database.

#: the schema this code writes; a database at a lower version is migrated when it opens
SCHEMA_VERSION = 2
VERSION_TABLE = models.SchemaVersion.__tablename__


def _add_domain_validation(conn: Connection) -> None:
    """Schema 2: each domain's frozen validation split (sha256, location, row count)."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import Column, Integer, String

    have = {c["name"] for c in inspect(conn).get_columns("domain")}
    op = Operations(MigrationContext.configure(conn))
    for name, type_ in (("validation_sha256", String()), ("validation_location", String()),
                        ("validation_rows", Integer())):
        if name not in have:
            op.add_column("domain", Column(name, type_, nullable=True))


#: (version it brings the schema to, what it does); applied in order to a database below it.
#: Version 1 is the schema before versioning (plait up to commit d552cdf): tables, no version row.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (2, _add_domain_validation),
]


def schema_version(engine_or_conn: Engine | Connection) -> int | None:
    """The database's plait schema version: None for an empty database, 1 for plait's tables
    without a version row (made before schema versioning), else the stored version."""
    tables = set(inspect(engine_or_conn).get_table_names())
    if "domain" not in tables:
        return None
    if VERSION_TABLE not in tables:
        return 1
    ctx = engine_or_conn.connect() if isinstance(engine_or_conn, Engine) else contextlib.nullcontext(engine_or_conn)
    with ctx as conn:
        found = conn.execute(text(f"SELECT version FROM {VERSION_TABLE} WHERE id = 1")).scalar()
    return 1 if found is None else int(found)


def _check_not_newer(engine: Engine, version: int | None) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise BadInputError(
            f"the registry database {engine.url.render_as_string(hide_password=True)} has schema version {version}, "
            f"newer than this plait's {SCHEMA_VERSION}: it was written by a newer plait; upgrade plait "
            f"(pip install -U plait) to open it")


def _migrate(conn: Connection) -> None:
    """Inside the write transaction: create missing tables, run the steps above the stored version."""
    version = schema_version(conn)  # again, under the lock: another process may have migrated
    if version is not None and version > SCHEMA_VERSION:
        _check_not_newer(conn.engine, version)
    SQLModel.metadata.create_all(conn)  # a fresh database, or tables newer than an old one
    for target, step in MIGRATIONS:
        if version is not None and version < target:
            step(conn)
    conn.execute(text(f"DELETE FROM {VERSION_TABLE}"))
    conn.execute(text(f"INSERT INTO {VERSION_TABLE} (id, version, updated_at) VALUES (1, :v, :t)"),
                 {"v": SCHEMA_VERSION, "t": models.utcnow()})


def backup_sqlite(engine: Engine, version: int) -> Path | None:
    """Copy a SQLite registry to `<file>.bak-<version>` (once; an existing backup is kept).

    Uses SQLite's online backup, so the copy is consistent even with a WAL beside the file.
    Returns the backup's path (None for in-memory databases and other dialects).
    """
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return None
    src = Path(engine.url.database)
    dest = src.with_name(f"{src.name}.bak-{version}")
    if dest.exists() or not src.exists():
        return dest if dest.exists() else None
    tmp = dest.with_name(dest.name + ".tmp")
    with contextlib.closing(sqlite3.connect(src, timeout=BUSY_TIMEOUT_S)) as a, \
            contextlib.closing(sqlite3.connect(tmp)) as b:
        a.backup(b)
        b.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, whatever the source's journal
    os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def translate_db_errors(engine: Engine) -> Iterator[None]:
    """Turn 'this is not a database' failures into one clear PlaitError line."""
    try:
        yield
    except (DatabaseError, OperationalError) as e:
        text = str(e.orig if hasattr(e, "orig") else e)
        if "not a database" in text or "malformed" in text or "file is encrypted" in text:
            raise BadInputError(
                f"the registry database {engine.url.render_as_string(hide_password=True)} is not a readable "
                f"database ({text}); restore it from a backup or use another database URL") from None
        if "unable to open database" in text or "could not connect" in text or "Connection refused" in text:
            raise BadInputError(
                f"cannot open the registry database {engine.url.render_as_string(hide_password=True)} ({text}); "
                f"check the URL and that the server is running") from None
        raise


@contextlib.contextmanager
def session(engine: Engine, write: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    Args:
        write: open the transaction for writing (`BEGIN IMMEDIATE` on SQLite).
    """
    bind = engine.execution_options(plait_write=True) if write else engine
    with translate_db_errors(engine), Session(bind, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
