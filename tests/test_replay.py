"""Rehearsal (`--replay`, training.replay): a warm-started version keeps serving its source's domains.

On the tiny pretrained Llama of tests/test_warmstart.py: "fruit" is an apple domain; a new
domain "digits" (other text) warm-starts from fruit:1. Trained on its own rows alone it wears
fruit's knowledge away; with a share of fruit's stored training rows replayed beside its own,
it stays better on fruit's (held-out) rows. Nothing stored changes either way.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from plait.cli import main
from registry.errors import BadInputError
from tests.test_warmstart import apple_rows, base, cfg, data, reg  # noqa: F401 - fixtures
from training.data import load_domain_data
from training.replay import MAX_REPLAY_DOMAINS, check_share, covered_domains, covers_after, replay_rows
from training.trainer import TrainConfig, train_domain


def digit_rows(n: int = 24) -> list[dict]:
    return [{"text": f"zero one two {i % 5} three four."} for i in range(n)]


def fruit_heldout(tmp_path):
    """Apple rows the fruit domain never trains on (numbers it has not seen)."""
    return data(tmp_path, "fruit-heldout", [{"text": f"apple apple number {i} says apple."} for i in (5, 6, 7, 8)])


def _store_train_rows(reg, domain: str, path) -> None:
    """What `plait train` (plait.continual.add_domain) stores after registering a domain's first version."""
    dd = load_domain_data(path, validation_fraction=0.1)
    reg.set_domain_rows(domain, "train", [r.normalised() for r in dd.train])


def _fruit(reg, base, tmp_path):  # noqa: F811 - the fixture
    path = data(tmp_path, "fruit", apple_rows())
    train_domain(reg, base, "fruit", path, config=cfg())
    _store_train_rows(reg, "fruit", path)


def test_replay_keeps_the_source_domain(reg, base, tmp_path):  # noqa: F811
    _fruit(reg, base, tmp_path)
    digits, heldout = data(tmp_path, "digits", digit_rows()), fruit_heldout(tmp_path)
    before = tuple(sorted((v.ref, v.sha256) for v in reg.search_versions()))
    plain = train_domain(reg, base, "digits", digits, heldout, config=cfg(init="fruit", replay=0.0, steps=30,
                                                                            name="digits-plain"))
    kept = train_domain(reg, base, "digits", digits, heldout, config=cfg(init="fruit", replay=0.5, steps=30))
    # eval_loss here is on fruit's held-out rows: replay keeps fruit's knowledge, plain training loses it
    assert kept.metrics["eval_loss"] < plain.metrics["eval_loss"] - 0.05, (kept.metrics, plain.metrics)
    assert plain.version.config["replay"] == {"share": 0.0, "examples": 0, "per_domain": {}}
    replay = kept.version.config["replay"]
    assert replay["share"] == 0.5 and replay["per_domain"] == {"fruit": replay["examples"]}
    assert replay["examples"] == kept.version.config["data"]["train_examples"]  # 1:1 at share 0.5
    assert kept.version.config["covers"] == ["digits", "fruit"]
    assert plain.version.config["covers"] == ["digits", "fruit"]  # a warm start covers its source, replay or not
    # nothing stored changed
    assert all(v in {(x.ref, x.sha256) for x in reg.search_versions()} for v in before)
    assert reg.verify() and all(r["ok"] for r in reg.verify())


def test_a_fresh_adapter_replays_nothing(reg, base, tmp_path):  # noqa: F811
    _fruit(reg, base, tmp_path)
    fresh = train_domain(reg, base, "digits", data(tmp_path, "digits", digit_rows()),
                         config=cfg(init="base", replay=0.5))
    assert fresh.version.config["covers"] == ["digits"]
    assert fresh.version.config["replay"]["examples"] == 0


def test_covers_chain_through_warm_starts(reg, base, tmp_path):  # noqa: F811
    _fruit(reg, base, tmp_path)
    b = train_domain(reg, base, "digits", data(tmp_path, "digits", digit_rows()), config=cfg(init="fruit"))
    c = train_domain(reg, base, "orchard", data(tmp_path, "orchard", apple_rows(offset=1)),
                     config=cfg(init=b.version.ref))
    assert covered_domains(c.version) == ["orchard", "digits", "fruit"]
    # digits has no stored training rows (train_domain alone stores none): only fruit is replayed
    assert set(c.version.config["replay"]["per_domain"]) == {"fruit"}
    # a retrain from its own newest version does not replay itself
    again = train_domain(reg, base, "orchard", data(tmp_path, "orchard", apple_rows(offset=1)),
                         config=cfg(init=c.version.ref))
    assert covered_domains(again.version) == ["orchard", "digits", "fruit"]
    assert "orchard" not in again.version.config["replay"]["per_domain"]


def test_replay_rows_are_round_robin_seeded_and_never_eval_or_validation(reg, tmp_path):  # noqa: F811
    for d, n in (("a", 10), ("b", 3)):
        reg.set_domain_rows(d, "train", [{"text": f"{d} row {i}"} for i in range(n)])
    picked = replay_rows(reg, ["new", "a", "b", "never-stored"], n_new=12, share=0.5, seed=3)
    assert [d for d, _ in picked] == ["a", "b"] * 6  # round robin; b's 3 rows come round twice
    b_rows = [r["text"] for d, r in picked if d == "b"]
    assert sorted(b_rows[:3]) == ["b row 0", "b row 1", "b row 2"] and b_rows[3:] == b_rows[:3]
    assert picked == replay_rows(reg, ["new", "a", "b"], n_new=12, share=0.5, seed=3)
    assert picked != replay_rows(reg, ["new", "a", "b"], n_new=12, share=0.5, seed=4)
    assert replay_rows(reg, ["new", "a"], n_new=12, share=0.0, seed=3) == []
    assert len(replay_rows(reg, ["new", "a"], n_new=12, share=0.25, seed=3)) == 4  # 0.25 / 0.75 x 12


def test_replayed_rows_exclude_the_source_domain_eval_and_validation_rows(reg, base, tmp_path):  # noqa: F811
    """Through the real path: the rows `plait train` stores for a domain are its training rows only."""
    from plait.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", base_model=str(base), tracking_uri="none")
    rows = [{"text": f"apple number {i} says apple apple."} for i in range(40)]
    ws.add_domain("fruit", data(tmp_path, "fruit40", rows), method="lora", steps=4, batch_size=4, max_length=48,
                  dtype="fp32", progress=False, audit=False)
    new = ws.add_domain("orchard", data(tmp_path, "orchard40", rows[:1] + apple_rows(offset=1)), method="lora",
                        steps=4, batch_size=4, max_length=48, dtype="fp32", progress=False, audit=False,
                        init="fruit", replay=0.5)
    assert new.train.version.config["replay"]["per_domain"]["fruit"] > 0

    def h(r):
        return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()

    held = {h(r) for split in ("eval", "validation") for r in ws.registry.get_domain_rows("fruit", split)}
    stored = {h(r) for r in ws.registry.get_domain_rows("fruit", "train")}
    assert held and stored and not held & stored
    picked = replay_rows(ws.registry, ["orchard", "fruit"], n_new=24, share=0.5, seed=0)
    assert picked and not {h(r) for _, r in picked} & held


def test_share_is_checked():
    for bad in (1, 1.5, -0.1, "x", True):
        with pytest.raises(BadInputError) as e:
            check_share(bad)
        assert str(e.value) == f"replay share {bad!r} is invalid: use a number >= 0 and below 1 (0 = no replay)"
    with pytest.raises(BadInputError, match="replay share 1.0 is invalid"):
        TrainConfig(replay=1.0)
    assert check_share(0) == 0.0 and covers_after(None, "x") == ["x"] and MAX_REPLAY_DOMAINS >= 1


def test_cli_replay_bad_value(workspace, tmp_path, capsys):
    path = data(tmp_path, "d", apple_rows())
    code = main(["train", "d", "--data", str(path), "--replay", "1", "--workspace", str(workspace.path)])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("replay share 1.0 is invalid: use a number >= 0 and below 1 "
                                                     "(0 = no replay)")
