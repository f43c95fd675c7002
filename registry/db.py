"""Engine and sessions for the registry database (any SQLAlchemy URL).

SQLite is the default: WAL journal (readers never block the writer), a busy timeout, and
write transactions opened with `BEGIN IMMEDIATE` so two writers queue on the lock instead
of failing when a read transaction tries to upgrade. PostgreSQL works through the same
code; there the version-number race is settled by the unique constraint plus a retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
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
    """Create every table that does not exist yet.

    The check is one cheap query when the schema is complete; creation runs in a write
    transaction so several processes opening a fresh database at once queue instead of
    failing with "database is locked".
    """
    with translate_db_errors(engine):
        if set(SQLModel.metadata.tables) <= set(inspect(engine).get_table_names()):
            return
        with engine.execution_options(plait_write=True).begin() as conn:
            if engine.dialect.name == "postgresql":  # concurrent CREATE TABLEs race on the catalog
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7471)")
            SQLModel.metadata.create_all(conn)


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
                f"database ({text}); restore it from a backup or point --db at another URL") from None
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
