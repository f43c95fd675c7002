"""The audit's merged baseline on a tiny real model: a bottleneck domain, then two LoRAs of
different ranks, merged with peft and checked against a merge computed here by hand."""

from __future__ import annotations

import json

import pytest
import torch

from plait.audit import run_audit
from plait.cli import main
from tests.test_audit import CATS, LAW, _copy_ws, _data
from tests.tiny import make_tiny_base

SPORTS = ["the striker scored a goal in the final minute", "the team won the match and the cup"]
TRAIN = dict(steps=12, batch_size=4, max_length=32, lr=3e-3, progress=False, audit=False)


def _merged_rows(ws, audit_id):
    return {(m["stage"], m["eval_domain"]) for m in ws.registry.search_audit_metrics("R.merged.loss")
            if m["audit_id"] == audit_id}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """sports (bottleneck), cats (LoRA r=4): audit; law (LoRA r=8): audit again."""
    from plait import Workspace

    root = tmp_path_factory.mktemp("merged")
    ws = Workspace.init(root / "ws", base_model=str(make_tiny_base(root / "base")), tracking_uri="none")
    ws.add_domain("sports", _data(root / "sports.jsonl", SPORTS), method="bottleneck", **TRAIN)
    ws.add_domain("cats", _data(root / "cats.jsonl", CATS), rank=4, **TRAIN)
    first = run_audit(ws, baselines=("merged",), progress=False)
    ws.add_domain("law", _data(root / "law.jsonl", LAW), rank=8, **TRAIN)
    second = run_audit(ws, baselines=("merged",), progress=False)
    return ws, first, second


def _peft_merge_loss(ws, refs, weights, domain) -> float:
    """Mean token loss on `domain`'s eval set of peft's cat merge of `refs`, computed directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(ws.config.base_model)
    tok = AutoTokenizer.from_pretrained(ws.config.base_model)
    paths = [ws.registry.artifact_path(r)[1] for r in refs]
    pm = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="p0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"p{i}")
    pm.add_weighted_adapter([f"p{i}" for i in range(len(refs))], weights, "m", combination_type="cat")
    pm.set_adapter("m")
    pm.eval()
    losses = []
    with torch.no_grad():
        for row in ws.registry.get_domain_eval(domain):
            ids = torch.tensor([tok(row["text"])["input_ids"]])
            losses.append(pm(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_merged_matrix_shape_and_stages(staged):
    ws, first, second = staged
    R, base, own = second.matrices["merged"], second.matrices["base"], second.matrices["own"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert [[v is not None for v in row] for row in R] == [[True, True, False], [True, True, True], [True] * 3]
    assert R[0][:2] == base[0][:2]  # stage 1 holds only a bottleneck adapter: the base model
    assert R[1][1] == pytest.approx(own[1][1], abs=1e-6)  # stage 2: cats:1 alone, used as it is
    assert set(second.metrics["merged"]) >= {"acc", "bwt", "fwt", "forgetting"}
    assert set(second.metrics["merged"]["forgetting"]) == {"sports", "cats"}


def test_merged_values_equal_a_peft_merge_computed_by_hand(staged):
    ws, _, second = staged
    info = ws.registry.get_version("merged-baseline:1")
    assert info.parents == [{"ref": "cats:1", "relation": "merge", "weight": 0.5},
                            {"ref": "law:1", "relation": "merge", "weight": 0.5}]
    assert info.domain == "plait-baselines" and info.config["merge"] == "cat"
    assert json.loads((ws.registry.artifact_path(info)[1] / "adapter_config.json").read_text())["r"] == 12
    for j, d in enumerate(["sports", "cats", "law"]):
        hand = _peft_merge_loss(ws, ["cats:1", "law:1"], [0.5, 0.5], d)
        assert second.matrices["merged"][2][j] == pytest.approx(hand, abs=1e-4)
    # the cat merge is the engine's 50/50 blend of the two adapters, exactly
    from routing.engine import Routing

    eng = ws.routed_model.engine
    texts = [r["text"] for r in ws.registry.get_domain_eval("law")]
    blend = eng.loss(texts, Routing.blend({ws.routed_model.ensure_adapter("cats:1"): 0.5,
                                           ws.routed_model.ensure_adapter("law:1"): 0.5})).mean().item()
    assert second.matrices["merged"][2][2] == pytest.approx(blend, abs=1e-5)
    assert "merged-baseline:1" not in eng.adapters  # measured, then unloaded from the shared engine


def test_bottleneck_domains_are_left_out_with_a_note(staged):
    ws, _, second = staged
    stages = second.baselines["merged"]["stages"]
    assert [s["merged"] for s in stages] == [[], ["cats:1"], ["cats:1", "law:1"]]
    assert all(s["skipped_bottleneck"] == ["sports:1"] for s in stages)
    assert stages[0]["note"] == ("after sports (stage 1): no LoRA adapter to merge, the row is the base model "
                                 "(bottleneck adapters of sports:1 not mergeable, left out)")
    assert stages[2]["note"] == ("after law (stage 3): merged LoRA of cats:1, law:1 (cat, weights 1/2 each) = "
                                 "merged-baseline:1; bottleneck adapters of sports:1 not mergeable, left out")
    report = open(f"{second.out_dir}/report.md").read()
    assert stages[2]["note"] in report and "| merged |" in report
    assert json.load(open(f"{second.out_dir}/audit.json"))["baselines"]["merged"]["stages"][1]["ref"] == "cats:1"


def test_earlier_merged_figures_are_reused(staged):
    ws, first, second = staged
    assert _merged_rows(ws, first.audit_id) == {(1, "sports"), (1, "cats")}
    # the second audit measured only the new stage, and the previous stage on the new domain (FWT)
    assert _merged_rows(ws, second.audit_id) == {(1, "law"), (2, "sports"), (2, "cats"), (2, "law")}
    assert second.matrices["merged"][1][:2] == first.matrices["merged"][1][:2]


def test_reaudit_and_merge_method_on_the_cli(staged, tmp_path, capsys):
    ws = _copy_ws(staged[0], tmp_path)
    before = staged[2].matrices["merged"]
    w = ["--workspace", str(ws.path)]
    assert main(["audit", "--baseline", "merged", *w]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "merged baseline (cat):" in out and "bottleneck adapters of sports:1 not mergeable" in out
    again = ws.registry.get_latest_audit()
    assert _merged_rows(ws, again.id) == set()  # nothing measured, nothing merged again
    assert again.summary["matrices"]["merged"] == before
    assert [v.ref for v in ws.registry.search_versions(name="merged-baseline")] == ["merged-baseline:1"]

    assert main(["audit", "--baseline", "merged", "--merge", "ties", "--json", *w]) == 0
    out = json.loads(capsys.readouterr().out)
    ties = ws.registry.get_version("merged-baseline:2")  # another method is another merge, measured afresh
    assert ties.config["merge"] == "ties" and ties.config["density"] == 0.2
    assert [p["weight"] for p in ties.parents] == [1.0, 1.0]
    assert out["baselines"]["merged"]["stages"][2]["ref"] == "merged-baseline:2"
    assert _merged_rows(ws, out["audit_id"]) == {(2, "sports"), (2, "cats"), (2, "law")}
    assert out["matrices"]["merged"][2][2] != before[2][2]
    assert out["matrices"]["merged"][1] == before[1]  # one LoRA: the same for every method

    assert main(["audit", "--baseline", "merged,bogus", *w]) == 2
    assert "unknown baseline 'bogus'" in capsys.readouterr().err
    assert main(["audit", "--merge", "soup", *w]) == 2
    assert "unknown merge method 'soup'" in capsys.readouterr().err
