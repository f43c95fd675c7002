"""Crash safety: `plait` commands killed with SIGKILL at named fault points and at random times.

Every command runs as a real process (`python -m plait.cli ...`) against a real workspace on
SQLite and on PostgreSQL. The registry code kills its own process (`os.kill(pid, 9)`) when
the environment variable PLAIT_FAULT_POINT names the point it has reached:

    store.write             a file is half copied into the writer's temp folder (not fsynced)
    store.before_rename     the artifact is complete in its temp folder, not yet in place
    registry.before_commit  the artifact is in place, the version row is not committed
    registry.after_commit   the version is committed, the MLflow mirror has not run
    store.remove            gc moved an artifact out of its place and has not deleted it

After every kill: `plait registry verify` exits 0, every visible version's artifact is
complete and matches its hash, `plait registry gc --grace 0` removes the leftovers (temp
folders, unreferenced artifacts) and nothing else, and the same command run again succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.cli import main
from tests.conftest import tree_hashes

ROOT = Path(__file__).resolve().parents[1]


def plait(*args, fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `plait ARGS` in a fresh interpreter; with `fault`, the process kills itself there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PLAIT_FAULT_POINT", None)
    if fault:
        env["PLAIT_FAULT_POINT"] = fault
    return subprocess.run([sys.executable, "-m", "plait.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def crash_ws(tmp_path, db_url, tiny_base, tiny_loras, monkeypatch, capsys):
    """A workspace made with `plait init --db URL` holding one imported version (`legal:1`)."""
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    assert main(["init", "--workspace", str(ws), "--base-model", str(tiny_base), "--db", db_url,
                 "--tracking-uri", "none"]) == 0
    assert main(["registry", "import", str(tiny_loras[0]), "--name", "legal", "--domain", "law",
                 "--workspace", str(ws)]) == 0
    capsys.readouterr()
    return ws


def open_registry(ws: Path):
    from plait.workspace import Workspace

    return Workspace(ws).registry


def check_consistent(ws: Path) -> dict:
    """The invariants that must hold after any crash; returns what the store held before gc.

    Returns:
        {"versions": refs visible, "temp": leftover temp folders, "orphans": unreferenced
         artifact locations} as found before `gc --grace 0` cleaned them.
    """
    r = plait("registry", "verify", "--json", "--workspace", ws)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and report["failed"] == []
    reg = open_registry(ws)
    try:
        versions = reg.search_versions(include_archived=True)
        ready = [v for v in versions if v.status == "ready"]  # gc may collect an archived version's files
        for v in ready:  # no half-written version, no version pointing at a missing artifact
            _, path = reg.artifact_path(v)
            assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        tables = reg.dump()
        referenced = {v.location for v in ready}
        referenced |= {r["location"] for r in tables["routerversion"] if r["status"] == "ready"}
        referenced |= {r[k] for r in tables["domain"] for k in ("eval_location", "validation_location", "train_location") if r.get(k)}
        tmp_root = reg.store.root / ".tmp"
        found = {"versions": sorted(v.ref for v in versions),
                 "temp": sorted(p.name for p in tmp_root.iterdir()) if tmp_root.is_dir() else [],
                 "orphans": sorted(set(reg.store.locations()) - referenced)}
        assert referenced <= set(reg.store.locations())
        before_gc = reg.dump()
        r = plait("registry", "gc", "--grace", "0", "--workspace", ws)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"removed {len(found['orphans'])} artifact(s)")
        assert f"{len(found['temp'])} temp folder(s)" in r.stdout
        assert reg.dump() == before_gc  # gc touches files only
        assert set(reg.store.locations()) == referenced  # every leftover gone, nothing live removed
        assert not tmp_root.is_dir() or list(tmp_root.iterdir()) == []
        assert all(row["ok"] for row in reg.verify())
    finally:
        reg.close()
    return found


IMPORT_CASES = [
    # fault point, does the new version exist after the kill, what the crash leaves behind
    ("store.write", False, "temp"),
    ("store.before_rename", False, "temp"),
    ("registry.before_commit", False, "orphan"),
    ("registry.after_commit", True, None),
]


@pytest.mark.parametrize("point,committed,leftover", IMPORT_CASES)
def test_import_killed_at_fault_point(crash_ws, tiny_loras, point, committed, leftover):
    ws = crash_ws
    reg = open_registry(ws)
    before_db, before_files = reg.dump(), tree_hashes(ws / "artifacts" / "sha256")
    reg.close()
    cmd = ("registry", "import", tiny_loras[1], "--name", "legal", "--domain", "law", "--workspace", ws)
    killed = plait(*cmd, fault=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)  # the fault point was reached

    reg = open_registry(ws)
    if committed:
        assert reg.get_version("legal").ref == "legal:2"
    else:
        assert reg.dump() == before_db  # not one row written
    reg.close()
    found = check_consistent(ws)
    assert found["versions"] == (["legal:1", "legal:2"] if committed else ["legal:1"])
    assert len(found["temp"]) == (1 if leftover == "temp" else 0)
    assert len(found["orphans"]) == (1 if leftover == "orphan" else 0)
    if not committed:  # after gc the store holds exactly what it held before the crash
        assert tree_hashes(ws / "artifacts" / "sha256") == before_files

    again = plait(*cmd)
    assert again.returncode == 0, again.stderr
    expected = "legal:3" if committed else "legal:2"
    assert again.stdout.startswith(f"imported {tiny_loras[1]} as {expected}")
    found = check_consistent(ws)
    assert found["versions"][-1] == expected and found["temp"] == [] and found["orphans"] == []


def test_gc_killed_while_removing(crash_ws, tiny_loras):
    """A gc killed in the middle of deleting an artifact leaves no half artifact in the store,
    and importing the same content again succeeds (it used to fail its hash check)."""
    ws = crash_ws
    assert plait("registry", "import", tiny_loras[1], "--name", "legal", "--domain", "law",
                 "--workspace", ws).returncode == 0
    assert plait("registry", "archive", "legal:2", "--workspace", ws).returncode == 0
    killed = plait("registry", "gc", "--grace", "0", "--workspace", ws, fault="store.remove")
    assert killed.returncode == -signal.SIGKILL
    found = check_consistent(ws)
    assert found["versions"] == ["legal:1", "legal:2"] and len(found["temp"]) == 1 and found["orphans"] == []
    reg = open_registry(ws)
    assert reg.get_version("legal").ref == "legal:1"  # the archived version is not resolved by NAME
    reg.close()
    again = plait("registry", "import", tiny_loras[1], "--name", "legal", "--domain", "law", "--workspace", ws)
    assert again.returncode == 0 and "as legal:3" in again.stdout, again.stderr
    check_consistent(ws)


def test_half_deleted_artifact_is_replaced_on_store(tmp_path, tiny_loras):
    """A damaged copy at the content address (what a crash inside an old-style gc left) is
    replaced when the same content is stored again, instead of failing the write."""
    from registry.client import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts")
    stored = reg.store.put_dir(tiny_loras[0])
    victim = reg.store.path(stored.location) / "adapter_model.safetensors"
    victim.unlink()  # a half-finished rmtree
    again = reg.store.put_dir(tiny_loras[0])
    assert again == stored
    assert reg.store.verify(stored.location, stored.sha256).is_dir()
    assert list((reg.store.root / ".tmp").iterdir()) == []


def test_gc_does_not_collect_content_a_writer_is_about_to_reference(tmp_path, tiny_loras, monkeypatch):
    """Registering content identical to an old archived artifact restarts its gc grace period.

    Without that, a gc running between the writer's store and its commit deletes the old
    copy (it is unreferenced and old) and the new version points at a missing artifact.
    """
    import registry.store as store_mod
    from registry.client import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts")
    fp = "sha256:" + "ab" * 32
    reg.register_version("a", domain="d", kind="lora", files=tiny_loras[0], base_fingerprint=fp)
    reg.register_version("a", domain="d", kind="lora", files=tiny_loras[1], base_fingerprint=fp)
    old = reg.archive("a:1")
    old_dir = reg.store.path(old.location)
    os.utime(old_dir, (time.time() - 7200, time.time() - 7200))  # archived two hours ago

    collected = []

    def gc_at_the_worst_moment(point):
        if point == "registry.before_commit":
            collected.append(reg.gc(grace_s=600))

    monkeypatch.setattr(store_mod, "_fault_hook", gc_at_the_worst_moment)
    new = reg.register_version("a", domain="d", kind="lora", files=tiny_loras[0], base_fingerprint=fp)
    monkeypatch.setattr(store_mod, "_fault_hook", None)
    assert collected == [{"artifacts_removed": 0, "bytes_freed": 0, "temp_removed": 0}]
    assert new.location == old.location
    assert reg.artifact_path("a:3")[1].is_dir()
    assert all(r["ok"] for r in reg.verify())


GC_SCRIPT = """
import sys
from pathlib import Path
from registry.client import Registry
print(Registry(sys.argv[1], Path(sys.argv[2])).gc(grace_s=0))
"""


def test_concurrent_gc_processes_do_not_trip_on_each_other(tmp_path):
    """Three `gc` processes sweeping the same leftovers at once all succeed and leave nothing.

    They used to fail with FileNotFoundError (exit 1) when one removed a folder another had
    just listed."""
    from registry.client import Registry

    url, root = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts"
    reg = Registry(url, root)
    keep = reg.register_version("a", domain="d", kind="lora", base_fingerprint="sha256:x",
                                files={"adapter_config.json": b"{}", "adapter_model.safetensors": b"live"})
    for i in range(300):  # temp folders of crashed writers
        d = root / ".tmp" / f"crashed-{i}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x" * 512)
    for i in range(100):  # artifacts no version references
        reg.store.put({"adapter_model.safetensors": f"orphan {i}".encode()})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", GC_SCRIPT, url, str(root)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-1500:] for _, err in results]
    assert reg.store.locations() == [keep.location] and list((root / ".tmp").iterdir()) == []
    assert all(r["ok"] for r in reg.verify())
    reg.close()


def _big_peft(src: Path, out: Path, megabytes: int) -> Path:
    """A PEFT folder whose weights file is large, so a random kill often lands mid-write."""
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir()
    (out / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    rng = np.random.default_rng(0)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               rng.standard_normal(megabytes * (1 << 18), dtype=np.float32).reshape(-1, 64)},
              str(out / "adapter_model.safetensors"))
    return out


# long: SQLite in the default run, PostgreSQL with `make test-slow`
@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])],
                         indirect=True)
def test_import_killed_at_random_times(crash_ws, tiny_loras, tmp_path):
    """SIGKILL from outside at spread offsets across a whole import of a 32 MiB adapter."""
    ws = crash_ws
    big = _big_peft(tiny_loras[0], tmp_path / "big", 32)
    cmd = [sys.executable, "-m", "plait.cli", "registry", "import", str(big), "--name", "big", "--domain", "law",
           "--workspace", str(ws)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PLAIT_FAULT_POINT", None)

    # time one whole import, then undo it (archive + gc) so every kill starts from the same state
    t0 = time.perf_counter()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    full = time.perf_counter() - t0
    assert plait("registry", "archive", "big:1", "--workspace", ws).returncode == 0
    check_consistent(ws)

    outcomes = []
    for fraction in (0.35, 0.6, 0.8, 0.95):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        reg = open_registry(ws)
        ready = [v.ref for v in reg.search_versions(name="big")]
        reg.close()
        found = check_consistent(ws)
        outcomes.append((fraction, proc.returncode, ready, len(found["temp"]), len(found["orphans"])))
        if ready:  # the kill came after the commit: archive it so the next round starts equal
            assert plait("registry", "archive", ready[-1], "--workspace", ws).returncode == 0
            check_consistent(ws)
    print("fraction, returncode, ready versions, temp leftovers, orphans:", *outcomes, sep="\n  ")
    again = plait(*cmd[3:])
    assert again.returncode == 0, again.stderr
    reg = open_registry(ws)
    assert reg.get_version("big").version == max(v.version for v in reg.search_versions(name="big",
                                                                                         include_archived=True))
    reg.close()
    check_consistent(ws)


def test_kill_after_commit_is_mirrored_by_sync(tmp_path, tiny_base, tiny_loras, monkeypatch, capsys):
    """Killed after the commit and before the MLflow mirror: the registry (system of record) has
    the version, and `plait registry sync-mlflow` brings MLflow level with it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    assert main(["init", "--workspace", str(ws), "--base-model", str(tiny_base)]) == 0
    capsys.readouterr()
    cmd = ("registry", "import", tiny_loras[0], "--name", "legal", "--domain", "law", "--workspace", ws)
    assert plait(*cmd, fault="registry.after_commit").returncode == -signal.SIGKILL
    check_consistent(ws)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [m.tags.get("plait_ref") for m in client.search_model_versions("name='legal'")] == []
    r = plait("registry", "sync-mlflow", "--workspace", ws)
    assert r.returncode == 0 and "mirrored 1 version(s)" in r.stdout, r.stderr
    assert [m.tags["plait_ref"] for m in client.search_model_versions("name='legal'")] == ["legal:1"]


# ----------------------------------------------------------------- plait train
TRAIN_STEPS = 90  # the trainer checkpoints every 50 steps: one checkpoint, then 40 more steps


def _train_args(ws: Path, data: Path, *extra) -> list:
    return ["train", "law", "--data", data, "--steps", TRAIN_STEPS, "--max-length", 32, "--batch-size", 2,
            "--lr", 0.01, "--dtype", "fp32", "--no-audit", "--json", *extra, "--workspace", ws]


@pytest.fixture
def train_data(tmp_path) -> Path:
    path = tmp_path / "law.jsonl"
    path.write_text("".join(json.dumps({"text": f"law report {i}: the court ruled and the law desk was busy."}) + "\n"
                            for i in range(40)))
    return path


def _kill_after_first_checkpoint(ws: Path, data: Path) -> dict:
    """Start `plait train`, SIGKILL it the moment its first checkpoint is in place; returns that checkpoint's state."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PLAIT_FAULT_POINT", None)
    state_file = ws / "checkpoints" / "law" / "trainer_state.json"
    proc = subprocess.Popen([sys.executable, "-m", "plait.cli", *map(str, _train_args(ws, data))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not state_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]  # killed mid-training, not finished
    return json.loads(state_file.read_text())


# long (three training processes): SQLite in the default run, PostgreSQL with `make test-slow`
@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])],
                         indirect=True)
def test_train_killed_mid_training_and_before_commit_resumes(crash_ws, train_data):
    """`plait train` killed (1) during training right after its checkpoint, (2) on resume, between the
    artifact and the commit; each time the registry is clean, and `--resume` finishes the run."""
    ws = crash_ws
    reg = open_registry(ws)
    before = reg.dump()
    reg.close()

    state = _kill_after_first_checkpoint(ws, train_data)
    assert state["step"] == 50 and len(state["losses"]) == 50
    reg = open_registry(ws)
    assert reg.dump() == before  # nothing registered, no half version
    reg.close()
    assert check_consistent(ws)["versions"] == ["legal:1"]

    killed = plait(*_train_args(ws, train_data, "--resume"), fault="registry.before_commit", timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    found = check_consistent(ws)
    assert found["versions"] == ["legal:1"] and len(found["orphans"]) == 1  # the artifact, never committed
    assert (ws / "checkpoints" / "law" / "trainer_state.json").is_file()  # the checkpoint survives for --resume

    done = plait(*_train_args(ws, train_data, "--resume"), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)["train"]
    assert summary["ref"] == "law:1" and summary["steps"] == TRAIN_STEPS
    assert summary["first_loss"] == state["losses"][0]  # the loss history continues the killed run's
    assert not (ws / "checkpoints" / "law").exists()  # removed once the version is registered
    found = check_consistent(ws)
    assert found["versions"] == ["law:1", "legal:1"] and found["orphans"] == [] and found["temp"] == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["store.write", "store.before_rename", "registry.before_commit",
                                   "registry.after_commit"])
def test_train_killed_at_each_store_point_resumes_bit_exact(crash_ws, train_data, tmp_path, point):
    """Killed mid-training and again at a store/commit fault point, the resumed run registers the
    same adapter an uninterrupted run registers: bit-equal weights, equal config.

    (Not the same sha256: peft writes `target_modules` from a set, so adapter_config.json lists
    them in a per-process hash order; see docs/reliability.md.)"""
    ws = crash_ws
    ref_ws = tmp_path / "reference"
    assert main(["init", "--workspace", str(ref_ws), "--base-model", str(open_registry_base(ws)),
                 "--tracking-uri", "none"]) == 0
    uninterrupted = plait(*_train_args(ref_ws, train_data), timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    expected = json.loads(uninterrupted.stdout)

    _kill_after_first_checkpoint(ws, train_data)
    check_consistent(ws)
    killed = plait(*_train_args(ws, train_data, "--resume"), fault=point, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    found = check_consistent(ws)
    committed = point == "registry.after_commit"
    assert ("law:1" in found["versions"]) == committed
    if not committed:
        done = plait(*_train_args(ws, train_data, "--resume"), timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    reg, ref_reg = open_registry(ws), open_registry(ref_ws)
    _, got = reg.artifact_path("law:1")
    _, want = ref_reg.artifact_path("law:1")
    assert_same_adapter(got, want)
    reg.close()
    ref_reg.close()
    check_consistent(ws)


def assert_same_adapter(got: Path, want: Path) -> None:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(got / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    def canonical(cfg):
        return {k: sorted(v) if isinstance(v, list) else v for k, v in cfg.items()}

    assert canonical(json.loads((got / "adapter_config.json").read_text())) == \
        canonical(json.loads((want / "adapter_config.json").read_text()))


def open_registry_base(ws: Path) -> str:
    from plait.workspace import Workspace

    return Workspace(ws).config.base_model
