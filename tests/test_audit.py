"""The continual loop and the forgetting audit on a tiny real model, real registry and router."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from plait.audit import run_audit
from plait.cli import main
from tests.tiny import make_tiny_base

CATS = ["the cat sat on the mat and the cat was happy", "a cat chased the mouse across the mat"]
LAW = ["the court ruled that the contract binds the parties", "legal contracts bind the parties in court"]
TRAIN = dict(steps=30, batch_size=4, max_length=32, lr=3e-3, progress=False)


def _data(path, texts, n=40):
    path.write_text("".join(json.dumps({"text": f"{texts[i % len(texts)]} {i}"}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A workspace grown by two conflicting domains, audited after each, plus a sequential baseline."""
    from plait import Workspace

    root = tmp_path_factory.mktemp("grown")
    ws = Workspace.init(root / "ws", base_model=str(make_tiny_base(root / "base")), tracking_uri="none")
    first = ws.add_domain("cats", _data(root / "cats.jsonl", CATS), **TRAIN)
    second = ws.add_domain("law", _data(root / "law.jsonl", LAW), **TRAIN)
    # the tiny model learns little in 30 steps at the LoRA default rate (2e-4): train the baseline at
    # the domains' rate, so that it has something to forget
    audit = run_audit(ws, baselines=("sequential",), baseline_lr=TRAIN["lr"], progress=False)
    return ws, first, second, audit


def test_own_adapter_forgetting_is_exactly_zero(grown):
    ws, first, second, audit = grown
    own = audit.matrices["own"]
    assert own[0][0] == own[1][0]  # the same version on the same frozen rows: the same number
    assert audit.metrics["own"]["forgetting"] == {"cats": 0.0}
    assert audit.metrics["own"]["bwt"] == 0.0
    assert own[1][1] < audit.matrices["base"][1][1] - 0.1  # and the adapters did learn their domain
    assert own[0][0] < audit.matrices["base"][0][0] - 0.1


def test_sequential_baseline_forgets_conflicting_domains(grown):
    ws, _, _, audit = grown
    seq = audit.matrices["sequential"]
    assert audit.metrics["sequential"]["forgetting"]["cats"] > 0.1  # loss on cats rose after training law
    assert seq[1][0] > seq[0][0] + 0.1
    # the chain is kept in the registry: :2 warm-started from :1
    v2 = ws.registry.get_version("sequential-baseline:2")
    assert v2.parents == [{"ref": "sequential-baseline:1", "relation": "warm-start", "weight": None}]


def test_routed_system_matches_oracle_and_keeps_base_on_control(grown):
    ws, _, second, audit = grown
    assert audit.routing_accuracy == {"cats": 1.0, "law": 1.0}
    for d in ("cats", "law"):
        assert audit.current["routed"][d] == pytest.approx(audit.current["own"][d], rel=0.02)
    assert audit.control["delta"] <= 0.05
    assert audit.passed and audit.integrity == []
    heldout = second.router.metrics["heldout"]
    assert heldout["accuracy"] == 1.0 and heldout["confusion"] == [[4, 0], [0, 4]]


def test_earlier_stages_come_from_stored_metrics(grown):
    ws, first, second, audit = grown
    stored = ws.registry.search_audit_metrics("R.own.loss")
    by_audit = {}
    for m in stored:
        by_audit.setdefault(m["audit_id"], set()).add((m["stage"], m["eval_domain"]))
    # audit 1 measured stage 0; audit 2 measured only stage 1 (and stage 0 on the new domain, for FWT)
    assert by_audit[first.audit.audit_id] == {(0, "cats")}
    assert by_audit[second.audit.audit_id] == {(1, "cats"), (1, "law"), (0, "law")}
    assert audit.matrices["own"][0][0] == first.audit.matrices["own"][0][0]


def test_audit_keeps_the_eval_length_of_earlier_audits(grown, tmp_path, capsys):
    ws, *_ = grown
    assert all(a.summary["max_length"] == 256 for a in ws.registry.search_audits())
    copy = _copy_ws(ws, tmp_path)
    before = copy.registry.dump()
    code = main(["audit", "--max-length", "64", "--workspace", str(copy.path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --max-length 64 differs from the 256 tokens earlier audits of this workspace measured with; audit "
        "with --max-length 256 (figures at other lengths are not comparable)")
    assert copy.registry.dump() == before


def test_report_files(grown):
    *_, audit = grown
    out = audit.out_dir
    report = open(f"{out}/report.md").read()
    assert "PASSED" in report and "| cats |" in report and "sequential" in report
    assert json.load(open(f"{out}/audit.json"))["metrics"]["own"]["forgetting"] == {"cats": 0.0}
    assert open(f"{out}/heatmap.png", "rb").read(4) == b"\x89PNG"


def _copy_ws(ws, tmp_path):
    from plait import Workspace

    dest = tmp_path / "copy"
    shutil.copytree(ws.path, dest)
    return Workspace(dest)


def test_gate_fails_on_a_planted_change_of_an_adapter_file(grown, tmp_path, capsys):
    ws = _copy_ws(grown[0], tmp_path)
    info = ws.registry.get_version("cats:1")
    f = ws.registry.store.path(info.location) / "adapter_model.safetensors"
    f.chmod(f.stat().st_mode | stat.S_IWUSR)
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    f.write_bytes(bytes(data))
    code = main(["audit", "--gate", "--workspace", str(ws.path)])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "hash check failed" in out and info.sha256 in out.replace("\n", "")
    latest = ws.registry.get_latest_audit()
    assert latest.passed is False and "cats:1 failed its hash check" in latest.summary["integrity"][0]
    assert main(["registry", "alias", "law:1", "production", "--workspace", str(ws.path)]) == 2


def test_gate_fails_on_a_planted_regression_and_blocks_promotion(grown, tmp_path, capsys):
    from plait.continual import update_router
    from tests.tiny import make_peft_lora

    ws = _copy_ws(grown[0], tmp_path)
    bad = make_peft_lora(ws.config.base_model, tmp_path / "bad", seed=7, r=4)  # random, unrelated to cats
    v = ws.registry.import_peft(bad, name="cats", domain="cats", base_fingerprint=ws.base_fingerprint)
    update_router(ws, "cats", [], v.ref)  # the router now serves the regressed version for cats
    code = main(["audit", "--gate", "--max-forgetting", "0.05", "--workspace", str(ws.path)])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out and "forgetting on cats" in out
    code = main(["registry", "alias", "cats:2", "production", "--workspace", str(ws.path)])
    assert code == 2 and "latest audit" in capsys.readouterr().err
    assert main(["registry", "alias", "cats:2", "production", "--force", "--workspace", str(ws.path)]) == 0


def test_route_and_generate_cli(grown, capsys):
    ws = grown[0]
    w = ["--workspace", str(ws.path)]
    assert main(["route", "the cat on the mat", "the court and the contract", "--json", *w]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["domain"] for r in rows] == ["cats", "law"]
    assert rows[0]["adapters"][0]["ref"] == "cats:1" and rows[0]["adapters"][0]["weight"] == 1.0
    assert set(rows[0]["scores"]) == {"cats", "law"}
    assert main(["generate", "the cat", "--model", "law:1", "--max-new-tokens", "4", "--json", *w]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen[0]["adapters"] == [{"ref": "law:1", "domain": "law", "weight": 1.0}]
    # the same output as the engine run directly with that adapter
    direct = ws.routed_model.engine.generate(["the cat"], "law:1", max_new_tokens=4)
    assert gen[0]["text"] == direct[0]
    assert main(["route", "--top-k", "5", "x", *w]) == 2
    assert "top_k=5 is out of range" in capsys.readouterr().err
    assert main(["route", "--router", "oracle", "x", *w]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown router 'oracle': use one of arrow, embedding, hybrid, "
                                               "lexical, perplexity")
    assert main(["route", "--router", "lexical", "x", *w]) == 2  # a kind this workspace never fitted
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: this workspace has no 'lexical' router; it has hybrid: use --router hybrid (routers are fitted as "
        "domains are trained, for the workspace's router kind)")


def test_route_file_takes_text_and_prompt_only_rows(grown, tmp_path, capsys):
    ws = grown[0]
    w = ["--workspace", str(ws.path)]
    f = tmp_path / "q.jsonl"
    f.write_text('{"text": "the cat on the mat"}\n{"prompt": "the court and the contract"}\n'
                 '{"prompt": "a cat chased the mouse on the mat", "completion": " again"}\n')
    assert main(["route", "--file", str(f), "--json", *w]) == 0
    assert [r["domain"] for r in json.loads(capsys.readouterr().out)] == ["cats", "law", "cats"]
    f.write_text('{"text": "the cat"}\n{"completion": "x"}\n')
    assert main(["route", "--file", str(f), *w]) == 2
    assert capsys.readouterr().err.strip() == f'error: {f}:2: the row needs a non-empty "text" or "prompt" string'

