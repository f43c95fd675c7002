"""Crash-safe training checkpoints: write, find, verify, restore and remove them, and the per-adapter lock.

A checkpoint holds the adapter (its kind's own safetensors layout), the optimizer state
(tensors as safetensors, scalars as JSON), the step and the RNG state; nothing is pickled.
A new checkpoint replaces the last one so that a crash at any moment leaves a complete
one, and `resume` takes the newest complete one (`save_checkpoint`, `latest_checkpoint`).
One run at a time holds an adapter's checkpoint slot (`checkpoint_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from registry.errors import ConflictError, NotFoundError
from registry.hashing import sha256_file
from registry.names import validate_name
from registry.store import _fault, _fsync_path  # the store's crash-test hook and fsync, shared
from training.distributed import data_parallel
from training.methods import Kind

STATE_FILE = "trainer_state.json"


def _flatten_optimizer(state: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON scalars."""
    import torch

    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _siblings(folder: Path) -> tuple[Path, list[Path]]:
    """A checkpoint slot's `.old` folder and its writers' temp folders.

    Their names start with a dot, which no adapter name may, so they never collide with
    another adapter's checkpoint folder (an adapter may be named `law.old`).
    """
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.tmp-[A-Za-z0-9_]{{8}}")
    temps = [p for p in folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*") if pattern.fullmatch(p.name)] \
        if folder.parent.is_dir() else []
    return folder.with_name(f".{folder.name}.old"), temps


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _manifest(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` (the checkpoint proves it is whole with this)."""
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file()}


def save_checkpoint(folder: Path, *, model, adapter_kind: Kind, optimizer, step: int, losses: list[float],
                    tokens: int, seconds: float, run_key: dict, base_fingerprint: str, data_fingerprint: str) -> None:
    """Write a checkpoint so that a crash at any moment leaves a complete one to resume from.

    The new checkpoint is written and fsynced in a temp folder (`.NAME.tmp-XXXXXXXX`) whose
    `trainer_state.json` comes last and lists every other file's sha256: a folder with a
    state file that matches its files is complete. Then the previous checkpoint moves aside
    to `.NAME.old`, the temp folder is renamed to NAME, and the leftovers go. Between any two
    of these steps at least one complete checkpoint exists, and `latest_checkpoint` finds
    the newest one (NAME, `.NAME.old` or a finished temp folder), skipping partial ones.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    adapter_kind.save(model, tmp / "adapter")
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    _fault("checkpoint.write")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    for p in tmp.rglob("*"):  # the data reaches the disk before the state file vouches for it
        _fsync_path(p)
    state = {"step": step, "losses": losses, "tokens": tokens, "seconds": seconds, "run_key": run_key,
             "base_fingerprint": base_fingerprint, "data_fingerprint": data_fingerprint, "optimizer": meta,
             "files": _manifest(tmp)}
    _write_synced(tmp / ".trainer_state.json.part", json.dumps(state, indent=1, sort_keys=True).encode())
    os.replace(tmp / ".trainer_state.json.part", tmp / STATE_FILE)
    _fsync_path(tmp)
    _fault("checkpoint.before_swap")
    old, _ = _siblings(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        _fault("checkpoint.swap")
    os.replace(tmp, folder)
    _fsync_path(folder.parent)
    _fault("checkpoint.before_cleanup")
    old, temps = _siblings(folder)  # the previous checkpoint, and what crashed writers left
    for leftover in (old, *temps):
        shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoint_state(folder: Path) -> dict | None:
    """The state of the checkpoint in `folder` if every file it lists is there and intact, else None."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        files = state.get("files", {})  # none listed: an older plait's checkpoint, renamed into place whole
        for rel, want in files.items():
            path = Path(folder) / rel
            if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of the slot `folder`: itself, its `.old`, or a finished temp folder."""
    folder = Path(folder)
    old, temps = _siblings(folder)
    found = [(state["step"], path.stat().st_mtime_ns, str(path)) for path in (folder, old, *temps)
             if (state := complete_checkpoint_state(path)) is not None]
    return Path(max(found)[2]) if found else None


def remove_checkpoints(folder: Path) -> None:
    """Remove the slot `folder` with its `.old` and temp folders."""
    folder = Path(folder)
    old, temps = _siblings(folder)
    for path in (folder, old, *temps):
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_folder(registry, name: str, checkpoint_dir: Path | None = None) -> Path:
    """The checkpoint slot of adapter `name`: `checkpoint_dir`, or `<artifact root>/../checkpoints/<name>`."""
    return Path(checkpoint_dir) if checkpoint_dir else Path(registry.store.root).parent / "checkpoints" / name


@contextlib.contextmanager
def checkpoint_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold the checkpoint slot `folder` for one run; a second run of the same adapter is refused.

    Two runs of one name share one slot: the second's checkpoints replaced the first's, and its
    cleanup deleted the first's in-progress checkpoint. The lock is an fcntl lock on
    `.NAME.lock` beside the slot (a dot name, so no adapter's slot): the kernel drops it when
    the process ends, however it ends, so a killed run leaves no stale lock (at most the
    empty file). The file is removed on release; a run that locked a file removed under it
    locks the new one instead.

    Raises:
        ConflictError: another run holds the slot (exit code 2).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(f"adapter {name!r} is being trained by another run, which holds its checkpoints in "
                                f"{folder}; wait for that run to finish, or train under another adapter name") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed this file as we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding it, so no one locks the old file after us
        os.close(fd)


def holding_checkpoint_lock(train):
    """Run `train_domain` holding its adapter's checkpoint slot (`checkpoint_lock`); data-parallel
    ranks other than 0 write no checkpoint and take no lock."""
    @functools.wraps(train)
    def run(registry, base, domain, data, eval_data=None, config=None, *, checkpoint_dir=None, on_step=None):
        validate_name(domain, "domain name")  # before any path is built from the names
        name = (config.name if config is not None else None) or domain
        validate_name(name, "adapter name")
        parallel = data_parallel()
        lock = checkpoint_lock(checkpoint_folder(registry, name, checkpoint_dir), name) \
            if parallel is None or parallel.is_main else contextlib.nullcontext()
        with lock:
            return train(registry, base, domain, data, eval_data, config, checkpoint_dir=checkpoint_dir,
                         on_step=on_step)

    return run


def read_checkpoint_state(checkpoint: Path) -> dict:
    """The trainer state of one checkpoint folder (e.g. the one `latest_checkpoint` found)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise NotFoundError(f"no checkpoint to resume in {checkpoint}; start afresh (do not resume)")
    return json.loads(path.read_text())


def restore_checkpoint(folder: Path, optimizer) -> None:
    """Load the optimizer state and RNG state of the checkpoint in `folder`."""
    import torch
    from safetensors.torch import load_file

    state = read_checkpoint_state(folder)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(Path(folder) / "optimizer.safetensors")),
                                                   state["optimizer"]))
    rng = load_file(str(Path(folder) / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def checkpoint_to_resume(ckpt: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint of the slot `ckpt` (a crash mid-replacement leaves one) and its state."""
    found = latest_checkpoint(ckpt)
    if found is None:
        raise NotFoundError(f"no checkpoint to resume in {ckpt}; start afresh (do not resume)")
    return found, read_checkpoint_state(found)
