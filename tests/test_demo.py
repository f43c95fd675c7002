"""The demo's plan and its summary of issue 13's targets, computed from hand-made audit figures."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from plait.datasets import BBC_DOMAINS, CODE_DOMAIN
from plait.demo import (BASELINES, FAST, FULL, KINDS, _check_order, acc_table, done_when, final_baselines,
                        subset_acc)
from registry.errors import BadInputError

DOMAINS = [CODE_DOMAIN, "business", "sport"]


def _audit(**systems) -> dict:
    """An audit summary: {system: (final losses per domain, max forgetting, forgetting per domain)}."""
    current = {s: dict(zip(DOMAINS, losses)) for s, (losses, _, _) in systems.items()}
    metrics = {s: {"max_forgetting": mf, "forgetting": dict(zip(DOMAINS[:-1], f))}
               for s, (_, mf, f) in systems.items()}
    return {"domains": DOMAINS, "current": current, "metrics": metrics}


FULL_AUDIT = _audit(own=([1.50, 3.30, 3.90], 0.0, [0.0, 0.0]),
                    routed=([1.50, 3.25, 3.90], 0.015, [0.015, -0.05]),
                    sequential=([1.90, 3.10, 3.70], 0.42, [0.42, 0.02]),
                    merged=([2.00, 3.40, 4.00], 0.0, [0.0, 0.0]),
                    joint=([1.40, 3.00, 3.60], 0.0, [0.0, 0.0]))


def test_subset_acc_is_the_mean_final_loss_over_the_chosen_domains():
    current = FULL_AUDIT["current"]["routed"]
    assert subset_acc(current, ["business", "sport"]) == pytest.approx(3.575)
    assert subset_acc(current, DOMAINS) == pytest.approx(8.65 / 3)
    with pytest.raises(BadInputError, match="no final figure for tech"):
        subset_acc(current, ["business", "tech"])
    with pytest.raises(BadInputError, match="an empty list"):
        subset_acc(current, [])


def test_acc_table_over_all_domains_and_the_bbc_ones():
    table = acc_table(FULL_AUDIT)
    assert table["sequential"] == pytest.approx({"all": 2.9, "bbc": 3.4})
    assert table["joint"] == pytest.approx({"all": 8.0 / 3, "bbc": 3.3})
    assert "bbc" not in acc_table({**FULL_AUDIT, "domains": [CODE_DOMAIN]})["own"]


def test_done_when_marks_each_target_from_the_figures():
    rows = [(c.figure, c.value, c.target, c.mark) for c in done_when(FULL_AUDIT)]
    assert rows == [
        ("own max forgetting", "+0.0000", "= 0 (stored adapters unchanged)", "PASS"),
        ("routed max forgetting", "+0.0150", "<= 0.02", "PASS"),
        ("routed ACC vs sequential (all domains)", "2.883 vs 2.900", "routed <= sequential", "PASS"),
        ("routed ACC vs merged (all domains)", "2.883 vs 3.133", "routed <= merged", "PASS"),
        ("routed ACC vs joint (all domains)", "2.883 vs 2.667", "routed <= joint + 0.05", "MISS"),
        ("routed ACC vs sequential (BBC domains)", "3.575 vs 3.400", "routed <= sequential", "MISS"),
        ("routed ACC vs merged (BBC domains)", "3.575 vs 3.700", "routed <= merged", "PASS"),
        ("routed ACC vs joint (BBC domains)", "3.575 vs 3.300", "routed <= joint + 0.05", "MISS"),
        ("domains the sequential baseline forgets", "python-code +0.420", ">= 1 domain at >= 0.1 nats", "PASS"),
    ]


def test_done_when_without_some_baselines_and_with_every_target_missed():
    audit = _audit(own=([1.5, 3.3, 3.9], 1e-9, [1e-9, 0.0]), routed=([1.5, 3.3, 3.9], 0.021, [0.021, 0.0]),
                   sequential=([1.4, 3.2, 3.8], 0.099, [0.05, 0.099]))
    marks = {c.figure: (c.value, c.mark) for c in done_when(audit)}
    assert marks["own max forgetting"][1] == "MISS" and marks["routed max forgetting"][1] == "MISS"
    assert marks["routed ACC vs sequential (all domains)"] == ("2.900 vs 2.800", "MISS")
    assert marks["routed ACC vs joint (all domains)"] == ("no such baseline in this audit", "n/a")
    assert marks["routed ACC vs merged (BBC domains)"][1] == "n/a"
    assert marks["domains the sequential baseline forgets"] == ("none (most: business +0.099)", "MISS")
    del audit["metrics"]["sequential"], audit["current"]["sequential"]
    assert {c.mark for c in done_when(audit)[2:]} == {"n/a"}


def test_final_baselines_are_those_the_audit_knows(monkeypatch):
    from rich.console import Console

    monkeypatch.setattr("plait.audit.BASELINES", ("sequential", "merged"))
    out = io.StringIO()
    assert final_baselines(Console(file=out, width=200)) == ("sequential", "merged")
    assert "baseline(s) joint not available in this plait; the audit runs sequential, merged" in out.getvalue()
    monkeypatch.setattr("plait.audit.BASELINES", ("sequential", "merged", "joint"))
    out = io.StringIO()
    assert final_baselines(Console(file=out)) == BASELINES == ("sequential", "merged", "joint")
    assert out.getvalue() == ""


def test_the_plan_code_first_all_kinds_and_the_news_settings_kept():
    assert FULL.domains == (CODE_DOMAIN, *BBC_DOMAINS)
    assert [KINDS[d] for d in FULL.domains] == ["bottleneck", "lora", "qlora", "lora", "qlora", "lora"]
    assert (FULL.steps, FULL.batch_size, FULL.max_length, FULL.n_train, FULL.n_eval) == (16, 4, 64, 64, 12)
    assert FULL.code_steps == 32  # what made the sequential baseline forget python-code by >= 0.10 nats
    assert FAST.domains[0] == CODE_DOMAIN and {KINDS[d] for d in FAST.domains} == {"bottleneck", "lora", "qlora"}
    assert FAST.steps < FULL.steps and len(FAST.domains) < len(FULL.domains)


def test_a_workspace_grown_in_another_order_is_refused(tmp_path):
    ws = SimpleNamespace(path=tmp_path)
    _check_order(ws, [CODE_DOMAIN, "business"], FULL.domains)  # a start of the demo's order: reused
    _check_order(ws, list(FULL.domains), FAST.domains)  # a --fast run on the full demo's workspace
    with pytest.raises(BadInputError, match=f"holds the domains business, {CODE_DOMAIN} in that order"):
        _check_order(ws, ["business", CODE_DOMAIN], FULL.domains)
