"""Bad input: every refusal is one line on stderr, exit code 2, and changes nothing stored.

"Nothing stored" is checked the strict way: a dump of every registry table, the sha256 of
every file under the artifact store, and the bytes of plait.toml (and, for SQLite, of the
database file itself) compare equal before and after each refused command. The workspace is
made with `plait init --db URL` on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.cli import main
from registry.errors import IncompatibleBaseError
from tests.conftest import tree_hashes

ROOT = Path(__file__).resolve().parents[1]
FP = "sha256:" + "cd" * 32


_ENGINES: list = []


@pytest.fixture(autouse=True)
def _track_engines(monkeypatch):
    """Record every engine an in-process command opens, so `close_engines` can close them.

    Each `main()` call opens a Workspace with its own engine; left to the garbage collector,
    their pooled connections pile up on PostgreSQL, and a late close of a SQLite connection
    checkpoints its WAL into a file a test has since replaced.
    """
    import registry.db as db

    real = db.make_engine

    def recording(url):
        engine = real(url)
        _ENGINES.append(engine)
        return engine

    monkeypatch.setattr(db, "make_engine", recording)
    yield
    close_engines()


def close_engines() -> None:
    while _ENGINES:
        _ENGINES.pop().dispose()


@pytest.fixture
def bad_ws(tmp_path, db_url, tiny_base, tiny_loras, monkeypatch, capsys):
    """legal (lora, law) v1 + v2 with production -> 1, and legal-q (a qlora adapter of law)."""
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    w = ["--workspace", str(ws)]
    assert main(["init", *w, "--base-model", str(tiny_base), "--db", db_url, "--tracking-uri", "none"]) == 0
    for lora in tiny_loras[:2]:
        assert main(["registry", "import", str(lora), "--name", "legal", "--domain", "law", *w]) == 0
    assert main(["registry", "alias", "legal:1", "production", *w]) == 0
    from plait.workspace import Workspace

    reg = Workspace(ws).registry
    reg.register_version("legal-q", domain="law", kind="qlora", files=tiny_loras[2], base_fingerprint=FP)
    reg.close()
    capsys.readouterr()
    return ws


def snapshot(ws: Path, db_url: str | None = None) -> dict:
    """Everything a command could change: tables, artifact files, settings, SQLite file bytes."""
    from registry.client import Registry

    url = db_url or _db_url(ws)
    reg = Registry(url, ws / "artifacts")
    try:
        tables = reg.dump()
    finally:
        reg.close()
    # (not the SQLite file's bytes: a WAL checkpoint rewrites pages without changing any row)
    return {"tables": tables, "artifacts": tree_hashes(ws / "artifacts"), "settings": (ws / "plait.toml").read_bytes()}


def _db_url(ws: Path) -> str:
    import tomllib

    return tomllib.loads((ws / "plait.toml").read_text()).get("db_url") or f"sqlite:///{ws / 'registry.db'}"


def _sqlite_file(ws: Path) -> Path:
    url = _db_url(ws)
    assert url.startswith("sqlite:///"), url
    return Path(url.removeprefix("sqlite:///"))


def run_cli(capsys, args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    close_engines()
    return code, out, err


def check_refusals(capsys, ws: Path, cases, db_url: str | None = None) -> None:
    """Run every (args, expected message start) case; all must be clean refusals."""
    problems = []
    for args, message in cases:
        before = snapshot(ws, db_url)
        code, out, err = run_cli(capsys, [*args, "--workspace", ws])
        err = without_progress_bars(err)
        one_line = err.count("\n") == 1 and err.endswith("\n")
        if code != 2 or not one_line or not err.startswith("error: " + message) or out:
            problems.append(f"{args!r}: exit {code}, stdout {out!r}, stderr {err!r} (wanted 'error: {message}...')")
        if snapshot(ws, db_url) != before:
            problems.append(f"{args!r}: stored state changed")
    assert problems == [], "\n".join(problems)


def without_progress_bars(err: str) -> str:
    """stderr without transformers' "Loading weights" progress bar, which `plait train` shows while
    loading the base (refusals that need the loaded model, e.g. a bottleneck site, come after it)."""
    lines = [line for line in err.replace("\r", "\n").split("\n")
             if line.strip() and not line.lstrip().startswith("Loading weights")]
    return "".join(line + "\n" for line in lines)


BAD_NAMES = ["../evil", "..", ".", "a/b", "/abs", "a b", " lead", "tab\there", "new\nline", "nul\x00", "esc\x1b[31m",
             "-dash", "é", "x" * 65, "a..b", "", "a\\b", "con:1"]


def test_unknown_references_and_aliases(bad_ws, capsys, tmp_path):
    out = tmp_path / "export"
    check_refusals(capsys, bad_ws, [
        (["registry", "show", "nope"], "no adapter named 'nope'"),
        (["registry", "show", "legal:9"], "legal:9: adapter 'legal' has no version 9 (newest: 2)"),
        (["registry", "show", "legal@staging"], "legal@staging: adapter 'legal' has no alias 'staging' (aliases: production)"),
        (["registry", "show", "legal:0"], "invalid version '0'"),
        (["registry", "show", "legal:-1"], "invalid version '-1'"),
        (["registry", "show", "legal:99999999999999999999"], "invalid version '99999999999999999999'"),
        (["registry", "show", "legal:2147483648"], "invalid version '2147483648'"),
        (["registry", "show", "legal:1:2"], "invalid reference 'legal:1:2'"),
        (["registry", "show", "legal@a@b"], "invalid reference 'legal@a@b'"),
        (["registry", "versions", "ghost"], "no adapter named 'ghost'"),
        (["registry", "lineage", "ghost:1"], "no adapter named 'ghost'"),
        (["registry", "metrics", "legal:7"], "legal:7: adapter 'legal' has no version 7"),
        (["registry", "export", "ghost", out], "no adapter named 'ghost'"),
        (["registry", "export", "legal@staging", out], "legal@staging: adapter 'legal' has no alias 'staging'"),
        (["registry", "alias", "ghost:1", "production"], "no adapter named 'ghost'"),
        (["registry", "alias", "legal:5", "staging"], "legal:5: adapter 'legal' has no version 5"),
        (["registry", "archive", "legal@nope"], "legal@nope: adapter 'legal' has no alias 'nope'"),
        (["registry", "rollback", "legal", "staging"], "alias legal@staging has no earlier version"),
        (["registry", "rollback", "ghost", "production"], "no adapter named 'ghost'"),
    ])
    assert not out.exists()


def test_duplicate_names_and_conflicts(bad_ws, capsys, tiny_loras):
    lora = tiny_loras[3]
    check_refusals(capsys, bad_ws, [
        (["registry", "import", lora, "--name", "legal", "--domain", "med"],
         "adapter 'legal' is a lora adapter of domain 'law'; a lora version for domain 'med' needs another adapter name (--name)"),
        (["registry", "import", lora, "--name", "legal-q", "--domain", "law"],  # another kind, same name
         "adapter 'legal-q' is a qlora adapter of domain 'law'; a lora version"),
        (["registry", "archive", "legal:1"], "legal:1 is the target of alias(es) production"),
    ])


def test_names_that_could_become_paths_or_break_output(bad_ws, capsys, tiny_loras):
    lora = tiny_loras[3]
    cases = []
    for bad in BAD_NAMES:
        shown = repr(bad)
        cases += [
            (["registry", "import", lora, "--name", bad, "--domain", "law"], f"invalid adapter name {shown}"),
            (["registry", "import", lora, "--name", "ok", "--domain", bad], f"invalid domain name {shown}"),
            # a positional argument starting with '-' is an option to click: a usage error, also exit 2
            (["registry", "alias", "legal:1", bad], f"invalid alias {shown}" if bad[:1] != "-" else "No such option"),
            (["registry", "versions", bad], f"invalid adapter name {shown}" if bad[:1] != "-" else "No such option"),
            (["registry", "list", "--domain", bad], f"invalid domain filter {shown}") if bad else None,
        ]
    check_refusals(capsys, bad_ws, [c for c in cases if c])


def test_bad_files_and_options(bad_ws, capsys, tmp_path, tiny_loras):
    def folder(name, files):
        d = tmp_path / name
        d.mkdir()
        for rel, data in files.items():
            (d / rel).write_bytes(data)
        return d

    cfg = (tiny_loras[0] / "adapter_config.json").read_bytes()
    weights = (tiny_loras[0] / "adapter_model.safetensors").read_bytes()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    full = folder("full", {"x": b"1"})
    check_refusals(capsys, bad_ws, [
        (["registry", "import", tmp_path / "missing", "--name", "x", "--domain", "d"], f"{tmp_path / 'missing'} is not a directory"),
        (["registry", "import", a_file, "--name", "x", "--domain", "d"], f"{a_file} is not a directory"),
        (["registry", "import", folder("empty", {}), "--name", "x", "--domain", "d"], "") ,
        (["registry", "import", folder("pickle", {"adapter_config.json": cfg, "adapter_model.bin": b"\x80\x04."}),
          "--name", "x", "--domain", "d"], ""),
        (["registry", "import", folder("badjson", {"adapter_config.json": b"{not json", "adapter_model.safetensors": weights}),
          "--name", "x", "--domain", "d"], ""),
        (["registry", "import", folder("latin1", {"adapter_config.json": b"\xff\xfe{}", "adapter_model.safetensors": weights}),
          "--name", "x", "--domain", "d"], ""),
        (["registry", "import", folder("prefix", {"adapter_config.json": json.dumps({"peft_type": "PREFIX_TUNING"}).encode(),
                                                  "adapter_model.safetensors": weights}), "--name", "x", "--domain", "d"],
         ""),
        (["registry", "import", folder("notst", {"adapter_config.json": cfg, "adapter_model.safetensors": b"\xff" * 64}),
          "--name", "x", "--domain", "d"], ""),
        (["registry", "import", folder("short", {"adapter_config.json": cfg, "adapter_model.safetensors": b"abc"}),
          "--name", "x", "--domain", "d"], ""),
        (["registry", "export", "legal:1", full], f"{full} exists and is not an empty directory"),
        (["registry", "export", "legal:1", a_file], f"{a_file} exists and is not an empty directory"),
        (["registry", "export", "legal:1", "/proc/plait-export"], "cannot create the export folder /proc/plait-export"),
        (["registry", "gc", "--grace", "-1"], "invalid gc grace period -1.0"),
        (["registry", "gc", "--grace", "nan"], "invalid gc grace period nan"),
        (["registry", "lineage", "legal", "--direction", "sideways"], "unknown lineage direction 'sideways'"),
    ])


def test_bad_import_folders_name_the_problem(bad_ws, capsys, tmp_path, tiny_loras):
    """The exact messages for the import refusals above (one line each, naming the fix)."""
    cfg = (tiny_loras[0] / "adapter_config.json").read_bytes()
    cases = {
        "pickle": ({"adapter_config.json": cfg, "adapter_model.bin": b"\x80\x04."},
                   "holds pickle weights (adapter_model.bin), which plait never loads; re-save with safe_serialization=True"),
        "badjson": ({"adapter_config.json": b"{not json"}, "adapter_config.json is not valid JSON"),
        "prefix": ({"adapter_config.json": b'{"peft_type": "PREFIX_TUNING"}'}, "has peft_type 'PREFIX_TUNING'; only LoRA"),
        "notst": ({"adapter_config.json": cfg, "adapter_model.safetensors": b"\xff" * 64}, "is not a safetensors file"),
        "noweights": ({"adapter_config.json": cfg}, "it has no adapter_model.safetensors"),
        "empty": ({}, "it has no adapter_config.json"),
    }
    for name, (files, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        for rel, data in files.items():
            (d / rel).write_bytes(data)
        code, out, err = run_cli(capsys, ["registry", "import", d, "--name", "x", "--domain", "d", "--workspace", bad_ws])
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)


def _corrupt_db(db: Path, how: str) -> None:
    for side in ("-wal", "-shm"):
        db.with_name(db.name + side).unlink(missing_ok=True)
    data = db.read_bytes()
    if how == "garbage":
        db.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        db.write_bytes(data[: len(data) // 2])
    else:  # a valid header followed by garbage pages
        db.write_bytes(data[:100] + os.urandom(len(data) - 100))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("how", ["garbage", "truncated", "header-only"])
def test_corrupted_database_file(bad_ws, capsys, tiny_loras, tiny_base, how):
    """Every command refuses a damaged registry.db in one line, exit 2, and never writes to it."""
    from plait.workspace import Workspace

    close_engines()  # the last close of the fixture's connections checkpoints the WAL into the file
    Workspace(bad_ws).registry.close()
    db = _sqlite_file(bad_ws)
    _corrupt_db(db, how)
    db_bytes, files = db.read_bytes(), tree_hashes(bad_ws / "artifacts")
    commands = [["registry", "list"], ["registry", "show", "legal"], ["registry", "versions", "legal"],
                ["registry", "verify"], ["registry", "gc", "--grace", "0"], ["registry", "alias", "legal:2", "staging"],
                ["registry", "import", tiny_loras[3], "--name", "new", "--domain", "law"],
                ["registry", "archive", "legal:2"], ["registry", "domains"],
                ["init", "--base-model", tiny_base, "--db", _db_url(bad_ws), "--tracking-uri", "none"]]
    for args in commands:
        code, out, err = run_cli(capsys, [*args, "--workspace", bad_ws])
        assert code == 2 and err.count("\n") == 1 and out == "", (args, code, out, err)
        assert err.startswith("error: the registry database sqlite:///") and "is not a readable database" in err, err
        assert "restore it from a backup" in err
        assert db.read_bytes() == db_bytes, args
        assert tree_hashes(bad_ws / "artifacts") == files, args


@pytest.mark.parametrize("settings,message", [
    (b"\xff\xfe\x00garbage", "is not valid TOML ('utf-8' codec can't decode"),
    (b"base_model = \n", "is not valid TOML"),
    (b'base_model = "a"\nbase_model = "b"\n', "is not valid TOML (Cannot overwrite a value"),
    (b'colour = "blue"\n', "has unknown setting(s) colour; known: base_model, db_url, repoint_margin, router, tracking_uri"),
    (b"base_model = 3\n", "setting base_model = 3 in plait.toml must be a string"),
    (b'db_url = ["x"]\n', "setting db_url = ['x'] in plait.toml must be a string"),
    (b"tracking_uri = true\n", "setting tracking_uri = True in plait.toml must be a string"),
    (b'db_url = "nosuchdialect://x"\n', "invalid registry database URL 'nosuchdialect://x'"),
    (b'db_url = "::::"\n', "invalid registry database URL '::::' (ArgumentError"),
    (b'db_url = "sqlite:////nonexistent/dir/r.db"\n', "cannot open the registry database sqlite:////nonexistent/dir/r.db"),
    (b'db_url = "postgresql+psycopg2://u@127.0.0.1:1/x"\n', "cannot open the registry database postgresql+psycopg2://u@127.0.0.1:1/x"),
])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_corrupted_settings_file(bad_ws, capsys, settings, message):
    url = _db_url(bad_ws)
    good = snapshot(bad_ws)
    (bad_ws / "plait.toml").write_bytes(settings)
    for args in (["registry", "list"], ["registry", "show", "legal"], ["registry", "verify"]):
        code, out, err = run_cli(capsys, [*args, "--workspace", bad_ws])
        assert code == 2 and err.count("\n") == 1 and out == "", (args, code, err)
        assert message in err, err
        assert (bad_ws / "plait.toml").read_bytes() == settings
    after = snapshot(bad_ws, url)
    assert {**after, "settings": good["settings"]} == good


@pytest.mark.parametrize("url", ["mysql://x/y", "::::", "postgresql+psycopg2://u@127.0.0.1:1/x"])
def test_init_with_a_bad_database_url_leaves_no_workspace(tmp_path, capsys, tiny_base, url):
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, ["init", "--workspace", ws, "--base-model", tiny_base, "--db", url])
    assert code == 2 and err.count("\n") == 1 and url in err
    assert not (ws / "plait.toml").exists()  # the next `plait init` starts clean
    code, _, err = run_cli(capsys, ["registry", "list", "--workspace", ws])
    assert code == 2 and "no plait workspace at" in err


def test_adapter_for_another_base_is_refused(tmp_path, bad_ws, capsys, tiny_loras):
    """A version records the base it was imported on; another base (one changed weight) is refused."""
    from safetensors.torch import load_file, save_file

    from plait.workspace import Workspace
    from training.base import check_compatible, fingerprint

    ws = Workspace(bad_ws)
    info = ws.registry.get_version("legal:1")
    assert info.base_fingerprint == ws.base_fingerprint  # import recorded the workspace's base
    check_compatible(info.base_fingerprint, ws.base_fingerprint, "adapter legal:1")  # same base: accepted

    other = tmp_path / "other-base"  # the same base with one weight nudged: a different model
    other.mkdir()
    src = Path(ws.config.base_model)
    for f in src.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(other / "model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] += 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    other_fp = fingerprint(other)
    assert other_fp != ws.base_fingerprint
    with pytest.raises(IncompatibleBaseError) as err:
        check_compatible(info.base_fingerprint, other_fp, f"adapter {info.ref}")
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert message.startswith("adapter legal:1 was trained on base sha256:") and info.base_fingerprint[:23] in message
    assert other_fp[:23] in message and "load it on its own base or train a new version on this one" in message

    # the load path every consumer uses (router, engine, audit): refused on the other base,
    # accepted on its own
    from training.load import load_version

    with pytest.raises(IncompatibleBaseError, match="adapter legal:1 was trained on base"):
        load_version(ws.registry, "legal:1", other)
    model, loaded_info, _ = load_version(ws.registry, "legal:1", ws.config.base_model)
    assert loaded_info.ref == "legal:1" and model is not None
    ws.registry.close()


def test_refusal_is_one_line_on_real_stderr(bad_ws):
    """The console script itself (not the in-process runner): exit 2, one stderr line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "plait.cli", "registry", "import", str(ROOT), "--name", "../../etc",
                        "--domain", "law", "--workspace", str(bad_ws)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: invalid adapter name '../../etc': use 1-64 letters, digits, '.', '_' or "
                                     "'-', starting with a letter or digit (no '/', '..', spaces or control characters)"]


# ----------------------------------------------------------------- plait train: data and options
def _train(data, *extra):
    return ["train", "law", "--data", data, "--steps", 2, "--max-length", 32, "--batch-size", 2, "--dtype", "fp32",
            *extra]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_training_data_and_options(bad_ws, capsys, tmp_path):
    """Each bad data file or option: one line naming the file:line or value, exit 2, nothing stored,
    no checkpoint left behind."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"the court ruled on case {i}"}) + "\n" for i in range(8)))

    def data(name: str, content: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(content)
        return p

    malformed = data("malformed.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": "broken\n')
    empty = data("empty.jsonl", b"")
    blank = data("blank.jsonl", b"\n\n   \n")
    no_field = data("nofield.jsonl", b'{"text": "fine"}\n{"body": "where is text?"}\n')
    half_pair = data("halfpair.jsonl", b'{"prompt": "q?"}\n')
    latin1 = data("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    huge = data("huge.jsonl", b'{"text": "' + b"x" * (10 * 1024 * 1024) + b'"}\n')
    not_obj = data("list.jsonl", b'["text", "x"]\n')
    wrong_type = data("int.jsonl", b'{"text": 42}\n')
    unknown_ext = data("data.xml", b"<rows/>")
    bad_csv = data("bad.csv", b"body\nhello\n")
    check_refusals(capsys, bad_ws, [
        (_train(malformed), f'{malformed}:3: not valid JSON'),
        (_train(empty), f"{empty} holds no rows"),
        (_train(blank), f"{blank} holds no rows"),
        (_train(no_field), f'{no_field}:2: the row has no "text" or "prompt" + "completion" field (fields: body)'),
        (_train(half_pair), f'{half_pair}:1: "completion" must be a string (missing)'),
        (_train(latin1), f"{latin1}:2: not UTF-8 (byte 0xe9 at column 14)"),
        (_train(huge), f"{huge}:1: the row is 10,485,773 bytes, over the 1,000,000-byte limit"),
        (_train(not_obj), f'{not_obj}:1: expected an object with "text"'),
        (_train(wrong_type), f'{wrong_type}:1: "text" must be a string, got int'),
        (_train(unknown_ext), f"{unknown_ext}: unknown data format '.xml'"),
        (_train(bad_csv), f'{bad_csv}:1: the CSV header (body) has no "text" column'),
        (_train(tmp_path / "missing.jsonl"), f"data {tmp_path / 'missing.jsonl'} does not exist"),
        (_train(good, "--rank", -1), "rank -1 is invalid: use a whole number >= 1"),
        (_train(good, "--rank", 0), "rank 0 is invalid: use a whole number >= 1"),
        (["train", "law", "--data", good, "--steps", 0], "steps 0 is invalid: use a whole number >= 1"),
        (["train", "law", "--data", good, "--steps", -3], "steps -3 is invalid"),
        (["train", "law", "--data", good, "--epochs", 0], "epochs 0.0 is invalid: use a number > 0"),
        (_train(good, "--lr", 5), "learning rate 5.0 is invalid"),
        (_train(good, "--batch-size", 0), "batch size 0 is invalid"),
        (_train(good, "--name", "../../etc"), "invalid adapter name '../../etc'"),
        (["train", "../law", "--data", good], "invalid domain name '../law'"),
        (_train(good, "--from", "legal:03"), "invalid version '03'"),
        (_train(good, "--method", "bottleneck", "-o", "layers_path=transformer.h"),
         "LlamaForCausalLM has no module 'transformer.h' holding its blocks; set layers_path"),
        (_train(good, "--method", "bottleneck", "-o", 'sites={"mlp": "ffn"}'),
         "module model.layers.0.ffn does not exist in this architecture"),
        (_train(good, "--method", "bottleneck", "-o", "placement=sideways"),
         "bottleneck placement 'sideways' is invalid: use pfeiffer or houlsby"),
    ])
    assert not (bad_ws / "checkpoints").exists() or list((bad_ws / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_warm_start_from_an_adapter_of_another_base_is_refused(bad_ws, capsys, tmp_path, tiny_loras):
    """`plait train --from` on a version trained on another base: exit 2 naming both fingerprints."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"the court ruled on case {i}"}) + "\n" for i in range(8)))
    from plait.workspace import Workspace

    ws = Workspace(bad_ws)
    ws_fp = ws.base_fingerprint
    ws.registry.register_version("foreign", domain="law", kind="lora", files=tiny_loras[3], base_fingerprint=FP)
    ws.registry.close()
    check_refusals(capsys, bad_ws, [
        (_train(good, "--from", "foreign:1"),
         f"adapter foreign:1 was trained on base {FP[:23]}…, but the loaded base is {ws_fp[:23]}…; "
         f"load it on its own base or train a new version on this one"),
    ])
