"""`plait train` bookkeeping that used to lose work (issue 15, items 1, 6 and 15).

- MLflow created and migrated its schema in whichever processes opened a fresh `mlflow.db`
  first, concurrently and unlocked: jobs started together failed after training, with nothing
  registered. Now opening one holds a file lock, the version is registered before any MLflow
  call, and a tracking failure warns; `sync-mlflow` repairs it. Commands that only register
  or move an alias queue their mirror and never open MLflow.
- Two runs of one adapter name shared a checkpoint folder: the second deleted the first's
  in-progress checkpoint. Now the second is refused while the first runs.
- MLflow wrote run artifacts to `./mlruns` of the current folder, outside the workspace.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plait.cli import main
from tests.test_crash_safety import _train_args, crash_ws, plait, train_data  # noqa: F401 (fixtures)
from tests.train_helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def mlflow_client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def rows(word: str, n: int = 12) -> list[dict]:
    return [{"text": f"{word} {word} number {i % 4} says {word}."} for i in range(n)]


# ----------------------------------------------------------------- the tracking store
def test_mirrors_are_queued_by_light_commands_and_drained_by_sync(tmp_path, tiny_base, tiny_loras, capsys):
    """`init`, `registry import` and `registry alias` never open MLflow (seconds a command): each
    queues its mirror in its own transaction; `sync-mlflow` (or any process that opens MLflow
    anyway) drains the queue, the alias to where it points now."""
    from plait.workspace import Workspace

    ws = tmp_path / "ws"
    assert main(["init", "--workspace", str(ws), "--base-model", str(tiny_base)]) == 0
    for folder in tiny_loras[:2]:
        assert main(["registry", "import", str(folder), "--name", "legal", "--domain", "law",
                     "--workspace", str(ws)]) == 0
    assert main(["registry", "alias", "legal:1", "production", "--workspace", str(ws)]) == 0
    assert main(["registry", "alias", "legal:2", "production", "--workspace", str(ws)]) == 0
    assert not (ws / "mlflow.db").exists()
    reg = Workspace(ws).registry
    assert reg.pending_mirrors() == 4 and reg.pending_mirrors("legal:1") == 2  # the version, its alias move
    capsys.readouterr()
    assert main(["registry", "show", "legal:2", "--json", "--workspace", str(ws)]) == 0
    assert json.loads(capsys.readouterr().out)["mlflow_queued"] == 2
    assert main(["registry", "show", "legal:2", "--workspace", str(ws)]) == 0
    assert "mlflow      2 change(s) queued: `plait registry sync-mlflow` mirrors them now" in capsys.readouterr().out
    assert main(["registry", "sync-mlflow", "--workspace", str(ws)]) == 0
    assert "mirrored 2 version(s)" in capsys.readouterr().out
    assert reg.pending_mirrors() == 0
    assert main(["registry", "show", "legal:2", "--workspace", str(ws)]) == 0
    assert "mlflow      mirrored" in capsys.readouterr().out
    client = mlflow_client(ws)
    assert sorted(m.tags["plait_ref"] for m in client.search_model_versions("name='legal'")) == ["legal:1", "legal:2"]
    assert client.get_model_version_by_alias("legal", "production").tags["plait_ref"] == "legal:2"

    # a process that has MLflow open mirrors its own writes at once, and what was queued before
    assert main(["registry", "import", str(tiny_loras[2]), "--name", "legal", "--domain", "law",
                 "--workspace", str(ws)]) == 0
    assert reg.pending_mirrors() == 1
    reg.tracking  # noqa: B018 - opens MLflow in this process
    reg.set_alias("legal:1", "staging")
    assert reg.pending_mirrors() == 0
    assert client.get_model_version_by_alias("legal", "staging").tags["plait_ref"] == "legal:1"
    assert [m.tags["plait_ref"] for m in client.search_model_versions("name='legal'")
            if m.tags["plait_version"] == "3"] == ["legal:3"]
    reg.close()


LIGHT = textwrap.dedent("""
    import sys
    from plait.cli import main
    code = main(sys.argv[1:])
    heavy = sorted(m for m in ("torch", "mlflow", "transformers", "peft") if m in sys.modules)
    print("heavy:", ",".join(heavy) or "none")
    sys.exit(code)
""")


def test_registry_commands_load_neither_torch_nor_mlflow(tmp_path, tiny_base, tiny_loras):
    """The registry's everyday commands start in about a second: detecting an imported folder's
    kind reads the kinds' literal ARTIFACT_MATCH without importing them, and MLflow is queued."""
    ws = str(tmp_path / "ws")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def light(*args: str) -> str:
        r = subprocess.run([sys.executable, "-c", LIGHT, *args, "--workspace", ws], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip().splitlines()[-1]

    assert light("init", "--base-model", str(tiny_base)) == "heavy: none"
    assert light("registry", "import", str(tiny_loras[0]), "--name", "legal", "--domain", "law") == "heavy: none"
    assert light("registry", "alias", "legal:1", "production") == "heavy: none"
    assert light("registry", "show", "legal@production", "--json") == "heavy: none"
    assert light("registry", "export", "legal@production", str(tmp_path / "out")) == "heavy: none"


OPENER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from registry.tracking import Tracking
    uri, barrier, i, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    (barrier / i).touch()
    while len(list(barrier.iterdir())) < n:  # every process opens the fresh store at the same moment
        time.sleep(0.005)
    t = Tracking(uri)
    print(t.experiment_id("plait-train"))
""")


def test_processes_opening_a_fresh_tracking_store_together_all_succeed(tmp_path):
    """A workspace made before `init` created the store (or any fresh mlflow.db): 4 processes open it at
    once. MLflow's own migration ran in each, concurrently ("table ... already exists"); the lock serialises it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, uri, str(barrier), str(i), "4"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    ids = set()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
        ids.add(out.decode().split()[-1])
    assert len(ids) == 1  # one experiment, created once


def test_a_tracking_failure_after_training_keeps_the_version_and_sync_repairs_it(tmp_path, tiny_base):
    """MLflow broken when the run is logged: the trained version is registered anyway (with a warning),
    and `sync_mlflow` later logs its run from the registry and mirrors the version, linked to that run."""
    from registry.client import Registry
    from training.trainer import TrainConfig, train_domain

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)  # any failure of MLflow's, here on opening the store
    uri = f"sqlite:///{db}"
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts", tracking_uri=uri)
    data = write_jsonl(tmp_path / "a.jsonl", rows("apple"))
    config = TrainConfig(method="lora", steps=3, batch_size=4, max_length=32, lr=1e-2, dtype="fp32", progress=False)
    with pytest.warns(UserWarning, match=r"apples:1 is registered, but its run was not logged to MLflow .*"
                                         r"`plait registry sync-mlflow` logs it"):
        result = train_domain(reg, tiny_base, "apples", data, config=config)
    assert result.version.ref == "apples:1" and result.mlflow_run_id is None
    assert reg.get_version("apples:1").mlflow_run_id is None
    reg.close()

    # MLflow back (here: a fresh store; MLflow keeps the broken file's engine for its URI in this process)
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts", tracking_uri=f"sqlite:///{tmp_path / 'ok.db'}")
    assert reg.sync_mlflow() == 1
    run_id = reg.get_version("apples:1").mlflow_run_id
    client = reg.tracking.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["plait.restored"] == "sync-mlflow"
    assert run.data.params["method"] == "lora" and run.data.params["steps"] == "3"
    assert run.data.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    assert {f.path for f in client.list_artifacts(run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    [mv] = client.search_model_versions("name='apples'")
    assert mv.run_id == run_id and mv.tags["plait_ref"] == "apples:1"
    assert reg.sync_mlflow() == 1 and reg.get_version("apples:1").mlflow_run_id == run_id  # idempotent
    assert len(client.search_model_versions("name='apples'")) == 1
    reg.close()


def test_training_writes_nothing_outside_the_workspace(tmp_path, tiny_base, monkeypatch):
    """Run artifacts go to <workspace>/mlartifacts, whatever the current folder (was ./mlruns of it)."""
    from plait.workspace import Workspace
    from training.trainer import TrainConfig, train_domain

    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    ws = Workspace.init(tmp_path / "ws", base_model=str(tiny_base))
    data = write_jsonl(tmp_path / "a.jsonl", rows("apple"))
    config = TrainConfig(method="lora", steps=2, batch_size=4, max_length=32, lr=1e-2, dtype="fp32", progress=False)
    result = train_domain(ws.registry, tiny_base, "apples", data, config=config)
    assert list(here.iterdir()) == []
    run = ws.registry.tracking.client.get_run(result.mlflow_run_id)
    artifacts = ws.path / "mlartifacts" / "plait-train" / result.mlflow_run_id / "artifacts" / "adapter"
    assert run.info.artifact_uri == artifacts.parent.as_uri()
    assert sorted(p.name for p in artifacts.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ws.registry.close()


# ----------------------------------------------------------------- one checkpoint slot per adapter
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_second_run_of_the_same_adapter_is_refused_while_the_first_runs(crash_ws, train_data, capsys):
    """The first run is frozen (SIGSTOP) right after its first checkpoint; a second `plait train law`
    exits 2 with one line and leaves that checkpoint as it was. Once the first is killed its lock is gone."""
    ws = crash_ws
    state_file = ws / "checkpoints" / "law" / "trainer_state.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PLAIT_FAULT_POINT", None)
    first = subprocess.Popen([sys.executable, "-m", "plait.cli", *map(str, _train_args(ws, train_data, "--steps",
                                                                                       100000))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not state_file.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        time.sleep(0.2)  # let a checkpoint replacement under way when it stopped show up as a change below
        slot = state_file.parent
        before = {p.relative_to(slot): p.read_bytes() for p in slot.rglob("*") if p.is_file()}

        code = main([str(a) for a in _train_args(ws, train_data)])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err == (f"error: adapter 'law' is being trained by another run, which holds its checkpoints in "
                       f"{ws / 'checkpoints' / 'law'}; wait for that run to finish, or train under another adapter name (--name)\n")
        assert {p.relative_to(slot): p.read_bytes() for p in slot.rglob("*") if p.is_file()} == before
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock
        first.communicate(timeout=60)
    assert main([str(a) for a in _train_args(ws, train_data, "--steps", 4)]) == 0  # the slot is free again
    summary = json.loads(capsys.readouterr().out)["train"]
    assert summary["ref"] == "law:1" and summary["steps"] == 4
    assert list((ws / "checkpoints").iterdir()) == []  # the killed run's lock file went with the next run


def test_the_lock_is_per_adapter_name_and_released_by_an_exception(tmp_path, tiny_base):
    """Another name trains while one is held; a run that raises releases its slot for the next run."""
    from registry.client import Registry
    from registry.errors import ConflictError
    from training.trainer import TrainConfig, checkpoint_folder, checkpoint_lock, train_domain

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "artifacts")
    data = write_jsonl(tmp_path / "a.jsonl", rows("apple"))
    config = TrainConfig(method="lora", steps=2, batch_size=4, max_length=32, lr=1e-2, dtype="fp32", progress=False)
    with checkpoint_lock(checkpoint_folder(reg, "apples"), "apples"):
        with pytest.raises(ConflictError, match="adapter 'apples' is being trained by another run"):
            train_domain(reg, tiny_base, "apples", data, config=config)
        assert train_domain(reg, tiny_base, "pears", data, config=config).version.ref == "pears:1"

    def stop(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_domain(reg, tiny_base, "apples", data, config=config, on_step=stop)
    assert train_domain(reg, tiny_base, "apples", data, config=config).version.ref == "apples:1"
    assert list((tmp_path / "checkpoints").iterdir()) == []  # lock files go with their runs
    reg.close()
