"""Issue 15: what the registry promises under archive + gc, concurrent writers, the production
gate, and malformed safetensors, on a real SQLite file (and PostgreSQL where a server is up).

Live versions (archive refuses them, gc keeps them, verify checks them): aliased versions and
the versions a live router covers. Live routers: the newest version of each router name and,
per name, the newest version covering each number of domains (the audit's stages).
"""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest

from registry.errors import BadInputError, ConflictError, IntegrityError, RefusedError
from tests.conftest import tree_hashes

FP = "sha256:" + "cd" * 32


def _files(tag: str) -> dict[str, bytes]:
    return {"adapter_config.json": b"{}", "adapter_model.safetensors": tag.encode()}


def _version(reg, name: str, tag: str, domain: str | None = None, kind: str = "lora"):
    return reg.register_version(name, domain=domain or name, kind=kind, files=_files(tag), base_fingerprint=FP)


def _router(reg, covers: list[str], name: str = "hybrid"):
    return reg.register_router(name, kind=name, files={"router.json": json.dumps(covers).encode()}, covers=covers)


# ----------------------------------------------------------------- item 2: archive + gc vs live routers
def _grown(reg):
    """law:1, law:2, med:1; router hybrid:1 [law:1], :2 [law:2], :3 [law:2, med:1].

    Live routers: hybrid:3 (newest, served) and hybrid:2 (newest covering one domain: the
    audit's first stage). hybrid:1 is replaced for good: law:1 is free to archive.
    """
    for name, tag in (("law", "l1"), ("law", "l2"), ("med", "m1")):
        _version(reg, name, tag)
    for covers in (["law:1"], ["law:2"], ["law:2", "med:1"]):
        _router(reg, covers)


def test_archive_refuses_versions_a_live_router_covers(registry):
    _grown(registry)
    assert [r.ref for r in registry.live_routers()] == ["hybrid:2", "hybrid:3"]
    with pytest.raises(RefusedError) as err:
        registry.archive("law:2")
    assert "law:2 is covered by live router version(s) hybrid:2, hybrid:3" in str(err.value)
    with pytest.raises(RefusedError, match="hybrid:3"):
        registry.archive("med:1")
    assert registry.get_version("law:2").status == "ready" and registry.get_version("med:1").status == "ready"
    assert registry.archive("law:1").status == "archived"  # only the replaced router hybrid:1 covered it
    law1 = registry.get_version("law:1").location
    out = registry.gc(grace_s=0)
    assert out["artifacts_removed"] == 1 and law1 not in registry.store.locations()
    assert all(r["ok"] for r in registry.verify())


def test_forced_archive_keeps_the_files_and_verify_flags_the_served_router(registry):
    _grown(registry)
    med = registry.archive("med:1", force=True)
    assert med.status == "archived"
    assert registry.gc(grace_s=0)["artifacts_removed"] == 0  # hybrid:3 still covers it: its files stay
    assert med.location in registry.store.locations()
    report = {r["ref"]: r for r in registry.verify()}
    row = report["coverage of router hybrid:3"]
    assert row["ok"] is False and "router hybrid:3 serves med:1, which is archived" in row["error"]
    assert report["coverage of router hybrid:2"]["ok"] is True
    # the audit may still read it (past stages); serving by NAME:V may not
    with pytest.raises(ConflictError, match="adapter version med:1 is archived"):
        registry.artifact_path("med:1")
    info, path = registry.artifact_path("med:1", allow_archived=True)
    assert info.status == "archived" and (path / "adapter_model.safetensors").read_bytes() == b"m1"


def test_verify_fails_when_a_live_router_covers_a_collected_version(registry):
    """The state today's archive + gc leave behind: a served version with no files."""
    from sqlalchemy import text

    _grown(registry)
    med = registry.get_version("med:1")
    with registry.engine.begin() as conn:  # archived behind the router's back, then collected
        conn.execute(text("UPDATE adapterversion SET status = 'archived' WHERE id = :id"), {"id": med.id})
    registry.store.remove(med.location)
    bad = [r for r in registry.verify() if not r["ok"]]
    assert [r["ref"] for r in bad] == ["coverage of router hybrid:3"]
    assert "med:1, which is archived" in bad[0]["error"]


def test_verify_checks_the_files_of_an_archived_version_a_stage_router_covers(registry):
    _grown(registry)
    _version(registry, "law", "l3")
    _router(registry, ["law:3", "med:1"])  # hybrid:4: law:2 now lives on in stage router hybrid:2 only
    registry.archive("law:2", force=True)
    assert all(r["ok"] for r in registry.verify())  # archived, but present: the audit can read it
    weights = registry.store.path(registry.get_version("law:2").location) / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"changed")
    bad = [r for r in registry.verify() if not r["ok"]]
    assert [r["ref"] for r in bad] == ["coverage of router hybrid:2"] and "failed its hash check" in bad[0]["error"]


# ----------------------------------------------------------------- item 3: checks inside the write transaction
def test_a_concurrent_registration_of_another_kind_is_refused_in_the_transaction(registry, monkeypatch):
    """Writer A checked `legal` (absent) and stored its files; writer B creates `legal` as a
    qlora adapter of med before A commits. A must not land as legal:2 of B's adapter."""
    import registry.store as store_mod

    def other_writer(point):
        if point == "registry.before_commit":
            monkeypatch.setattr(store_mod, "_fault_hook", None)
            _version(registry, "legal", "B", domain="med", kind="qlora")

    monkeypatch.setattr(store_mod, "_fault_hook", other_writer)
    with pytest.raises(ConflictError, match="adapter 'legal' is a qlora adapter of domain 'med'"):
        _version(registry, "legal", "A", domain="law", kind="lora")
    assert [(v.ref, v.kind, v.domain) for v in registry.search_versions(name="legal")] == [("legal:1", "qlora", "med")]


def test_a_frozen_eval_set_is_never_overwritten_by_a_concurrent_writer(registry, monkeypatch):
    """Writer A found no eval set and is storing its rows; writer B freezes other rows first."""
    import registry.store as store_mod

    theirs = [{"text": "frozen by B"}]

    def other_writer(point):
        if point == "store.before_rename":
            monkeypatch.setattr(store_mod, "_fault_hook", None)
            registry.set_domain_eval("law", theirs)

    monkeypatch.setattr(store_mod, "_fault_hook", other_writer)
    with pytest.raises(ConflictError, match="domain 'law' already has a frozen eval set"):
        registry.set_domain_eval("law", [{"text": "A's rows"}])
    assert registry.get_domain_eval("law") == theirs


def test_same_rows_frozen_concurrently_both_succeed(registry, monkeypatch):
    import registry.store as store_mod

    rows = [{"text": "the same rows"}]

    def other_writer(point):
        if point == "store.before_rename":
            monkeypatch.setattr(store_mod, "_fault_hook", None)
            registry.set_domain_eval("law", rows)

    monkeypatch.setattr(store_mod, "_fault_hook", other_writer)
    sha = registry.set_domain_eval("law", rows)
    assert registry.set_domain_eval("law", rows) == sha and registry.get_domain_eval("law") == rows


def _backends(pid_conn, n: int, timeout: float = 10.0) -> None:
    """Wait until `n` sessions other than `pid_conn`'s wait on a lock (PostgreSQL)."""
    from sqlalchemy import text

    deadline = time.time() + timeout
    while time.time() < deadline:
        waiting = pid_conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND pid <> pg_backend_pid()")).scalar()
        if waiting >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} session(s) never waited on a lock")


@pytest.mark.postgres
def test_archive_and_alias_of_one_version_do_not_both_succeed(postgres_url, tmp_path):
    """PostgreSQL, READ COMMITTED: set_alias has checked `ready` and waits to write its alias
    (a table lock on aliasevent holds it there); archive runs meanwhile. One of the two must be refused."""
    from sqlalchemy import create_engine, text

    from registry.client import Registry

    reg = Registry(postgres_url, tmp_path / "artifacts")
    _version(reg, "law", "l1")
    _version(reg, "law", "l2")
    blocker = create_engine(postgres_url).connect()
    tx = blocker.begin()
    blocker.execute(text("LOCK TABLE aliasevent IN EXCLUSIVE MODE"))  # set_alias waits at its last write
    results = {}

    def run(what, fn):
        try:
            results[what] = fn()
        except ConflictError as e:
            results[what] = e

    alias = threading.Thread(target=run, args=("alias", lambda: reg.set_alias("law:1", "staging")))
    alias.start()
    watcher = create_engine(postgres_url).connect()
    _backends(watcher, 1)  # set_alias is inside its transaction, past its checks
    archive = threading.Thread(target=run, args=("archive", lambda: reg.archive("law:1")))
    archive.start()
    archive.join(timeout=1.5)  # with the fix it queues behind set_alias's row lock
    tx.rollback()
    blocker.close()
    alias.join(timeout=30)
    archive.join(timeout=30)
    watcher.close()
    refused = [k for k, v in results.items() if isinstance(v, ConflictError)]
    assert len(results) == 2 and len(refused) == 1, results
    info = reg.get_version("law:1")
    assert not (info.status == "archived" and info.aliases), "an alias points at an archived version"
    reg.close()


# ----------------------------------------------------------------- item 4: the production gate in the registry
def _audit(reg, passed: bool, covered: list[str], reason: str = "forgetting on law: 0.3 nats"):
    a = reg.create_audit(domains=["law"], passed=passed, summary={"reasons": [] if passed else [reason]})
    reg.log_audit_metrics(a.id, [{"ref": r, "eval_domain": "law", "name": "R.own.loss", "value": 1.0, "stage": 0}
                                 for r in covered])
    return a


def test_production_needs_a_passed_audit_that_covered_the_version(registry):
    for tag in ("1", "2", "3"):
        _version(registry, "law", tag)
    registry.set_alias("law:1", "production")  # no audit in this registry yet: no gate to apply
    _audit(registry, passed=False, covered=["law:2"])
    _audit(registry, passed=True, covered=["law:3"])  # the latest audit passed, but never measured law:2
    with pytest.raises(RefusedError) as err:
        registry.set_alias("law:2", "production")
    assert "the latest audit that covered law:2 (#1) failed (forgetting on law: 0.3 nats)" in str(err.value)
    assert "--force" not in str(err.value)  # the registry names facts; the CLI adds its flag
    with pytest.raises(RefusedError, match="no audit covered law:1"):
        registry.set_alias("law:1", "production")
    assert registry.set_alias("law:3", "production").version == 3
    assert registry.set_alias("law:2", "staging").version == 2  # only production is gated
    assert registry.set_alias("law:2", "production", force=True).version == 2
    _audit(registry, passed=True, covered=["law:2"])  # fixed and audited again
    assert registry.set_alias("law:2", "production").version == 2
    assert registry.get_version("law@production").version == 2


def test_rollback_of_production_passes_the_same_gate(registry):
    for tag in ("1", "2"):
        _version(registry, "law", tag)
    registry.set_alias("law:1", "production")
    registry.set_alias("law:2", "production")
    _audit(registry, passed=False, covered=["law:1"])
    _audit(registry, passed=True, covered=["law:2"])
    with pytest.raises(RefusedError, match="the latest audit that covered law:1"):
        registry.rollback_alias("law", "production")
    assert registry.get_version("law@production").version == 2
    assert registry.rollback_alias("law", "production", force=True).version == 1


def test_an_integrity_failure_covers_what_the_router_served(registry):
    _version(registry, "law", "1")
    _audit(registry, passed=True, covered=["law:1"])
    registry.create_audit(domains=["law"], passed=False, summary={"reasons": ["hash check failed"]}, covers=["law:1"])
    with pytest.raises(RefusedError, match=r"law:1 \(#2\) failed \(hash check failed\)"):
        registry.set_alias("law:1", "production")


def test_cli_alias_gate_names_the_flag(workspace, capsys):
    from plait.cli import main

    reg = workspace.registry
    _version(reg, "law", "1")
    _version(reg, "law", "2")
    _audit(reg, passed=True, covered=["law:1"])
    _audit(reg, passed=False, covered=["law:2"])
    w = ["--workspace", str(workspace.path)]
    assert main(["registry", "alias", "law:1", "production", *w]) == 0  # the latest audit failed, but not on law:1
    capsys.readouterr()
    assert main(["registry", "alias", "law:2", "production", *w]) == 2
    err = capsys.readouterr().err
    assert "the latest audit that covered law:2 (#2) failed" in err and "pass --force to promote law:2 anyway" in err
    assert main(["registry", "rollback", "law", "production", *w]) == 2  # no earlier version: NotFound, exit 2
    _router(reg, ["law:2"])
    assert main(["registry", "archive", "law:2", *w]) == 2
    assert "pass --force to archive law:2 anyway" in capsys.readouterr().err
    assert main(["registry", "archive", "law:2", "--force", *w]) == 0


def test_an_archived_version_is_not_served_by_name_and_version(workspace, tiny_loras):
    from plait.service import RoutedModel

    reg = workspace.registry
    for lora in tiny_loras[:2]:
        reg.import_peft(lora, name="law", domain="law", base_fingerprint=workspace.base_fingerprint)
    rm = RoutedModel(workspace)
    assert rm.ensure_adapter("law:1") == "law:1"  # loaded while ready
    reg.archive("law:1")
    with pytest.raises(ConflictError, match="adapter version law:1 is archived"):
        rm.ensure_adapter("law:1")  # refused even though it is still loaded
    assert rm.ensure_adapter("law:1", allow_archived=True) == "law:1"  # the audit's reads of past stages
    with pytest.raises(ConflictError, match="only ready versions get aliases"):
        reg.set_alias("law:1", "production")


# ----------------------------------------------------------------- item 13: malformed safetensors
def _safetensors(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


BAD_SAFETENSORS = {
    "a list": (_safetensors([]), "its header is a JSON list, not an object"),
    "no tensors": (_safetensors({}), "holds no tensors"),
    "offsets past the end": (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                             "the tensors cover 16 bytes of data but the file holds 8 (truncated)"),
    "size mismatch": (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "needs 16 bytes but data_offsets [0, 8] hold 8"),
    "gap": (_safetensors({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                          "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"\0" * 6),
            "tensor 'b' starts at byte 4 of the data, expected 2"),
    "entry not an object": (_safetensors({"w": [1, 2]}), "tensor 'w' must have exactly dtype, shape and data_offsets"),
    "bad dtype": (_safetensors({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                  "unknown dtype 'F33'"),
    "negative shape": (_safetensors({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
                       "a shape is a list of whole numbers >= 0"),
    "metadata not strings": (_safetensors({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
    "trailing bytes": (_safetensors({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"),
                       "(trailing bytes)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors_are_refused_at_import(registry, tiny_loras, tmp_path, case):
    data, message = BAD_SAFETENSORS[case]
    src = tmp_path / "bad"
    src.mkdir()
    (src / "adapter_config.json").write_bytes((tiny_loras[0] / "adapter_config.json").read_bytes())
    (src / "adapter_model.safetensors").write_bytes(data)
    before_db, before_files = registry.dump(), tree_hashes(registry.store.root)
    with pytest.raises(BadInputError) as err:
        registry.import_peft(src, name="legal", domain="law", base_fingerprint=FP)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert registry.dump() == before_db and tree_hashes(registry.store.root) == before_files


def test_a_valid_header_passes_and_matches_what_safetensors_writes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from registry.hashing import read_safetensors_header

    f = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16), "c": torch.zeros(0)}, str(f),
              metadata={"format": "pt"})
    header, start = read_safetensors_header(f)
    assert set(header) == {"__metadata__", "a", "b", "c"} and start + 3 * 2 * 4 + 5 * 2 == f.stat().st_size


@pytest.mark.parametrize("case", ["a list", "no tensors", "offsets past the end"])
def test_a_stored_malformed_adapter_fails_to_load_as_an_integrity_error(workspace, tiny_loras, case):
    """An artifact stored before import validated headers: serving it is a 422, not a 500."""
    from plait.server import api_error
    from plait.service import RoutedModel

    reg = workspace.registry
    reg.register_version("old", domain="law", kind="lora", base_fingerprint=workspace.base_fingerprint,
                         files={"adapter_config.json": tiny_loras[0] / "adapter_config.json",
                                "adapter_model.safetensors": BAD_SAFETENSORS[case][0]})
    with pytest.raises(IntegrityError) as err:
        RoutedModel(workspace).ensure_adapter("old:1")
    assert "adapter version old:1" in str(err.value) and BAD_SAFETENSORS[case][1] in str(err.value)
    assert api_error(err.value).status == 422
