"""Schema versions: a workspace made before schema versioning (commit d552cdf, committed as
`tests/fixtures/v1_workspace`) opens with today's code, is upgraded, and keeps every version,
alias, router and audit; SQLite keeps a backup of the old file; a newer schema is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, text

from registry import db
from registry.client import Registry
from registry.errors import BadInputError, NotFoundError

FIXTURE = Path(__file__).parent / "fixtures" / "v1_workspace"
TIMES = {"created_at", "updated_at", "at"}  # compared apart: PostgreSQL and SQLite print them differently


def _load_v1(db_url: str, tmp_path: Path) -> Path:
    """Put the fixture's schema-1 database at `db_url` (a file copy, or a table-by-table copy into
    PostgreSQL) and its artifacts under tmp_path; returns the artifact root."""
    artifacts = tmp_path / "v1-artifacts"
    shutil.copytree(FIXTURE / "artifacts", artifacts)
    if db_url.startswith("sqlite"):
        shutil.copyfile(FIXTURE / "registry.db", db_url.removeprefix("sqlite:///"))
        return artifacts
    src, dst = create_engine(f"sqlite:///{FIXTURE / 'registry.db'}"), create_engine(db_url)
    meta = MetaData()
    meta.reflect(src)
    for table in meta.tables.values():
        for col in table.columns:
            col.type = col.type.as_generic()
    meta.create_all(dst)
    with src.connect() as a, dst.begin() as b:
        for table in meta.sorted_tables:
            rows = [dict(r) for r in a.execute(table.select()).mappings()]
            if rows:
                b.execute(table.insert(), rows)
                b.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                               f"(SELECT max(id) FROM {table.name}))"))
    src.dispose()
    dst.dispose()
    return artifacts


def _rows(dump: dict, table: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in dump[table]]


def test_v1_workspace_upgrades_and_keeps_every_row(db_url, tmp_path):
    artifacts = _load_v1(db_url, tmp_path)
    old = create_engine(db_url)
    assert db.schema_version(old) == 1  # plait's tables, no version table
    old.dispose()
    before = json.loads((FIXTURE / "dump.json").read_text())

    reg = Registry(db_url, artifacts)
    assert db.schema_version(reg.engine) == db.SCHEMA_VERSION == 2
    after = reg.dump()
    assert after["plait_schema_version"][0]["version"] == 2
    for table in before:  # every row of every table kept, every old column unchanged
        new = [{k: r[k] for k in old_row} for r, old_row in zip(_rows(after, table), _rows(before, table))]
        assert new == _rows(before, table), table
        assert len(after[table]) == len(before[table])
    assert [d["validation_sha256"] for d in after["domain"]] == [None, None]  # new columns, empty

    assert [v.ref for v in reg.search_versions()] == ["cats:1", "cats:2", "imported:1", "law:1"]
    assert reg.get_version("cats@production").ref == "cats:2"
    assert reg.get_version("law@production").ref == "law:1"
    assert reg.get_version("imported:1").parents[0]["relation"] == "import"
    routers = reg.search_routers()
    assert [(r.ref, r.covers) for r in routers] == [("hybrid:1", ["cats:1"]), ("hybrid:2", ["cats:1", "law:1"]),
                                                    ("hybrid:3", ["cats:2", "law:1"])]
    (audit,) = reg.search_audits()
    assert audit.domains == ["cats", "law"] and audit.summary == json.loads(before["audit"][0]["summary_json"])
    report = reg.verify()  # every artifact, then one coverage row per live router
    assert all(r["ok"] for r in report) and len([r for r in report if not r["ref"].startswith("coverage of")]) == 11
    assert reg.get_domain_eval("cats") == [json.loads(line) for line in (FIXTURE / "artifacts").joinpath(
        before["domain"][0]["eval_location"], "eval.jsonl").read_text().splitlines()]

    # the upgraded registry works as a new one: the rollback history, and the new split
    assert reg.rollback_alias("cats", "production").ref == "cats:1"
    with pytest.raises(NotFoundError, match="domain 'cats' has no validation set yet"):
        reg.get_domain_rows("cats", "validation")
    reg.set_domain_rows("cats", "validation", [{"text": "a held-out cat"}])
    assert reg.get_domain_rows("cats", "validation") == [{"text": "a held-out cat"}]
    assert reg.register_version("law", domain="law", kind="lora", files={"a.txt": b"x"},
                                base_fingerprint="b").ref == "law:2"
    reg.close()

    again = Registry(db_url, artifacts)  # opening again migrates nothing
    assert db.schema_version(again.engine) == 2 and len(again.search_versions()) == 5
    again.close()


def test_sqlite_upgrade_keeps_a_backup_of_the_old_file(tmp_path):
    import sqlite3

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    artifacts = _load_v1(url, tmp_path)
    Registry(url, artifacts).close()
    backup = tmp_path / "registry.db.bak-1"
    with sqlite3.connect(f"file:{backup}?immutable=1", uri=True) as conn:  # the old database, as it was
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(domain)")}
        versions = conn.execute("SELECT count(*) FROM adapterversion").fetchone()[0]
    assert "plait_schema_version" not in tables and "adapterversion" in tables and versions == 4
    assert "validation_sha256" not in columns
    Registry(url, artifacts).close()  # a second open neither migrates nor backs up again
    assert sorted(p.name for p in tmp_path.iterdir() if ".bak" in p.name) == ["registry.db.bak-1"]


def test_a_newer_schema_is_refused_with_what_to_do(db_url, tmp_path):
    reg = Registry(db_url, tmp_path / "artifacts")
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE plait_schema_version SET version = 99"))
    reg.close()
    with pytest.raises(BadInputError, match=r"has schema version 99, newer than this plait's 2: it was written by a "
                                            r"newer plait; upgrade plait"):
        Registry(db_url, tmp_path / "artifacts")


def test_a_fresh_database_starts_at_the_current_version(db_url, tmp_path):
    reg = Registry(db_url, tmp_path / "artifacts")
    assert db.schema_version(reg.engine) == db.SCHEMA_VERSION
    assert reg.dump()["plait_schema_version"][0]["version"] == db.SCHEMA_VERSION
    reg.close()
