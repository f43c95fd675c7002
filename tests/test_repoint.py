"""Backward transfer: a domain is re-pointed to a later version only when that version is
better on the domain's frozen *validation* split, never on the eval split the audit scores.

The splits are planted (frozen in the registry before the domain is first trained) so that
the eval split and the validation split disagree: `cats` has cat text in its eval split and
law text in its validation split; `dogs` the other way round. Training `law` must re-point
cats (validation says so; eval says no) and leave dogs alone (eval says yes; validation no).
"""

from __future__ import annotations

import json

import pytest

from plait.continual import ValidationLosses, can_serve_others, heldout_texts, repoint_domains
from registry.errors import BadInputError
from tests.tiny import make_tiny_base
from training.data import VALIDATION_MAX_ROWS, _content_key, load_domain_data, read_rows

CATS = ["the cat sat on the mat and the cat was happy", "a cat chased the mouse across the mat"]
DOGS = ["the dog barked at the postman by the gate", "a dog fetched the stick from the river"]
LAW = ["the court ruled that the contract binds the parties", "legal contracts bind the parties in court"]
TRAIN = dict(steps=30, batch_size=4, max_length=32, lr=3e-3, progress=False)


def _rows(texts, n, tag=""):
    return [{"text": f"{texts[i % len(texts)]} {tag}{i}"} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    from plait import Workspace

    root = tmp_path_factory.mktemp("repoint")
    ws = Workspace.init(root / "ws", base_model=str(make_tiny_base(root / "base")), tracking_uri="none")
    reg = ws.registry
    reg.set_domain_rows("cats", "eval", _rows(CATS, 4, "e"))  # planted: eval = cats, validation = law
    reg.set_domain_rows("cats", "validation", _rows(LAW, 4, "v"))
    reg.set_domain_rows("dogs", "eval", _rows(LAW, 4, "e"))  # planted: eval = law, validation = dogs
    reg.set_domain_rows("dogs", "validation", _rows(DOGS, 4, "v"))
    lines = []
    added = {d: ws.add_domain(d, _write(root / f"{d}.jsonl", _rows(t, 40)), audit=False, log=lines.append, **TRAIN)
             for d, t in (("cats", CATS), ("dogs", DOGS), ("law", LAW))}
    return ws, root, added, lines


def _eval_loss(ws, ref, domain):
    from routing.engine import Routing

    rm = ws.routed_model
    texts = [r["text"] for r in ws.registry.get_domain_eval(domain)]
    rm.engine.max_length = 32
    return float(rm.engine.loss(texts, Routing.one(rm.ensure_adapter(ref))).mean())


def test_repointing_follows_validation_never_eval(grown):
    ws, _, added, lines = grown
    reg = ws.registry
    law = added["law"]
    assert [(m.domain, m.old_ref, m.new_ref) for m in law.repointed] == [("cats", "cats:1", "law:1")]
    moved = law.repointed[0]
    assert moved.old_loss - moved.new_loss > ws.config.repoint_margin
    assert lines[-2] == (f"re-pointed cats: cats:1 -> law:1, validation loss {moved.old_loss:.4f} -> "
                         f"{moved.new_loss:.4f}")
    # the eval split would have decided the other way on both domains
    assert _eval_loss(ws, "law:1", "cats") > _eval_loss(ws, "cats:1", "cats") + 0.1
    assert _eval_loss(ws, "law:1", "dogs") < _eval_loss(ws, "dogs:1", "dogs") - 0.1
    # and the validation figures are stored once per (version, domain), the ones compared above
    def figures(ref):
        return {m["eval_domain"]: m["value"] for m in reg.get_metrics(ref) if m["name"] == "validation_loss@32"}

    assert figures("law:1") == {"cats": moved.new_loss, "dogs": figures("law:1")["dogs"]}
    assert figures("cats:1")["cats"] == moved.old_loss
    assert figures("law:1")["dogs"] > figures("dogs:1")["dogs"] - ws.config.repoint_margin


def test_every_repointing_is_a_new_router_version(grown):
    ws, _, added, _ = grown
    routers = ws.registry.search_router_versions(ws.router_kind)
    assert [r.covers for r in routers] == [["cats:1"], ["cats:1", "dogs:1"], ["cats:1", "dogs:1", "law:1"],
                                           ["law:1", "dogs:1", "law:1"]]
    assert added["law"].router.ref == routers[-1].ref
    assert routers[-1].metrics["repointed"][0]["domain"] == "cats"
    # the router calibrated on the validation splits, never on the eval rows
    assert routers[-1].metrics["heldout_split"] == {"cats": "validation", "dogs": "validation", "law": "validation"}
    assert routers[-1].metrics["heldout_domains"] == "3 of 3"


def test_baselines_and_imports_are_never_targets(grown, tiny_loras):
    ws, root, _, _ = grown
    reg = ws.registry
    before = reg.search_router_versions(ws.router_kind)
    pre_law = before[2]  # the router that served cats with cats:1
    files = reg.artifact_path("law:1")[1]
    imported = reg.import_peft(files, name="law-import", domain="law", base_fingerprint=ws.base_fingerprint)
    baseline = reg.register_version("sequential-baseline", domain="plait-baselines", kind="lora", files=files,
                                    base_fingerprint=ws.base_fingerprint)
    losses = ValidationLosses(ws, 32)
    for info in (imported, baseline):
        assert not can_serve_others(info)
        # the same weights as law:1, so better on cats' validation: refused for what they are
        assert losses("law:1", "cats") < losses("cats:1", "cats") - 0.1
        assert repoint_domains(ws, pre_law, info, losses, 0.01) == (pre_law, [])
    assert reg.search_router_versions(ws.router_kind) == before
    assert can_serve_others(reg.get_version("law:1"))


def test_retrain_is_one_more_candidate_and_keeps_the_better_served_version(grown):
    ws, root, _, lines = grown
    reg = ws.registry
    # the new file repeats the frozen eval and validation rows: they are never trained on
    data = _rows(CATS, 40, "r") + reg.get_domain_eval("cats") + reg.get_domain_rows("cats", "validation")
    again = ws.add_domain("cats", _write(root / "cats2.jsonl", data), audit=False, log=lines.append, **TRAIN)
    v = again.train.version
    assert v.ref == "cats:2" and v.config["data"]["train_rows"] == 40
    assert v.config["data"]["eval_source"] == "frozen" and v.config["data"]["validation_rows"] == 4
    # cats:2 is worse than law:1 on cats' (law) validation split: law:1 keeps serving cats
    assert [(m.domain, m.old_ref, m.new_ref) for m in again.repointed] == [("cats", "cats:2", "law:1")]
    assert reg.get_router(ws.router_kind).covers == ["law:1", "dogs:1", "law:1"]
    assert reg.get_domain_eval("cats") == _rows(CATS, 4, "e")  # frozen sets unchanged
    assert reg.get_domain_rows("cats", "validation") == _rows(LAW, 4, "v")


def test_no_eval_row_is_trained_validated_or_calibrated_on(grown):
    ws, _, _, _ = grown
    reg = ws.registry
    for d in ("cats", "dogs", "law"):
        ev = {json.dumps(r, sort_keys=True) for r in reg.get_domain_eval(d)}
        val = {json.dumps(r, sort_keys=True) for r in reg.get_domain_rows(d, "validation")}
        train = {json.dumps(r, sort_keys=True) for r in reg.get_domain_rows(d, "train")}
        calibration, source = heldout_texts(reg, d)
        assert ev and val and train and source == "validation"
        assert not ev & val and not ev & train and not val & train
        assert not {json.loads(r)["text"] for r in ev} & set(calibration)


def test_splits_on_tiny_data_and_the_cap(tmp_path):
    three = _write(tmp_path / "three.jsonl", _rows(CATS, 3))
    dd = load_domain_data(three, validation_fraction=0.1)
    assert (len(dd.eval), len(dd.validation), len(dd.train)) == (1, 1, 1)
    with pytest.raises(BadInputError, match=r"has 2 distinct row\(s\) left to split, too few to hold out 1 eval \+ "
                                             r"1 validation and keep one to train on"):
        load_domain_data(_write(tmp_path / "two.jsonl", _rows(CATS, 2)), validation_fraction=0.1)
    two = load_domain_data(_write(tmp_path / "two.jsonl", _rows(CATS, 2)), _write(tmp_path / "e.jsonl", _rows(LAW, 1)),
                           validation_fraction=0.1)  # with an eval file, validation comes from the training file
    assert (len(two.eval), len(two.validation), len(two.train), two.eval_source) == (1, 1, 1, "file")
    big = load_domain_data(_write(tmp_path / "big.jsonl", _rows(CATS, 2000)), validation_fraction=0.1)
    assert len(big.validation) == VALIDATION_MAX_ROWS and len(big.eval) == 200 and len(big.train) == 2000 - 264
    keys = [{_content_key(r) for r in rows} for rows in (big.eval, big.validation, big.train)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    # a retrain: the frozen sets come back as they are, and their rows leave the training rows
    frozen = {"eval": [r.normalised() for r in big.eval], "validation": [r.normalised() for r in big.validation]}
    re = load_domain_data(tmp_path / "big.jsonl", validation_fraction=0.1, frozen=frozen)
    assert re.eval_source == "frozen" and [r.normalised() for r in re.validation] == frozen["validation"]
    assert {_content_key(r) for r in re.train} == keys[2] and len(read_rows(tmp_path / "big.jsonl")) == 2000


def test_two_domains_served_by_one_version_blend_as_that_version(grown):
    """After re-pointing, cats and law are both served by law:1: a top-k decision naming both must
    blend law:1 once with the summed weight (it failed with "appears twice in one routing")."""
    from plait.service import Served
    from routing.engine import Routing

    ws, *_ = grown
    rm = ws.routed_model
    rm.ensure_adapter("law:1")
    texts = [r["text"] for r in ws.registry.get_domain_eval("cats")][:2]
    both = Served("auto", "cats", [{"ref": "law:1", "domain": "cats", "weight": 0.6},
                                   {"ref": "law:1", "domain": "law", "weight": 0.4}])
    assert both.routing() == Routing.one("law:1")
    assert Routing.merged([("a", 0.5), ("b", 0.2), ("a", 0.25)]).adapters == (("a", 0.75), ("b", 0.2))
    rm.engine.max_length = 32
    assert rm.loss(texts, [both, both]).tolist() == rm.engine.loss(texts, Routing.one("law:1")).tolist()
    assert len(rm.generate(texts, top_k=3, max_new_tokens=2)) == 2
