"""The registry facade on a real SQLite file, a real artifact store and real PEFT adapters."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from registry.errors import BadInputError, ConflictError, IntegrityError, NotFoundError
from registry.names import Ref, parse_ref, validate_name
from tests.conftest import tree_hashes

FP = "sha256:" + "ab" * 32


def _register(reg, src, name="legal", **kw):
    kw.setdefault("domain", "law")
    kw.setdefault("kind", "lora")
    return reg.register_version(name, files=src, base_fingerprint=FP, **kw)


def _writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_register_resolve_alias_round_trip(registry, tiny_loras):
    v1 = _register(registry, tiny_loras[0], metrics={"eval_loss": 2.5}, config={"r": 4})
    v2 = _register(registry, tiny_loras[1], data_fingerprint="sha256:data", mlflow_run_id="run-1")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.get_version("legal").ref == "legal:2"  # NAME = newest ready version
    got = registry.get_version("legal:1")
    assert got.sha256 == v1.sha256 and got.config == {"r": 4} and got.domain == "law" and got.kind == "lora"
    assert got.parents == [{"base": FP, "relation": "trained-from-base", "weight": None}]
    assert registry.get_version("legal:2").data_fingerprint == "sha256:data"
    registry.set_alias("legal:1", "production")
    assert registry.get_version("legal@production").version == 1
    assert registry.get_version("legal:1").aliases == ["production"]
    registry.set_alias("legal:2", "production")  # promote
    assert registry.get_version("legal@production").version == 2
    assert registry.rollback_alias("legal", "production").version == 1  # roll back
    assert registry.get_version("legal@production").version == 1
    summary = registry.search_adapters()[0]
    assert (summary.name, summary.versions, summary.latest, summary.aliases) == ("legal", 2, 2, {"production": 1})


def test_identical_content_is_stored_once(registry, tiny_loras):
    a = _register(registry, tiny_loras[0])
    b = _register(registry, tiny_loras[0], name="copy")
    assert a.location == b.location and a.sha256 == b.sha256
    assert len(registry.store.locations()) == 1


def test_lineage_graph_with_warm_start_and_merge(registry, tiny_loras):
    _register(registry, tiny_loras[0], name="a", domain="law")
    _register(registry, tiny_loras[1], name="b", domain="med")
    _register(registry, tiny_loras[2], name="a", domain="law", parents=[("a:1", "warm-start")])
    merged = _register(registry, tiny_loras[3], name="ab", domain="law",
                       parents=[("a:2", "merge", 0.5), ("b:1", "merge", 0.5)])
    assert [p["ref"] for p in merged.parents] == ["a:2", "b:1"]
    up = registry.get_lineage("ab:1", direction="up")
    assert set(up["nodes"]) == {"ab:1", "a:2", "a:1", "b:1", f"base:{FP}"}
    assert {"child": "ab:1", "parent": "b:1", "relation": "merge", "weight": 0.5} in up["edges"]
    assert {"child": "a:2", "parent": "a:1", "relation": "warm-start", "weight": None} in up["edges"]
    down = registry.get_lineage("a:1", direction="down")
    assert set(down["nodes"]) == {"a:1", "a:2", "ab:1"}


def test_metrics_log_query_and_search(registry, tiny_loras):
    _register(registry, tiny_loras[0], name="a", domain="law", metrics={"eval_loss": 3.0})
    _register(registry, tiny_loras[1], name="b", domain="med", kind="qlora", metrics={"eval_loss": 1.5})
    registry.log_metrics("a:1", {"eval_loss": 2.75}, eval_domain="med")
    rows = registry.get_metrics("a:1")
    assert [(m["name"], m["eval_domain"], m["value"]) for m in rows] == [("eval_loss", "law", 3.0),
                                                                          ("eval_loss", "med", 2.75)]
    assert [v.ref for v in registry.search_versions(metric="eval_loss", max_value=2.0)] == ["b:1"]
    assert [v.ref for v in registry.search_versions(domain="law")] == ["a:1"]
    assert [v.ref for v in registry.search_versions(kind="qlora")] == ["b:1"]
    assert len(registry.search_versions(base=FP[:20])) == 2 and registry.search_versions(base="sha256:ff") == []
    assert [d["name"] for d in registry.search_domains()] == ["law", "med"]  # order added


def test_stored_files_are_read_only(registry, tiny_loras):
    v = _register(registry, tiny_loras[0])
    root = registry.store.path(v.location)
    for f in root.iterdir():
        assert not f.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), f


@pytest.mark.parametrize("damage", ["modify", "truncate", "swap", "delete"])
def test_damaged_artifact_is_refused_and_reported(registry, tiny_loras, damage):
    a = _register(registry, tiny_loras[0], name="a")
    b = _register(registry, tiny_loras[1], name="b")
    weights = registry.store.path(a.location) / "adapter_model.safetensors"
    _writable(weights)
    if damage == "modify":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "swap":
        weights.write_bytes((registry.store.path(b.location) / "adapter_model.safetensors").read_bytes())
    else:
        weights.unlink()
    with pytest.raises(IntegrityError) as err:
        registry.artifact_path("a:1")
    assert a.sha256 in str(err.value) and "adapter version a:1" in str(err.value)
    report = {r["ref"]: r for r in registry.verify()}
    assert report["a:1"]["ok"] is False and report["b:1"]["ok"] is True
    with pytest.raises(IntegrityError):
        registry.export_version("a:1", Path(registry.store.root).parent / "out")


def test_export_loads_in_peft_with_identical_outputs(registry, tiny_base, tiny_loras, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _register(registry, tiny_loras[0])
    out = registry.export_version("legal:1", tmp_path / "exported")
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    before = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_loras[0]).eval()
    after = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(after(ids).logits, before(ids).logits, rtol=0, atol=0)
        with before.disable_adapter():
            base_logits = before(ids).logits
        assert not torch.allclose(before(ids).logits, base_logits)  # the adapter matters
    assert os.access(out / "adapter_model.safetensors", os.W_OK)


def test_archive_and_gc(registry, tiny_loras):
    _register(registry, tiny_loras[0])
    v2 = _register(registry, tiny_loras[1])
    registry.set_alias("legal:2", "production")
    with pytest.raises(ConflictError, match="alias"):
        registry.archive("legal:2")
    registry.set_alias("legal:1", "production")
    registry.archive("legal:2")
    assert registry.get_version("legal").version == 1  # NAME skips archived versions
    assert registry.get_version("legal:2").status == "archived"
    assert registry.gc(grace_s=3600)["artifacts_removed"] == 0  # too young
    out = registry.gc(grace_s=0)
    assert out["artifacts_removed"] == 1 and out["bytes_freed"] == v2.size_bytes
    assert registry.store.locations() == [registry.get_version("legal:1").location]
    assert all(r["ok"] for r in registry.verify())


def test_crash_while_writing_leaves_nothing(registry, tiny_loras, monkeypatch):
    import registry.store as store_mod

    def boom(point):
        if point == "store.before_rename":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(store_mod, "_fault_hook", boom)
    with pytest.raises(RuntimeError):
        _register(registry, tiny_loras[0])
    monkeypatch.setattr(store_mod, "_fault_hook", None)
    assert registry.store.locations() == [] and registry.search_versions() == []
    assert not any((registry.store.root / ".tmp").iterdir())


def test_bad_inputs_change_nothing(registry, tiny_loras, tmp_path):
    _register(registry, tiny_loras[0])
    registry.set_alias("legal:1", "production")
    not_peft = tmp_path / "not-peft"
    not_peft.mkdir()
    (not_peft / "weights.txt").write_text("hello")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    before_db, before_files = registry.dump(), tree_hashes(registry.store.root)
    cases = [
        (lambda: registry.get_version("nope"), NotFoundError, "no adapter named 'nope'"),
        (lambda: registry.get_version("legal:9"), NotFoundError, "has no version 9 (newest: 1)"),
        (lambda: registry.get_version("legal@staging"), NotFoundError, "has no alias 'staging' (aliases: production)"),
        (lambda: registry.get_version("legal:0"), BadInputError, "versions are whole numbers from 1"),
        (lambda: registry.set_alias("legal:1", "bad alias"), BadInputError, "invalid alias 'bad alias'"),
        (lambda: _register(registry, tiny_loras[1], name="../evil"), BadInputError, "invalid adapter name '../evil'"),
        (lambda: _register(registry, tiny_loras[1], name="a/b"), BadInputError, "invalid adapter name 'a/b'"),
        (lambda: _register(registry, tiny_loras[1], kind="qlora"), ConflictError, "is a lora adapter of domain 'law'"),
        (lambda: _register(registry, tiny_loras[1], parents=[("ghost:1", "merge")]), NotFoundError, "no adapter named 'ghost'"),
        (lambda: registry.import_peft(tmp_path / "missing", name="x", domain="d", base_fingerprint=FP),
         NotFoundError, "is not a directory"),
        (lambda: registry.import_peft(not_peft, name="x", domain="d", base_fingerprint=FP),
         BadInputError, "it has no adapter_config.json"),
        (lambda: registry.import_peft(pickled, name="x", domain="d", base_fingerprint=FP),
         BadInputError, "holds pickle weights (adapter_model.bin), which plait never loads"),
        (lambda: registry.export_version("legal:1", tiny_loras[0]), BadInputError, "is not an empty directory"),
        (lambda: registry.log_metrics("legal:1", {"x": "high"}), BadInputError, "non-numeric value 'high'"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc) as err:
            fn()
        assert message in str(err.value)
        assert "\n" not in str(err.value)
    assert registry.dump() == before_db
    assert tree_hashes(registry.store.root) == before_files


@pytest.mark.parametrize("text,ref", [("legal", Ref("legal")), ("legal:12", Ref("legal", version=12)),
                                      ("legal@production", Ref("legal", alias="production")),
                                      ("a.b-c_d", Ref("a.b-c_d"))])
def test_parse_ref(text, ref):
    assert parse_ref(text) == ref and str(ref) == text


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a b", "x\n", "-x", "a..b", "é", "x" * 65, "a:b:c", "a@b@c",
                                 "a:-1", "a:", "@x", "a:1.5"])
def test_bad_refs_are_refused(bad):
    with pytest.raises(BadInputError):
        parse_ref(bad)


def test_mlflow_mirror(tmp_path, tiny_loras):
    from mlflow import MlflowClient

    from registry.client import Registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts", tracking_uri=uri)
    v1 = _register(reg, tiny_loras[0])
    _register(reg, tiny_loras[1])
    reg.set_alias("legal:1", "production")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("legal", "production")
    assert mv.tags["plait_version"] == "1" and mv.tags["sha256"] == v1.sha256 and mv.tags["domain"] == "law"
    assert mv.tags["base_fingerprint"] == FP and mv.tags["kind"] == "lora"
    assert len(client.search_model_versions("name='legal'")) == 2
    assert reg.sync_mlflow() == 2  # idempotent: no duplicates
    assert len(client.search_model_versions("name='legal'")) == 2


def test_domain_eval_set_is_frozen_hash_checked_and_kept_by_gc(registry):
    rows = [{"text": "a contract binds"}, {"prompt": "Q", "completion": "A"}]
    sha = registry.set_domain_eval("law", rows)
    assert registry.get_domain_eval("law") == rows
    assert registry.set_domain_eval("law", rows) == sha  # same rows: fine
    with pytest.raises(ConflictError, match="already has a frozen eval set"):
        registry.set_domain_eval("law", [{"text": "other"}])
    assert registry.gc(grace_s=0)["artifacts_removed"] == 0
    assert [r["ref"] for r in registry.verify()] == ["eval set law"]
    path = registry.store.path(registry.search_domains()[0] and
                               next(loc for loc in registry.store.locations()))
    f = path / "eval.jsonl"
    _writable(f)
    f.write_text('{"text": "tampered"}\n')
    with pytest.raises(IntegrityError, match="eval set of domain 'law'"):
        registry.get_domain_eval("law")
