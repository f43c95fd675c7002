"""The audit's joint baseline, the baselines' one learning rate, the heatmap's shared scale, and
routed figures keyed by router version (a re-pointed router), on a tiny real model."""

from __future__ import annotations

import json

import pytest

from plait.audit import run_audit
from plait.cli import main
from tests.test_audit import CATS, LAW, _copy_ws, _data
from tests.test_audit_merged import SPORTS
from tests.tiny import make_tiny_base

LR = 3e-3
STEPS = {"cats": 8, "law": 12, "sports": 10}
KINDS = {"cats": "lora", "law": "bottleneck", "sports": "lora"}


def _rows_of(ws, audit_id, name):
    return {(m["stage"], m["eval_domain"]) for m in ws.registry.search_audit_metrics(name) if m["audit_id"] == audit_id}


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """cats (LoRA, 8 steps), law (bottleneck, 12), sports (LoRA, 10), all at lr 3e-3; audited with the
    sequential and joint baselines, then with the joint baseline again."""
    from plait import Workspace

    root = tmp_path_factory.mktemp("joint")
    ws = Workspace.init(root / "ws", base_model=str(make_tiny_base(root / "base")), tracking_uri="none")
    for d, texts in (("cats", CATS), ("law", LAW), ("sports", SPORTS)):
        ws.add_domain(d, _data(root / f"{d}.jsonl", texts), method=KINDS[d], steps=STEPS[d], batch_size=4,
                      max_length=32, lr=LR, progress=False, audit=False,
                      replay=0.0)  # sports is not to re-point cats (the re-pointing below is planted)
    first = run_audit(ws, baselines=("sequential", "joint"), progress=False)
    second = run_audit(ws, baselines=("sequential", "merged", "joint"), progress=False)
    return ws, first, second


def test_joint_baseline_trains_the_chains_total_steps_at_the_lora_default_rate(joint):
    from training.methods import get_kind

    ws, first, _ = joint
    reg = ws.registry
    links = [reg.get_version(f"sequential-baseline:{k}") for k in (1, 2, 3)]
    j = reg.get_version("joint-baseline:1")
    assert [v.config["steps"] for v in links] == [8, 12, 10]  # each domain's own steps
    assert j.config["steps"] == sum(v.config["steps"] for v in links) == 30
    assert j.config["batch_size"] == 4 and j.config["max_length"] == 32 and j.config["method"] == "lora"
    # one learning rate for every baseline: the LoRA default, not the domains' 3e-3 (nor a
    # bottleneck's 1e-3)
    assert reg.get_version("law:1").config["lr"] == LR and reg.get_version("cats:1").config["lr"] == LR
    assert {v.config["lr"] for v in [*links, j]} == {get_kind("lora").default_lr} == {2e-4}
    # the union of the three domains' stored training rows
    n_rows = sum(len(reg.get_domain_rows(d, "train")) for d in STEPS)
    assert j.config["data"]["train_rows"] == n_rows == first.baselines["joint"]["rows"]
    built = first.baselines["joint"]
    assert {k: built[k] for k in ("ref", "steps", "batch_size", "lr", "domains", "trained")} == {
        "ref": "joint-baseline:1", "steps": 30, "batch_size": 4, "lr": 2e-4, "domains": ["cats", "law", "sports"],
        "trained": True}
    assert first.baselines["sequential"]["links"] == [v.ref for v in links]


def test_joint_baseline_is_registered_with_lineage_to_the_base(joint):
    ws, *_ = joint
    j = ws.registry.get_version("joint-baseline:1")
    assert j.domain == "plait-baselines" and j.kind == "lora"
    assert j.parents == [{"base": ws.base_fingerprint, "relation": "trained-from-base", "weight": None}]
    edges = ws.registry.get_lineage(j.ref, direction="up")["edges"]
    assert edges == [{"child": "joint-baseline:1", "parent": f"base:{ws.base_fingerprint}",
                      "relation": "trained-from-base", "weight": None}]


def test_joint_metrics_have_acc_only(joint):
    ws, first, _ = joint
    R = first.matrices["joint"]
    assert R[0] == [None] * 3 and R[1] == [None] * 3 and None not in R[2]
    m = first.metrics["joint"]
    assert m["acc"] == pytest.approx(sum(R[2]) / 3)
    assert (m["bwt"], m["fwt"], m["forgetting"], m["max_forgetting"]) == (None, None, {}, None)
    assert first.current["joint"] == dict(zip(first.domains, R[2]))
    # trained on every domain at once, it beats the base on each of them
    assert all(R[2][j] < first.matrices["base"][2][j] - 0.05 for j in range(3))
    stored = json.load(open(f"{first.out_dir}/audit.json"))
    assert stored["metrics"]["joint"]["acc"] == pytest.approx(m["acc"]) and stored["metrics"]["joint"]["bwt"] is None
    report = open(f"{first.out_dir}/report.md").read()
    assert f"| joint | {m['acc']:.4f} | - | - | - |" in report
    assert "Joint baseline: joint-baseline:1, one LoRA trained on the" in report and "30 steps" in report


def test_a_second_audit_reuses_the_joint_baseline_and_its_figures(joint):
    ws, first, second = joint
    assert [v.ref for v in ws.registry.search_versions(name="joint-baseline")] == ["joint-baseline:1"]
    assert [v.ref for v in ws.registry.search_versions(name="sequential-baseline")] == [
        "sequential-baseline:1", "sequential-baseline:2", "sequential-baseline:3"]
    assert second.baselines["joint"]["trained"] is False and second.baselines["joint"]["ref"] == "joint-baseline:1"
    assert _rows_of(ws, first.audit_id, "R.joint.loss") == {(2, "cats"), (2, "law"), (2, "sports")}
    assert _rows_of(ws, second.audit_id, "R.joint.loss") == set()  # nothing trained or measured again
    assert _rows_of(ws, second.audit_id, "R.sequential.loss") == set()
    assert second.matrices["joint"] == first.matrices["joint"]
    assert second.matrices["sequential"] == first.matrices["sequential"]


def test_heatmap_panels_share_one_scale_relative_to_the_base(joint):
    import numpy as np

    from plait.audit import heatmap_figure

    _, _, second = joint
    fig = heatmap_figure(second)
    images = [im for ax in fig.axes for im in ax.images]
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["own", "routed", "sequential", "merged", "joint"]  # the base is the zero of the scale
    assert len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1
    assert len({im.get_cmap().name for im in images}) == 1
    vmin, vmax = images[0].norm.vmin, images[0].norm.vmax
    base = second.matrices["base"][2]
    deltas = [v - base[j] for R in (second.matrices[t] for t in titles) for row in R for j, v in enumerate(row)
              if v is not None]
    assert vmax == -vmin == pytest.approx(max(abs(d) for d in deltas))  # centred on 0, the largest difference
    own = np.asarray(images[0].get_array())
    assert own[2][1] == pytest.approx(second.matrices["own"][2][1] - base[1])
    joint_img = np.ma.masked_invalid(np.asarray(images[4].get_array(), dtype=float))
    assert joint_img.mask[:2].all() and not joint_img.mask[2].any()


def test_audit_options_refuse_bad_values(joint, capsys):
    ws, *_ = joint
    from registry.errors import BadInputError

    with pytest.raises(BadInputError, match=r"baseline_lr 2 is invalid: use a number between 0 and 1"):
        run_audit(ws, baselines=("joint",), baseline_lr=2, progress=False)
    assert main(["audit", "--baseline", "joint,bogus", "--workspace", str(ws.path)]) == 2
    assert "unknown baseline 'bogus': use none, or one or more of sequential, merged, joint" in capsys.readouterr().err


def _repoint(ws, stage_domains: int, domain: str, ref: str):
    """Register a router version over the first `stage_domains` domains that serves `domain` with `ref`:
    the shape of a re-pointing (an earlier domain served by a later version of another adapter)."""
    from routing.routers import load_router, read_files

    reg = ws.registry
    info = [r for r in reg.search_router_versions(ws.router_kind) if len(r.covers) == stage_domains][-1]
    router = load_router(read_files(reg.router_path(info)))
    router.set_ref(domain, ref)
    return reg.register_router(ws.router_kind, kind=ws.router_kind, files=router.to_files(),
                               covers=[router.refs[d] for d in router.domains], metrics=info.metrics)


def test_routed_figures_are_measured_afresh_for_a_new_router_version(joint, tmp_path, capsys):
    ws = _copy_ws(joint[0], tmp_path)
    before = joint[2]
    new = _repoint(ws, 2, "cats", "law:1")  # the stage after law now serves cats with law's adapter
    assert main(["audit", "--workspace", str(ws.path)]) == 0
    assert "served: cats cats:1 -> law:1 (after law) -> cats:1 (after sports); law law:1; sports sports:1" \
        in " ".join(capsys.readouterr().out.split())
    audit = ws.registry.get_latest_audit()
    s = audit.summary
    # the routed figures of the stage after law (stage number 1) were measured again, its router
    # changed; the first stage's were not; own and base figures of earlier stages were reused
    routed = _rows_of(ws, audit.id, "R.routed.loss")
    assert {r for r in routed if r[0] < 2} == {(1, "cats"), (1, "law"), (1, "sports")}
    assert {r for r in _rows_of(ws, audit.id, "R.own.loss") if r[0] < 2} == set()
    assert s["stage_routers"] == {"0": "hybrid:1", "1": new.ref, "2": "hybrid:3"}
    assert s["served"] == {"cats": ["cats:1", "law:1", "cats:1"], "law": [None, "law:1", "law:1"],
                           "sports": [None, None, "sports:1"]}
    # own is each domain's own version (the oracle), routed is what the router served
    R_own, R_routed = s["matrices"]["own"], s["matrices"]["routed"]
    assert R_own[1] == before.matrices["own"][1] and R_own[1][0] == R_own[0][0]
    law_on_cats = ws.routed_model.engine.loss(
        [r["text"] for r in ws.registry.get_domain_eval("cats")],
        __import__("routing.engine", fromlist=["Routing"]).Routing.one(ws.routed_model.ensure_adapter("law:1")))
    assert R_routed[1][0] == pytest.approx(float(law_on_cats.mean()), rel=0.02)
    assert R_routed[1][0] > before.matrices["routed"][1][0] + 0.05  # law's adapter serves cats worse
    assert s["metrics"]["routed"]["forgetting"]["cats"] == pytest.approx(R_routed[2][0] - R_routed[0][0], abs=1e-9)
    report = open(f"{ws.path}/audits/{audit.id:04d}/report.md").read()
    assert f"| after law | {new.ref} | law:1 | law:1 | - |" in report
    assert "| own (final) | | cats:1 | law:1 | sports:1 |" in report
    # an audit with the same routers measures no routed figure of an earlier stage again
    again = run_audit(ws, progress=False)
    assert {r for r in _rows_of(ws, again.audit_id, "R.routed.loss") if r[0] < 2} == set()
