"""Shared fixtures: tiny real models and adapters, real SQLite registries and workspaces."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.tiny import make_peft_lora, make_tiny_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_loras(tiny_base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [make_peft_lora(tiny_base, root / f"lora-{i}", seed=100 + i) for i in range(4)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The registry database URL: a SQLite file, and a fresh PostgreSQL database where a server is up."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def registry(db_url, tmp_path):
    from registry.client import Registry

    reg = Registry(db_url, tmp_path / "artifacts")
    yield reg
    reg.close()


@pytest.fixture
def workspace(tmp_path, tiny_base, monkeypatch):
    """A real workspace on the tiny base with MLflow off (tests that need MLflow turn it on)."""
    from plait.workspace import Workspace

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    return Workspace.init(tmp_path / "ws", base_model=str(tiny_base), tracking_uri="none")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, for before/after comparisons."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def postgres_url():
    """A fresh database on the PostgreSQL server named by PLAIT_TEST_POSTGRES_URL (skipped without one).

    `.ci/run` starts a real server and sets the variable, so CI always runs these tests.
    """
    import uuid

    base = os.environ.get("PLAIT_TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("PLAIT_REQUIRE_POSTGRES"):
            pytest.fail("PLAIT_REQUIRE_POSTGRES is set but PLAIT_TEST_POSTGRES_URL is not")
        pytest.skip("PLAIT_TEST_POSTGRES_URL is not set (CI sets it after starting PostgreSQL)")
    from sqlalchemy import create_engine, text

    name = f"plait_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
