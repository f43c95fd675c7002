"""Costs that stay flat as domains grow (issue 16): the file-hash cache, the sparse word model,
and the audit after a new domain measuring only the new rows."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from registry import hashing
from routing.routers.lexical import LexicalRouter, hashed_terms


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    hashing.clear_memory_cache()
    yield
    hashing.clear_memory_cache()


def _settled(path, age_s: float = 10.0):
    """Backdate a file's mtime so it is past the racy window (its ctime is now: wait it out)."""
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_unchanged_file_is_hashed_once_and_a_changed_file_again(tmp_path, hash_cache, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)  # every file counts as settled at once
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    start = dict(hashing.HASH_STATS)
    first = hashing.sha256_file(f)
    assert hashing.sha256_file(f) == first
    hashing.clear_memory_cache()  # a new process: the digest comes from the cache file
    assert hashing.sha256_file(f) == first
    assert hashing.HASH_STATS["hashed"] - start["hashed"] == 1
    assert hashing.HASH_STATS["cached"] - start["cached"] == 2
    f.write_bytes(b"y" * 1000)  # same size, new content: ctime moves, the file is read again
    assert hashing.sha256_file(f) != first
    assert hashing.HASH_STATS["hashed"] - start["hashed"] == 2


def test_a_file_changed_within_the_racy_window_is_never_cached(tmp_path, hash_cache):
    f = tmp_path / "b.bin"
    f.write_bytes(b"1" * 64)
    start = hashing.HASH_STATS["hashed"]
    a = hashing.sha256_file(f)
    f.write_bytes(b"2" * 64)  # possibly within the same timestamp tick
    b = hashing.sha256_file(f)
    assert a != b and hashing.HASH_STATS["hashed"] - start == 2


def test_sparse_word_model_equals_the_dense_formula():
    r = LexicalRouter()
    r.fit({"a": ["the cat sat on the mat", "cats and dogs"], "b": ["legal contract law court", "the court ruled"],
           "c": ["python code def return"]})
    texts = ["the cat in court", "def return code", "zzz qqq"]
    got = r._score_logits(texts)
    dense = []
    for d in r.domains:
        idx, val = r.counts[d]
        row = torch.zeros(r.buckets)
        row[idx] = val
        dense.append(torch.log((row + r.alpha) / (float(val.sum()) + r.alpha * r.buckets)))
    table = torch.stack(dense)
    for i, t in enumerate(texts):
        f = hashed_terms(t, r.buckets, r.bigrams)
        v = torch.tensor(list(f.values()))
        want = (table[:, torch.tensor(list(f))] @ v) / v.sum()
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    r.add_domain("d", ["more words here"])  # one row appended, the others kept
    assert r._score_logits(texts).shape == (3, 4)
    torch.testing.assert_close(r._score_logits(texts)[:, :3], got)


def test_word_model_terms_of_held_out_texts_are_hashed_once_across_processes(tmp_path, monkeypatch):
    """The scores read the cached terms (same figures), and a new process reads them from the
    cache file instead of hashing the texts again."""
    from routing.routers import _features

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    _features.clear_memory_cache()
    r = LexicalRouter().fit({"a": ["the cat sat on the mat"], "b": ["the court ruled on the contract law"]})
    texts = ["the cat in court", "zzz qqq", "!!!"]
    plain = r._score_logits(texts)
    calls = []

    def counted(text, buckets, bigrams):
        calls.append(text)
        return hashed_terms(text, buckets, bigrams)

    with _features.cached_embeddings():
        first = _features.cached_term_arrays(texts, r.buckets, r.bigrams, counted)
        torch.testing.assert_close(r._score_logits(texts), plain)
    assert calls == texts
    _features.clear_memory_cache()  # a new process: the terms come from the cache file
    with _features.cached_embeddings():
        again = _features.cached_term_arrays(texts, r.buckets, r.bigrams, counted)
        torch.testing.assert_close(r._score_logits(texts), plain)
    assert calls == texts
    for (i, v), (j, w), t in zip(first, again, texts):
        assert dict(zip(i.tolist(), v.tolist())) == dict(zip(j.tolist(), w.tolist())) == hashed_terms(t, r.buckets)
    _features.clear_memory_cache()


def test_audit_after_a_new_domain_measures_only_the_new_rows(workspace, tiny_loras, monkeypatch):
    """Three domains imported and routed one by one; the audit after the third runs the engine on
    the new domain (base, own, routed), the previous stage on it (FWT) and the control set only."""
    from plait.audit import run_audit
    from plait.continual import update_router
    from routing import engine

    ws, reg = workspace, workspace.registry
    texts = {"cats": ["the cat sat on the mat", "a cat chased the mouse", "cats purr on the mat"],
             "law": ["the court ruled on the contract", "legal contracts bind parties", "the judge read the law"],
             "med": ["patients take the medicine", "the doctor gave a dose", "medicine twice a day"]}
    calls = []
    real = engine.CompositionEngine.loss

    def counted(self, xs, *a, **k):
        calls.append(len(xs))
        return real(self, xs, *a, **k)

    for i, (d, ts) in enumerate(texts.items()):
        v = reg.import_peft(tiny_loras[i], name=d, domain=d, base_fingerprint=ws.base_fingerprint)
        for split in ("eval", "validation", "train"):
            reg.set_domain_rows(d, split, [{"text": t} for t in ts])
        update_router(ws, d, ts, v.ref)
        calls.clear()
        monkeypatch.setattr(engine.CompositionEngine, "loss", counted)
        audit = run_audit(ws, progress=False)
        monkeypatch.setattr(engine.CompositionEngine, "loss", real)
    assert audit.passed, audit.reasons
    # new domain: base, own, routed (3); previous stage's base/own/routed on it for FWT, where not
    # cached (at most 3 more); the control set (2): never one call per earlier domain
    assert len(calls) <= 6, calls  # before issue 16: 9 (one base and one own call per earlier domain)
    rows = {(m["stage"], m["eval_domain"], m["name"]) for m in reg.search_audit_metrics("R.")
            if m["audit_id"] == audit.audit_id}
    assert {(2, d, f"R.{s}.loss") for d in texts for s in ("base", "own", "routed")} <= rows
    summary = reg.get_latest_audit().summary
    assert set(summary["routed_rows"]) == set(texts)
    # and the reused figures equal a fresh measurement of the same systems
    first = json.loads(json.dumps(audit.current))
    assert first["own"]["cats"] == pytest.approx(audit.matrices["own"][0][0])


def test_batched_reads_equal_the_row_by_row_ones(registry, tiny_loras):
    """`search_versions` (4 queries), `search_domains` and `get_many_domain_rows` (1 query) give
    what the per-row reads give."""
    fp = "sha256:" + "0" * 64
    a = registry.import_peft(tiny_loras[0], name="a", domain="x", base_fingerprint=fp)
    registry.register_version("a", domain="x", kind="lora", files={"w": b"2"}, base_fingerprint=fp,
                              parents=[(a.ref, "warm-start")])
    registry.import_peft(tiny_loras[1], name="b", domain="y", base_fingerprint=fp)
    registry.set_alias("a:1", "production")
    with registry._session() as s:
        from sqlmodel import select

        from registry.models import Adapter, AdapterVersion
        rows = s.exec(select(Adapter, AdapterVersion).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                      .order_by(Adapter.name, AdapterVersion.version)).all()
        one_by_one = [registry._info(s, ad, v) for ad, v in rows]
    assert registry.search_versions() == one_by_one and len(one_by_one) == 3
    assert one_by_one[1].parents[0]["ref"] == "a:1" and one_by_one[0].aliases == ["production"]
    registry.set_domain_rows("x", "eval", [{"text": "t1"}])
    assert registry.get_many_domain_rows(["y", "x"], "eval") == {"x": registry.get_domain_rows("x", "eval")}
    assert [d["adapters"] for d in registry.search_domains()] == [["a"], ["b"]]


def test_router_updates_calibrate_on_a_fixed_sample_of_domains_past_the_limit(monkeypatch):
    """Up to CALIBRATION_MAX_DOMAINS every domain calibrates the router; above, a sample fixed by
    the names' sha256 (the same on every machine), in the router's order, that a new domain
    changes by at most one member."""
    import hashlib

    from plait import continual

    monkeypatch.setattr(continual, "CALIBRATION_MAX_DOMAINS", 4)
    few = ["d0", "d1", "d2", "d3"]
    assert continual.calibration_domains(few) == few
    many = [f"d{i}" for i in range(10)]
    lowest = sorted(many, key=lambda d: hashlib.sha256(d.encode()).hexdigest())[:4]
    got = continual.calibration_domains(many)
    assert got == [d for d in many if d in lowest] and len(got) == 4
    grown = continual.calibration_domains([*many, "d10"])
    assert len(set(got) - set(grown)) <= 1 and len(grown) == 4
