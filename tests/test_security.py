"""Security: no unsafe deserialisation or remote code anywhere in the code, and no name or
stored location can reach outside the workspace.

The code scan parses every .py file of the project (AST, so strings and comments never
count) and fails naming file:line for:

    torch.load(...) without weights_only=True    pickle / cPickle / dill / joblib loads
    numpy.load(..., allow_pickle=True)            yaml.load without an explicit safe Loader
    trust_remote_code=True                        eval(...) / exec(...) (allow-listed with a reason)
"""

from __future__ import annotations

import ast
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from registry.errors import BadInputError, IntegrityError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["registry", "training", "routing", "plait", "bench", "tests", "examples", "notebooks"]

#: (relative path, call name) -> why it is safe. Keep it short and specific.
ALLOWED: dict[tuple[str, str], str] = {
    ("bench/registry_scale.py", "exec"): "compiles the repository's own tests/test_registry_concurrency.py source to "
                                         "reuse its WRITER script; no outside input reaches it",
}

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def find_unsafe(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, what) for every unsafe call in `source`."""
    tree = ast.parse(source, filename=filename)
    aliases: dict[str, str] = {}  # local name -> the module.function it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            found.append((node.value.lineno, "trust_remote_code is not False"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        module, _, func = full.rpartition(".")
        if full == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif module.split(".")[0] in PICKLE_MODULES and func in ("load", "loads", "Unpickler", "open"):
            found.append((node.lineno, f"{full} (pickle deserialisation)"))
        elif full in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append((node.lineno, "numpy.load with allow_pickle=True"))
        elif full == "yaml.load" and _kw(node, "Loader") is None:
            found.append((node.lineno, "yaml.load without an explicit safe Loader"))
        elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and full in ("eval", "exec"):
            found.append((node.lineno, f"{node.func.id}(...)"))
    return sorted(found)


def project_files() -> list[Path]:
    return sorted(p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")
                  if ".venv" not in p.parts)


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle, torch, yaml, numpy as np
from torch import load as tload
import joblib
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
tload("x.pt")
pickle.loads(b"")
joblib.load("m.joblib")
np.load("a.npy", allow_pickle=True)
yaml.load("a: 1")
AutoModel.from_pretrained("x", trust_remote_code=True)
eval("1 + 1")
exec("x = 1")
"""
    ok = """
import torch, yaml, numpy as np
torch.load("x.pt", weights_only=True)
np.load("a.npy")
yaml.load("a: 1", Loader=yaml.SafeLoader)
AutoModel.from_pretrained("x", trust_remote_code=False)
model.eval()
text = "pickle.load(f) torch.load(x) eval(y)"
"""
    assert [line for line, _ in find_unsafe(bad)] == list(range(5, 15))
    assert find_unsafe(ok) == []


def test_no_unsafe_deserialisation_or_remote_code_in_the_project():
    files = project_files()
    assert len(files) > 20 and any(p.parts[-2] == "registry" for p in files)  # the scan sees the code
    problems, used = [], set()
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, what in find_unsafe(path.read_text(), rel):
            key = (rel, what.split("(")[0].strip())
            if key in ALLOWED:
                used.add(key)
                continue
            problems.append(f"{rel}:{line}: {what}")
    assert problems == [], "unsafe calls:\n" + "\n".join(problems)
    assert used == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - used}"


# ----------------------------------------------------------------- paths cannot escape
FP = "sha256:" + "12" * 32


def _registered(registry, tiny_loras):
    return registry.register_version("legal", domain="law", kind="lora", files=tiny_loras[0], base_fingerprint=FP)


@pytest.mark.parametrize("location", ["../../etc", "/etc", "sha256/../../..", "sha256/ab/../../../outside", ".",
                                      ""])
def test_store_refuses_locations_outside_it(tmp_path, location):
    from registry.store import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(IntegrityError, match="points outside the store"):
        store.path(location)


@pytest.mark.parametrize("location", ["../../etc", "/etc", "sha256/../../../../tmp"])
def test_a_crafted_location_in_the_database_is_refused_on_load(registry, tiny_loras, location, tmp_path):
    """Someone with write access to the database points a version at a folder outside the store."""
    v = _registered(registry, tiny_loras)
    with registry.engine.begin() as conn:
        conn.execute(text("UPDATE adapterversion SET location = :loc WHERE id = :id"), {"loc": location, "id": v.id})
    with pytest.raises(IntegrityError) as err:
        registry.artifact_path("legal:1")
    assert "points outside the store" in str(err.value) and location in str(err.value)
    with pytest.raises(IntegrityError):
        registry.export_version("legal:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = registry.verify()
    assert [(r["ref"], r["ok"]) for r in report] == [("legal:1", False)]
    assert "points outside the store" in report[0]["error"]
    before = sorted(p.name for p in Path("/etc").iterdir())
    registry.gc(grace_s=0)  # gc walks the store, never a location read from the database
    assert sorted(p.name for p in Path("/etc").iterdir()) == before


def test_a_symlinked_artifact_folder_is_refused(registry, tiny_loras, tmp_path):
    """The store folder of a version swapped for a link to elsewhere: the resolved path is outside."""
    import shutil

    v = _registered(registry, tiny_loras)
    folder = registry.store.path(v.location)
    outside = tmp_path / "outside"
    shutil.copytree(folder, outside)
    for f in folder.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="points outside the store"):
        registry.artifact_path("legal:1")


def test_a_symlink_inside_an_artifact_is_refused(registry, tiny_loras):
    v = _registered(registry, tiny_loras)
    folder = registry.store.path(v.location)
    folder.chmod(folder.stat().st_mode | stat.S_IWUSR)
    (folder / "extra.safetensors").symlink_to("/etc/passwd")
    with pytest.raises((IntegrityError, BadInputError), match="symbolic link|failed its hash check"):
        registry.artifact_path("legal:1")


@pytest.mark.parametrize("rel", ["../escape.json", "/abs.json", "a/../../escape.json"])
def test_artifact_file_names_cannot_escape(tmp_path, rel):
    from registry.store import ArtifactStore

    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(BadInputError, match="escapes the artifact folder"):
        store.put({rel: b"x"})
    assert not (tmp_path / "escape.json").exists() and not Path("/abs.json").exists()
    assert store.locations() == [] and list((tmp_path / "artifacts" / ".tmp").iterdir()) == []


def test_workspace_paths_built_from_names_stay_inside(workspace):
    """Every place a name becomes a path goes through validate_name first."""
    from registry.names import validate_name

    for bad in ["../x", "..", "a/b", "/etc"]:
        with pytest.raises(BadInputError):
            validate_name(bad)
        with pytest.raises(BadInputError):
            workspace.registry.register_version(bad, domain="law", kind="lora", files={"a": b"1"}, base_fingerprint=FP)
        with pytest.raises(BadInputError):
            workspace.registry.create_domain(bad)
    from training.trainer import TrainConfig

    with pytest.raises(BadInputError):
        TrainConfig(name="../../etc")
    assert sorted(p.name for p in workspace.path.iterdir()) == ["artifacts", "plait.toml", "registry.db"] or \
        set(p.name for p in workspace.path.iterdir()) <= {"artifacts", "plait.toml", "registry.db", "registry.db-wal",
                                                         "registry.db-shm"}


# ----------------------------------------------------------------- secrets (issue 15 item 7)
PG_WITH_PASSWORD = "postgresql+psycopg2://plait:s3cret-pw@db.internal:5432/plait"


def _config_only_workspace(root: Path, db_url: str) -> Path:
    """A workspace folder whose plait.toml names `db_url` (the database is never opened)."""
    from plait.workspace import WorkspaceConfig

    root.mkdir()
    (root / "plait.toml").write_text(WorkspaceConfig(base_model="smollm2", db_url=db_url).to_toml())
    return root


def test_plait_toml_is_written_readable_by_its_owner_only(tmp_path, tiny_base):
    import os

    from plait.workspace import Workspace

    old = os.umask(0o022)  # the usual umask: without care the file would be 0644
    try:
        ws = Workspace.init(tmp_path / "ws", base_model=str(tiny_base), tracking_uri="none")
    finally:
        os.umask(old)
    assert stat.S_IMODE((ws.path / "plait.toml").stat().st_mode) == 0o600
    (ws.path / "plait.toml").chmod(0o644)  # a workspace made before: init again tightens it
    Workspace.init(tmp_path / "ws", base_model=str(tiny_base), tracking_uri="none")
    assert stat.S_IMODE((ws.path / "plait.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize("url,shown", [
    (PG_WITH_PASSWORD, "postgresql+psycopg2://plait:***@db.internal:5432/plait"),
    ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
    ("http://user:tok@mlflow.internal:5000", "http://user:***@mlflow.internal:5000"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ("", ""),
])
def test_mask_password(url, shown):
    from plait.workspace import mask_password

    assert mask_password(url) == shown


def test_workspace_output_and_messages_never_show_the_password(tmp_path):
    from plait.workspace import Workspace

    root = _config_only_workspace(tmp_path / "ws", PG_WITH_PASSWORD)
    ws = Workspace(root)
    assert ws.db_url == PG_WITH_PASSWORD  # the engine still gets it
    described = json.dumps(ws.describe())
    assert "s3cret-pw" not in described and "plait:***@db.internal" in described
    with pytest.raises(BadInputError) as err:  # init again with other settings: the message names the old ones
        Workspace.init(root, base_model="other", db_url=PG_WITH_PASSWORD)
    assert "s3cret-pw" not in str(err.value) and "plait:***@db.internal" in str(err.value)


def test_the_password_can_come_from_the_environment(tmp_path, monkeypatch):
    from plait.workspace import Workspace

    root = _config_only_workspace(tmp_path / "ws", "postgresql+psycopg2://plait@db.internal:5432/plait")
    monkeypatch.setenv("PLAIT_DB_PASSWORD", "from-env")
    ws = Workspace(root)
    assert ws.db_url == "postgresql+psycopg2://plait:from-env@db.internal:5432/plait"
    assert "from-env" not in (root / "plait.toml").read_text() and "from-env" not in json.dumps(ws.describe())
    nouser = _config_only_workspace(tmp_path / "nouser", "postgresql+psycopg2://db.internal/plait")
    with pytest.raises(BadInputError, match="PLAIT_DB_PASSWORD is set but the registry URL .* names no user"):
        Workspace(nouser).db_url  # noqa: B018


@pytest.mark.postgres
def test_init_with_a_password_prints_it_nowhere(postgres_url, tmp_path, tiny_base, capsys):
    """A real server (it trusts loopback, so any password connects): text and --json output."""
    from sqlalchemy.engine import make_url

    from plait.cli import main

    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    for extra, ws in (([], "a"), (["--json"], "b")):
        code = main(["init", "--workspace", str(tmp_path / ws), "--base-model", str(tiny_base), "--db", url,
                     "--tracking-uri", "none", *extra])
        out, err = capsys.readouterr()
        assert code == 0 and "s3cret-pw" not in out + err and ":***@" in out
    assert json.loads(out)["db_url"].count("***") == 1
    assert stat.S_IMODE((tmp_path / "b" / "plait.toml").stat().st_mode) == 0o600
