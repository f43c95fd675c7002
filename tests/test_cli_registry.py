"""The `plait registry` CLI contract: real workspace, real SQLite, real PEFT folders."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from plait.cli import main
from tests.conftest import tree_hashes


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ws(workspace, tiny_loras, capsys):
    w = ["--workspace", workspace.path]
    for lora in tiny_loras[:3]:
        assert cli(capsys, "registry", "import", lora, "--name", "demo", "--domain", "d", *w)[0] == 0
    return workspace, w


def test_contract_round_trip(ws, capsys, tmp_path):
    workspace, w = ws
    code, out, _ = cli(capsys, "registry", "list", "--json", *w)
    rows = json.loads(out)
    assert code == 0 and [(r["name"], r["versions"], r["latest"]) for r in rows] == [("demo", 3, 3)]
    code, out, _ = cli(capsys, "registry", "versions", "demo", "--json", *w)
    versions = json.loads(out)
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert versions[0]["parents"][0]["relation"] == "import"
    assert versions[0]["parents"][0]["base"] == workspace.base_fingerprint
    assert cli(capsys, "registry", "alias", "demo:2", "production", *w)[1].strip() == "demo@production -> demo:2"
    shown = json.loads(cli(capsys, "registry", "show", "demo@production", "--json", *w)[1])
    assert shown["ref"] == "demo:2" and shown["aliases"] == ["production"] and shown["sha256"] == versions[1]["sha256"]
    graph = json.loads(cli(capsys, "registry", "lineage", "demo:3", "--json", *w)[1])
    assert graph["root"] == "demo:3" and graph["edges"][0]["relation"] == "import"
    assert cli(capsys, "registry", "export", "demo@production", tmp_path / "out", *w)[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    code, out, _ = cli(capsys, "registry", "verify", "--json", *w)
    assert code == 0 and json.loads(out) == {"ok": True, "checked": 3, "failed": []}
    code, out, _ = cli(capsys, "registry", "list", *w)  # the rich table
    assert code == 0 and "demo" in out and "production->2" in out


def test_verify_exits_1_on_tampering(ws, capsys):
    workspace, w = ws
    info = workspace.registry.get_version("demo:1")
    f = workspace.registry.store.path(info.location) / "adapter_config.json"
    f.chmod(f.stat().st_mode | stat.S_IWUSR)
    f.write_text(f.read_text().replace('"r": 4', '"r": 8'))
    code, out, err = cli(capsys, "registry", "verify", *w)
    assert code == 1 and "FAILED demo:1" in err and info.sha256 in err and "1 failed" in out


@pytest.mark.parametrize("args,message", [
    (["registry", "show", "nope"], "error: no adapter named 'nope'"),
    (["registry", "show", "demo:7"], "error: demo:7: adapter 'demo' has no version 7 (newest: 3)"),
    (["registry", "show", "demo@prod"], "error: demo@prod: adapter 'demo' has no alias 'prod' (aliases: none)"),
    (["registry", "import", "{lora}", "--name", "../evil", "--domain", "d"], "error: invalid adapter name '../evil'"),
    (["registry", "import", "{lora}", "--name", "a b", "--domain", "d"], "error: invalid adapter name 'a b'"),
    (["registry", "import", "{lora}", "--name", "ok", "--domain", "x\x01"], "error: invalid domain name 'x\\x01'"),
    (["registry", "import", "/nonexistent/dir", "--name", "ok", "--domain", "d"], "error: /nonexistent/dir is not a directory"),
    (["registry", "alias", "demo:1", "../up"], "error: invalid alias '../up'"),
    (["registry", "lineage", "demo", "--direction", "sideways"], "error: unknown lineage direction 'sideways'"),
])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(ws, capsys, tiny_loras, args, message):
    workspace, w = ws
    before_db, before_files = workspace.registry.dump(), tree_hashes(workspace.path / "artifacts")
    code, out, err = cli(capsys, *[a.format(lora=tiny_loras[3]) for a in args], *w)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err
    assert workspace.registry.dump() == before_db
    assert tree_hashes(workspace.path / "artifacts") == before_files


def test_missing_workspace_is_a_clear_error(tmp_path, capsys):
    code, _, err = cli(capsys, "registry", "list", "--workspace", tmp_path / "none")
    assert code == 2 and "no plait workspace at" in err and "plait init --workspace" in err


def test_console_script_help_and_exit_codes(ws):
    _, w = ws
    exe = [sys.executable, "-m", "plait.cli"]
    help_text = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "registry" in help_text.stdout and "init" in help_text.stdout
    bad = subprocess.run([*exe, "registry", "show", "nope", *map(str, w)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "error: no adapter named 'nope'; `plait registry list` shows the adapters\n"
