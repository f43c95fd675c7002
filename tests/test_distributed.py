"""Data-parallel `plait train`: `accelerate launch` with two CPU processes (gloo) on the tiny base.

The launched run must register exactly one version (rank 0 alone registers, logs to MLflow
and updates the router), and its adapter must equal, up to float reduction order, the one a
single process trains with the same global batch: the shards' gradients are summed and
divided by the global labelled-token count, the same per-token mean the single process takes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from tests.train_helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
#: 9 training examples in global batches of 4: every epoch ends with a batch of 1, so rank 1's
#: shard is empty on those steps and rank 0's holds all the tokens (token weighting matters)
ROWS = [{"text": f"law {i}: the court {'ruled' if i % 2 else 'sat'} and {'the ' * (i % 4)}desk was busy."}
        for i in range(10)]  # 9 train, 1 validation (held out by content hash)
EVAL_ROWS = [{"text": f"law {i}: the judge adjourned and the clerk left."} for i in range(3)]
STEPS = 6
LR = 1e-3  # AdamW turns float-order gradient noise into steps of ~lr * 1e-3: 1.4e-6 here, 1.4e-5 at 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(nproc: int, *args) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch --multi_gpu --num_processes N -m plait.cli ARGS` and its environment (on a
    CPU-only machine `--multi_gpu` just means "N local processes under torchrun"; plait joins them
    over gloo, on loopback here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PLAIT_FAULT_POINT"):
        env.pop(var, None)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a container whose hostname does not resolve still runs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "plait.cli", *map(str, args)]
    return cmd, env


def launch(nproc: int, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd, env = launch_command(nproc, *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def train_args(ws: Path, data: Path, eval_data: Path, batch_size: int = 4, steps: int = STEPS, *extra) -> list:
    return ["train", "law", "--data", data, "--eval", eval_data, "--steps", steps, "--batch-size", batch_size,
            "--max-length", 48, "--lr", LR, "--dtype", "fp32", "--no-audit", "--json", *extra, "--workspace", ws]


def lora_weights(ws: Path) -> dict[str, torch.Tensor]:
    from plait.workspace import Workspace

    reg = Workspace(ws).registry
    _, path = reg.artifact_path("law:1")
    weights = load_file(str(path / "adapter_model.safetensors"))
    reg.close()
    return weights


@pytest.fixture
def law_data(tmp_path, tiny_base) -> tuple[Path, Path]:
    from training.base import load_base
    from training.data import load_domain_data, tokenize_rows

    data = write_jsonl(tmp_path / "law.jsonl", ROWS)
    eval_data = write_jsonl(tmp_path / "law-eval.jsonl", EVAL_ROWS)
    examples = tokenize_rows(load_domain_data(data, eval_data, validation_fraction=0.1).train, load_base(tiny_base).tokenizer, 48)
    assert len(examples) == 9  # one window a row, so the last batch of each epoch holds one example
    return data, eval_data


def test_accelerate_launch_two_processes_matches_one_process(tmp_path, tiny_base, law_data, monkeypatch, capsys):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    data, eval_data = law_data
    dist_ws, single_ws = tmp_path / "dist", tmp_path / "single"
    # MLflow on in the launched workspace: rank 0 alone may log a run
    assert main(["init", "--workspace", str(dist_ws), "--base-model", str(tiny_base)]) == 0
    assert main(["init", "--workspace", str(single_ws), "--base-model", str(tiny_base), "--tracking-uri", "none"]) == 0
    capsys.readouterr()

    done = launch(2, *train_args(dist_ws, data, eval_data))
    assert done.returncode == 0, done.stderr[-3000:]
    launched = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    assert main([str(a) for a in train_args(single_ws, data, eval_data)]) == 0
    single = json.loads(capsys.readouterr().out)

    from mlflow import MlflowClient
    from plait.workspace import Workspace

    reg = Workspace(dist_ws).registry
    assert [v.ref for v in reg.search_versions(include_archived=True)] == ["law:1"]  # exactly one version
    v = reg.get_version("law:1")
    assert v.config["processes"] == 2 and v.config["batch_size"] == 4 and v.config["steps"] == STEPS
    assert reg.get_router("hybrid").covers == ["law:1"]  # one router update, by rank 0
    assert not (dist_ws / "checkpoints" / "law").exists()
    uri = f"sqlite:///{dist_ws / 'mlflow.db'}"
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == launched["train"]["mlflow_run_id"]
    reg.close()
    assert Workspace(single_ws).registry.get_version("law:1").config["processes"] == 1

    got, want = lora_weights(dist_ws), lora_weights(single_ws)
    assert sorted(got) == sorted(want) and any("lora_A" in k for k in want) and any("lora_B" in k for k in want)
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in want.items() if "lora_B" in k)  # it trained
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    print(f"max |w_2proc - w_1proc| = {diff:.3g}")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    # the loss history and metrics are the global ones, as in the single-process run
    for key in ("first_loss", "last_loss"):
        assert launched["train"][key] == pytest.approx(single["train"][key], rel=1e-5)
    for key in ("eval_loss", "base_eval_loss"):
        assert launched["train"]["metrics"][key] == pytest.approx(single["train"]["metrics"][key], rel=1e-5)


def test_batch_size_that_does_not_split_is_refused(tmp_path, tiny_base, law_data, monkeypatch, capsys):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    data, eval_data = law_data
    ws = tmp_path / "ws"
    assert main(["init", "--workspace", str(ws), "--base-model", str(tiny_base), "--tracking-uri", "none"]) == 0
    capsys.readouterr()
    done = launch(2, *train_args(ws, data, eval_data, batch_size=3))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {"error: batch size 3 does not split across 2 processes: use a multiple of 2 "
                                      "(e.g. --batch-size 4)"}, done.stderr[-3000:]
    from plait.workspace import Workspace

    assert Workspace(ws).registry.search_versions(include_archived=True) == []


@pytest.mark.slow
def test_data_parallel_run_killed_after_a_checkpoint_resumes_data_parallel(tmp_path, tiny_base, law_data, monkeypatch,
                                                                           capsys):
    """Every process of a launched run SIGKILLed right after rank 0's step-50 checkpoint; the launched
    `--resume` finishes from it and registers what one uninterrupted process registers."""
    import psutil

    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    data, eval_data = law_data
    dist_ws, single_ws = tmp_path / "dist", tmp_path / "single"
    for ws in (dist_ws, single_ws):
        assert main(["init", "--workspace", str(ws), "--base-model", str(tiny_base), "--tracking-uri", "none"]) == 0
    capsys.readouterr()
    steps = 60  # the trainer checkpoints every 50 steps
    cmd, env = launch_command(2, *train_args(dist_ws, data, eval_data, 4, steps))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = dist_ws / "checkpoints" / "law" / "trainer_state.json"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.005)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.kill()  # the launcher and both workers (torchrun starts them in their own sessions)
    proc.wait()
    assert json.loads(state.read_text())["step"] == 50

    done = launch(2, *train_args(dist_ws, data, eval_data, 4, steps, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([str(a) for a in train_args(single_ws, data, eval_data, 4, steps)]) == 0
    got, want = lora_weights(dist_ws), lora_weights(single_ws)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)
    assert json.loads(done.stdout)["train"]["steps"] == steps
    assert not (dist_ws / "checkpoints" / "law").exists()
