"""`plait train` through the CLI: on the tiny base (fast), and on the shipped SmolLM2 (integration)."""

from __future__ import annotations

import json

import pytest

from plait.cli import main
from tests.train_helpers import write_jsonl

METRICS = {"eval_loss", "eval_perplexity", "base_eval_loss", "train_tokens_per_s", "peak_rss_mb", "trainable_params"}


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(word: str, n: int = 16) -> list[dict]:
    return [{"text": f"{word} report {i}: the {word} market rose and the {word} desk was busy."} for i in range(n)]


def test_train_on_the_tiny_base_prints_a_summary_and_json(workspace, tmp_path, capsys):
    w = ["--workspace", workspace.path]
    data = write_jsonl(tmp_path / "law.jsonl", rows("law"))
    code, out, err = cli(capsys, "train", "law", "--data", data, "--steps", 3, "--max-length", 32,
                         "--batch-size", 2, "--lr", 0.01, "--dtype", "fp32", *w)
    assert code == 0, err
    assert "registered law:1  (lora, domain law, 3 steps)" in out and "eval loss" in out
    code, out, err = cli(capsys, "train", "law", "--data", data, "--steps", 2, "--max-length", 32, "--from", "law:1",
                         "--dtype", "fp32", "--json", *w)
    assert code == 0, err
    added = json.loads(out)
    summary = added["train"]
    assert added["router"]["covers"] == ["law:2"]  # the router now serves the new version for law
    assert added["audit"]["passed"] is True and added["audit"]["domains"] == ["law"]
    assert summary["ref"] == "law:2" and summary["parents"] == [{"ref": "law:1", "relation": "warm-start",
                                                                 "weight": None}]
    assert set(summary["metrics"]) == METRICS
    code, out, err = cli(capsys, "train", "med", "--data", data, "--method", "bottleneck", "--steps", 2,
                         "--max-length", 32, "-o", "placement=houlsby", "-o", "reduction_factor=8", "--json", *w)
    assert code == 0, err
    v = workspace.registry.get_version("med:1")
    assert v.kind == "bottleneck" and v.config["adapter"]["placement"] == "houlsby"
    assert v.config["adapter"]["reduction_factor"] == 8


def test_train_errors_are_one_line_with_exit_2(workspace, tmp_path, capsys):
    w = ["--workspace", workspace.path]
    data = write_jsonl(tmp_path / "d.jsonl", rows("x"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    cases = [
        (["train", "d", "--data", bad], f'error: {bad}:2: the row has no "text" or "prompt" + "completion" field '
                                        f'(fields: txt)'),
        (["train", "d", "--data", data, "--rank", 0], "error: rank 0 is invalid: use a whole number >= 1"),
        (["train", "d", "--data", data, "--steps", 2, "--epochs", 1], "error: give --steps (2) or --epochs (1.0), "
                                                                      "not both"),
        (["train", "d", "--data", data, "-o", "rank"], "error: option 'rank' is invalid: write KEY=VALUE, "
                                                       "e.g. --option placement=houlsby"),
        (["train", "d", "--data", data, "--from", "nope:1"], "error: no adapter named 'nope'; `plait registry list` "
                                                             "shows the adapters"),
        (["train", "d", "--data", tmp_path / "none.jsonl"], f"error: data {tmp_path / 'none.jsonl'} does not exist; "
                                                            f"give a file (.jsonl, .json (one object per line), .csv, "
                                                            f".parquet, or a folder of .txt files)"),
    ]
    for args, message in cases:
        code, out, err = cli(capsys, *args, *w)
        assert (code, err.strip()) == (2, message), args
    assert workspace.registry.search_versions() == []


@pytest.mark.integration
def test_train_each_kind_on_smollm2_through_the_cli(tmp_path, capsys, monkeypatch):
    """Three short runs on the shipped SmolLM2-135M: each kind trains and registers with its metrics."""
    from plait.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", base_model="smollm2", tracking_uri="none")
    w = ["--workspace", ws.path]
    data = write_jsonl(tmp_path / "fin.jsonl", rows("finance", 24))
    for kind in ("lora", "qlora", "bottleneck"):
        code, out, err = cli(capsys, "train", "finance", "--name", f"fin-{kind}", "--method", kind, "--data", data,
                             "--steps", 3, "--batch-size", 2, "--max-length", 64, "--lr", 2e-3, "--no-audit", "--json", *w)
        assert code == 0, err
        added = json.loads(out)
        s = added["train"]
        assert added["router"]["covers"] == [f"fin-{kind}:1"] and "audit" not in added
        assert s["ref"] == f"fin-{kind}:1" and s["kind"] == kind and s["steps"] == 3
        assert set(s["metrics"]) == METRICS
        assert s["metrics"]["eval_loss"] < s["metrics"]["base_eval_loss"]
        assert s["metrics"]["trainable_params"] > 0 and s["metrics"]["train_tokens_per_s"] > 0
        v = ws.registry.get_version(s["ref"])
        assert v.base_fingerprint == ws.base_fingerprint and v.config["base_quantized"] == (kind == "qlora")
        assert {m["name"] for m in ws.registry.get_metrics(s["ref"])} == METRICS
    assert [r.name for r in ws.registry.search_adapters()] == ["fin-bottleneck", "fin-lora", "fin-qlora"]


@pytest.mark.parametrize("lower,cli", [
    ("give the step count (2) or the epoch count (1.0), not both", "give --steps (2) or --epochs (1.0), not both"),
    ("batch size 3 does not split across 2 processes: use a multiple of 2 (e.g. a batch size of 4)",
     "batch size 3 does not split across 2 processes: use a multiple of 2 (e.g. --batch-size 4)"),
    ("x:1 is a lora adapter; warm-start it as adapter kind lora (or give no adapter kind)",
     "x:1 is a lora adapter; warm-start it with --method lora (or leave --method out)"),
    ("a warm start keeps the shape of x:1; give no rank or kind options (or train a fresh adapter: init base)",
     "a warm start keeps the shape of x:1; leave out --rank and --option (or train a fresh adapter: --init base)"),
    ("merge method linear needs adapters of one rank, got ranks [4, 8]; use merge method cat or ties",
     "--merge linear needs adapters of one rank, got ranks [4, 8]; use --merge cat or --merge ties"),
    ("no checkpoint to resume in /c; start afresh (do not resume)", "no checkpoint to resume in /c; start afresh (drop --resume)"),
    ("a lora version for domain 'med' needs another adapter name",
     "a lora version for domain 'med' needs another adapter name (--name)"),
    ("not a readable database (x); restore it from a backup or use another database URL",
     "not a readable database (x); restore it from a backup or use another database URL (--db)"),
    ("unknown merge method 'soup': use one of cat, ties, linear", "unknown merge method 'soup': use one of cat, ties, linear"),
    ("plait init --init base", "plait init --init base"),  # a flag already named is left alone
])
def test_lower_layers_name_settings_and_the_cli_names_the_flag(lower, cli):
    """registry/ and training/ name values and facts; the CLI spells the flag (`with_flags`)."""
    from plait.commands._common import with_flags

    assert with_flags(lower) == cli
