"""The incremental trainer: one new adapter for one domain, nothing else touched.

An explicit loop (no framework trainer), in the spirit of torchtune's recipes:

    load the base (frozen; 4-bit for qlora) -> attach a fresh adapter, or warm-start from a
    registered version -> assert only the adapter trains -> base eval loss on the eval split
    -> AdamW steps with gradient clipping (bf16 autocast where the hardware is fast at it),
    checkpointing every N steps -> eval loss and perplexity -> store + register the version
    with its metrics and lineage -> MLflow run (params, loss per step, metrics, artifact).

Checkpoints hold the adapter (its kind's own safetensors layout), the optimizer state
(tensors as safetensors, scalars as JSON), the step and the RNG state; nothing is pickled.
A new checkpoint replaces the last one so that a crash at any moment leaves a complete
one, and `resume` takes the newest complete one (`save_checkpoint`, `latest_checkpoint`).
The batch of step k is a function of (seed, k) alone, so `resume=True` continues
bit-exactly where an interrupted run stopped (on CPU), and under a launcher every
data-parallel process can take its shard of the same global batch (`training.distributed`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, ConflictError, NotFoundError, PlaitError
from registry.hashing import sha256_file
from registry.names import validate_name
from registry.store import _fault, _fsync_path  # the store's crash-test hook and fsync, shared
from registry.tracking import TRAIN_EXPERIMENT
from training.data import (IGNORE_INDEX, VALIDATION_FRACTION, DomainData, batch_at, collate, frozen_splits,
                           iter_eval_batches, load_domain_data, steps_per_epoch, tokenize_rows)
from training.distributed import DataParallel, data_parallel
from training.methods import Method, count_trainable, get_method
from training.warmstart import AUTO, BASE, InitChoice, check_init, explicit_start, given_options, start_from

DTYPES = ("auto", "fp32", "bf16")
STATE_FILE = "trainer_state.json"
EXPERIMENT = TRAIN_EXPERIMENT  # the MLflow experiment of training runs


class GradientError(PlaitError):
    """Training would silently learn nothing: a trainable tensor received no gradient."""


@dataclass
class TrainConfig:
    """How to train one domain's adapter."""

    method: str | None = None
    """adapter kind (lora, qlora, bottleneck); None = lora, or the kind of `from_ref`"""
    name: str | None = None
    """adapter name in the registry; None = the domain's name"""
    steps: int | None = None
    """optimizer steps; give this or `epochs` (default: 1 epoch)"""
    epochs: float | None = None
    """passes over the training examples (may be fractional)"""
    batch_size: int = 4
    """examples per step"""
    max_length: int = 256
    """tokens per example; longer text rows are cut into windows"""
    lr: float | None = None
    """AdamW learning rate; None = the kind's default (2e-4 LoRA/QLoRA, 1e-3 bottleneck)"""
    rank: int | None = None
    """LoRA rank, or bottleneck size for bottleneck adapters; None = the kind's default"""
    dtype: str = "auto"
    """auto (bf16 autocast where the hardware has fast bf16, else fp32), fp32 or bf16"""
    from_ref: str | None = None
    """warm-start from this registered version (NAME, NAME:3, NAME@alias); the same as init=REF"""
    init: str | None = None
    """where the adapter starts: auto (the registered version that fits a sample of the training rows best,
    if it beats the base there; see `training.warmstart`), base (fresh) or a version; None = from_ref if
    given, else base (`plait train` and `Workspace.add_domain` default to auto)"""
    resume: bool = False
    """continue from the checkpoint an interrupted run of the same config left"""
    seed: int = 0
    """seeds adapter init, data order and dropout"""
    grad_clip: float | None = 1.0
    """clip the gradient's global norm to this (None = no clipping)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    eval_fraction: float = 0.1
    """share of the rows held out for eval when no eval file is given"""
    validation_fraction: float = VALIDATION_FRACTION
    """share of the rows held out as the domain's validation split (bounds in `training.data`);
    0 = none (the audit's baselines, which are never routed)"""
    eval_batch_size: int | None = None
    """examples per eval batch; None = batch_size (so eval never peaks above training)"""
    checkpoint_every: int = 50
    """write a checkpoint every N steps (0 = never)"""
    method_options: dict[str, Any] = field(default_factory=dict)
    """extra options of the adapter kind (e.g. {"placement": "houlsby"} or {"alpha": 32})"""
    progress: bool = True
    """show a progress bar"""
    evaluate: bool = True
    """measure eval_loss and base_eval_loss at the end (off for the audit's baselines, which it
    measures itself on every domain)"""

    def __post_init__(self):
        if self.method is not None:
            get_method(self.method)
        if self.name is not None:
            validate_name(self.name, "adapter name")
        if self.steps is not None and self.epochs is not None:
            raise BadInputError(f"give --steps ({self.steps}) or --epochs ({self.epochs}), not both")
        for what, value in (("steps", self.steps), ("batch size", self.batch_size), ("max length", self.max_length),
                            ("rank", self.rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BadInputError(f"{what} {value!r} is invalid: use a whole number >= 1")
        if self.max_length < 2:
            raise BadInputError(f"max length {self.max_length} is invalid: use a whole number >= 2 (e.g. 256)")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            raise BadInputError(f"epochs {self.epochs!r} is invalid: use a number > 0")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1):
            raise BadInputError(f"learning rate {self.lr!r} is invalid: use a number between 0 and 1 (e.g. 2e-4)")
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype {self.dtype!r} is invalid: use auto, fp32 or bf16")
        self.init = check_init(self.init, self.from_ref)
        if self.from_ref is None and self.init not in (AUTO, BASE):
            self.from_ref = self.init
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise BadInputError(f"gradient clip {self.grad_clip!r} is invalid: use a number > 0, or None for no clipping")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise BadInputError(f"checkpoint interval {self.checkpoint_every!r} is invalid: use a whole number >= 0")
        if not 0 < self.eval_fraction < 1:
            raise BadInputError(f"eval fraction {self.eval_fraction!r} is invalid: use a number between 0 and 1")
        if not 0 <= self.validation_fraction < 1:
            raise BadInputError(f"validation fraction {self.validation_fraction!r} is invalid: use a number >= 0 "
                                f"and below 1 (0 = no validation split)")

    def run_key(self) -> dict[str, Any]:
        """The options that decide what a run computes (a checkpoint resumes only the same run)."""
        d = asdict(self)
        for k in ("resume", "progress", "checkpoint_every", "eval_batch_size", "evaluate"):
            d.pop(k)
        d.pop("validation_fraction")  # the data fingerprint covers the split (and older checkpoints lack the key)
        return d


@dataclass
class TrainResult:
    """What a training run produced."""

    version: Any
    """the registered `registry.client.VersionInfo`"""
    metrics: dict[str, float]
    steps: int
    losses: list[float]
    """training loss of every step (of this process and any resumed-from run)"""
    mlflow_run_id: str | None
    model: Any = field(default=None, repr=False)
    """the trained model in memory (adapter attached)"""
    init: InitChoice | None = None
    """where the adapter started and, for auto, the candidates' sample losses"""

    def summary(self) -> dict[str, Any]:
        v = self.version
        return {"ref": v.ref, "domain": v.domain, "kind": v.kind, "sha256": v.sha256, "steps": self.steps,
                "parents": v.parents, "metrics": self.metrics, "mlflow_run_id": self.mlflow_run_id,
                "init": self.init.to_dict() if self.init else None,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


# ----------------------------------------------------------------------------- precision
def fast_bf16() -> bool:
    """Whether this machine computes bf16 fast: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in cap or "BF16" in cap:
        return True
    with contextlib.suppress(OSError):  # get_cpu_capability says "AVX512" with or without BF16
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_dtype(dtype: str) -> str:
    """`auto` -> bf16 where the hardware is fast at it, else fp32."""
    return ("bf16" if fast_bf16() else "fp32") if dtype == "auto" else dtype


def _autocast(dtype: str, device: str):
    import torch

    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- loss / eval
def token_loss_sum(model, batch: dict, dtype: str, device: str):
    """(sum of next-token cross-entropy over labelled tokens, number of labelled tokens).

    Llama-style models take the fused path (`training.loss`): the output projection and the
    loss a few hundred tokens at a time, never the whole batch's [tokens, vocab] logits.
    """
    import torch.nn.functional as F

    from training.loss import fused_token_loss_sum, split_causal_lm

    parts = split_causal_lm(model)
    if parts is not None:
        with _autocast(dtype, device):
            return fused_token_loss_sum(*parts, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        batch["labels"].to(device))
    with _autocast(dtype, device):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
    # shift the labels, not the logits: slicing [B, L, vocab] logits would copy them (200 MB at
    # SmolLM2's 49k vocab, batch 8 x 128); the last position's label is -100
    labels = F.pad(batch["labels"].to(device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def evaluate(model, examples, *, pad_id: int, batch_size: int = 8, dtype: str = "fp32",
             method: Method | None = None) -> dict[str, float]:
    """Mean token loss and perplexity of `model` on `examples` (no grad, eval mode).

    Returns:
        {"loss": mean next-token cross-entropy over labelled tokens, "perplexity": exp(loss), "tokens": n}
    """
    import torch

    was_training = model.training
    model.eval()
    if method is not None:
        method.prepare_for_eval(model)
    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in iter_eval_batches(examples, batch_size):
            loss, n = token_loss_sum(model, collate(chunk, pad_id), dtype, device)
            total += float(loss)
            count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": float(count)}


def _device(model) -> str:
    return next(model.parameters()).device.type


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_only_adapter_trainable(model, base_params: dict[str, Any]) -> int:
    """Assert the base is frozen and something trains; returns the trainable parameter count.

    Raises:
        PlaitError: a base parameter is trainable, or nothing is.
    """
    base_ids = {id(p) for p in base_params.values()}
    leaking = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in base_ids]
    if leaking:
        raise PlaitError(f"base parameter {leaking[0]} is trainable ({len(leaking)} in all); only the adapter may train")
    n = count_trainable(model)
    if n == 0:
        raise PlaitError("the adapter has no trainable parameter; nothing would be learned")
    return n


# ----------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(folder: Path, *, model, method: Method, optimizer, step: int, losses: list[float],
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
    method.save(model, tmp / "adapter")
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
                                f"{folder}; wait for that run to finish, or train under another --name") from None
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


def _holding_checkpoint_lock(train):
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
        raise NotFoundError(f"no checkpoint to resume in {checkpoint}; run without --resume to start afresh")
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


# ----------------------------------------------------------------------------- the loop
def _progress(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)
    task = progress.add_task("train", total=total, completed=start, loss="-", tps="-")
    return progress, task


def train_steps(model, method: Method, optimizer, examples, *, start: int, total: int, batch_size: int,
                seed: int, pad_id: int, dtype: str = "fp32", grad_clip: float | None = 1.0,
                on_step: Callable[[int, float], None] | None = None,
                checkpoint: Callable[[int, list[float], int, float], None] | None = None,
                checkpoint_every: int = 0,
                progress: bool = False,
                parallel: DataParallel | None = None) -> tuple[list[float], int, float]:
    """Run optimizer steps `start`..`total-1`.

    The first steps check that every trainable tensor receives a gradient (a grad that is
    None, or zero for every step checked, means training would silently learn nothing,
    as in the bitsandbytes CPU repacking trap).

    With `parallel`, each rank runs its shard of every global batch and the gradients are
    summed across ranks and divided by the global labelled-token count before the step (see
    `training.distributed`); losses and token counts are the global ones.

    Returns:
        (loss of each step run, labelled-or-not tokens seen, seconds spent in steps)

    Raises:
        GradientError: a trainable tensor got no gradient.
    """
    import torch

    device = _device(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    unseen = {n for n, _ in trainable}  # tensors that have not had a nonzero gradient yet
    check_until = min(total, start + 3)
    losses: list[float] = []
    tokens, seconds = 0, 0.0
    model.train()
    method.prepare_for_training(model)
    bar, task = _progress(progress, total, start)
    with bar:
        for step in range(start, total):
            t0 = time.perf_counter()
            examples_now = batch_at(examples, step, batch_size, seed)
            shard = examples_now if parallel is None else parallel.shard(examples_now)
            if parallel is None:
                batch = collate(examples_now, pad_id)
                loss_sum, n = token_loss_sum(model, batch, dtype, device)
                loss = loss_sum / max(n, 1)
                loss.backward()
                value, step_tokens = float(loss.detach()), int(batch["attention_mask"].sum())
            else:
                local_sum, n, local_tokens = 0.0, 0, 0
                if shard:  # the summed loss: its gradients add up across ranks (see training.distributed)
                    batch = collate(shard, pad_id)
                    loss_sum, n = token_loss_sum(model, batch, dtype, device)
                    loss_sum.backward()
                    local_sum, local_tokens = float(loss_sum.detach()), int(batch["attention_mask"].sum())
            if step < check_until and shard:
                missing = [name for name, p in trainable if p.grad is None]
                if missing:
                    raise GradientError(f"trainable tensor {missing[0]} received no gradient ({len(missing)} in all); "
                                        f"the adapter would not learn (for qlora on CPU: see FACTS.md, 4-bit repacking)")
            if parallel is not None:
                value, _, step_tokens = parallel.reduce(params, local_sum, n, local_tokens)
            if step < check_until:
                unseen -= {name for name, p in trainable if bool(p.grad.detach().abs().sum() > 0)}
                if step == check_until - 1 and unseen and check_until - start >= 2:
                    raise GradientError(f"trainable tensor {sorted(unseen)[0]} received only zero gradients in the "
                                        f"first {check_until - start} steps ({len(unseen)} such tensors); training "
                                        f"would silently learn nothing")
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
            tokens += step_tokens
            losses.append(value)
            bar.update(task, advance=1, loss=f"{value:.4f}", tps=f"{tokens / max(seconds, 1e-9):.0f}")
            if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total:
                checkpoint(step + 1, losses, tokens, seconds)
            if on_step is not None:
                on_step(step + 1, value)
    return losses, tokens, seconds


def _total_steps(cfg: TrainConfig, n_examples: int) -> int:
    per_epoch = steps_per_epoch(n_examples, cfg.batch_size)
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))


def _base_state(model) -> dict[str, Any]:
    return dict(model.named_parameters())


def _log_losses(run, losses: list[float]) -> None:
    """The loss of every step as MLflow metric history, in batches (one call per 1000 steps)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", float(v), now, i) for i, v in enumerate(losses, start=1)]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per log_batch call
        run.client.log_batch(run.run_id, metrics=metrics[i:i + 1000])


def _checkpoint_to_resume(ckpt: Path) -> tuple[Path, dict]:
    """The newest complete checkpoint of the slot `ckpt` (a crash mid-replacement leaves one) and its state."""
    found = latest_checkpoint(ckpt)
    if found is None:
        raise NotFoundError(f"no checkpoint to resume in {ckpt}; run without --resume to start afresh")
    return found, read_checkpoint_state(found)


def _say(line: str, enabled: bool) -> None:
    """A progress line beside the progress bar (off with progress, e.g. under --json)."""
    if enabled:
        from rich.console import Console

        Console().print(line, style="dim", highlight=False)


def track_training(registry, info, adapter_dir: Path, *, params: dict[str, Any], metrics: dict[str, float],
                   losses: list[float], steps: int):
    """Log a registered version's training run to MLflow and mirror the version there, linked to it.

    Runs after the version is registered, so a tracking failure (a tracking server down, a
    damaged `mlflow.db`) costs only the MLflow record: it warns, and `plait registry
    sync-mlflow` rebuilds the run from the registry and mirrors the version.

    Returns:
        the version, with its `mlflow_run_id` when the run was logged.
    """
    if not registry.tracking_uri:
        return info
    try:
        with registry.tracking.run(TRAIN_EXPERIMENT, f"{info.name}-{info.domain}", params,
                                   tags={"plait.domain": info.domain, "plait.kind": info.kind}) as run:
            _log_losses(run, losses)
            run.log_metrics(metrics, step=steps)
            run.log_artifacts(adapter_dir, "adapter")
    except Exception as e:  # noqa: BLE001 - MLflow mirrors the registry; it never undoes a registered version
        warnings.warn(f"{info.ref} is registered, but its run was not logged to MLflow ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}); `plait registry sync-mlflow` logs it", stacklevel=2)
        return info
    return registry.set_mlflow_run(info.ref, run.run_id)


@_holding_checkpoint_lock
def train_domain(registry, base: str | os.PathLike, domain: str, data: str | os.PathLike | DomainData,
                 eval_data: str | os.PathLike | None = None, config: TrainConfig | None = None, *,
                 checkpoint_dir: Path | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> TrainResult | None:
    """Train a new adapter version for `domain` and register it.

    Under a launcher (`accelerate launch`, `torchrun`: WORLD_SIZE > 1) the run is data-parallel
    (`training.distributed`): every process trains on its share of each global batch of
    `config.batch_size` examples, and rank 0 alone evaluates, checkpoints, logs to MLflow and
    registers the one version; the other ranks wait until it is registered and return None.

    Args:
        registry: a `registry.client.Registry`.
        base: the base model spec (`smollm2`, a model folder, a .gguf file, a cached HF id).
        domain: the domain's name (the adapter's name too, unless `config.name`).
        data: the training file/folder, or already loaded `DomainData`.
        eval_data: a separate eval file; None = hold out `config.eval_fraction` of the rows.
        config: how to train (default `TrainConfig()`).
        checkpoint_dir: where checkpoints go (default `<artifact root>/../checkpoints/<name>`);
            removed once the version is registered.
        on_step: called after every step with (steps done, loss); raising in it stops the run
            (its last checkpoint stays for `resume`).

    Returns:
        the registered version, its metrics, the losses and the trained model (None on a
        data-parallel rank other than 0).

    Raises:
        BadInputError / NotFoundError: bad options, data, refs or an incompatible warm-start,
            or a batch size that does not split across the data-parallel processes.
        GradientError: a trainable tensor received no gradient.
        ConflictError: another run of the same adapter name holds its checkpoints (`checkpoint_lock`).
    """
    import torch

    cfg = config or TrainConfig()
    validate_name(domain, "domain name")
    name = cfg.name or domain
    validate_name(name, "adapter name")
    parallel = data_parallel()
    if parallel is not None:
        parallel.check_batch_size(cfg.batch_size)
    main = parallel is None or parallel.is_main

    kind, warm = explicit_start(registry, cfg)
    method = get_method(kind)
    for v in registry.search_versions(name=name, include_archived=True)[:1]:  # fail before training, not after
        if (v.kind, v.domain) != (kind, domain):
            raise ConflictError(f"adapter {name!r} is a {v.kind} adapter of domain {v.domain!r}; a {kind} version for "
                                f"domain {domain!r} needs another name (--name)")
    dtype = resolve_dtype(cfg.dtype)
    lr = cfg.lr or method.default_lr

    settings = method.read_config(warm[1]) if warm else method.make_config(**given_options(cfg, kind))

    # a retrain keeps the domain's frozen eval and validation sets and never trains on their rows
    dd = data if isinstance(data, DomainData) else load_domain_data(
        data, eval_data, cfg.eval_fraction, cfg.validation_fraction, frozen=frozen_splits(registry, domain))
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    loaded = method.load_base(base, settings, compute_dtype=compute)
    tok = loaded.tokenizer
    train_ex = tokenize_rows(dd.train, tok, cfg.max_length)
    eval_ex = tokenize_rows(dd.eval, tok, cfg.max_length)
    total = _total_steps(cfg, len(train_ex))
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    ckpt = checkpoint_folder(registry, name, checkpoint_dir)  # held for this run (`_holding_checkpoint_lock`)
    found, state = _checkpoint_to_resume(ckpt) if cfg.resume else (None, None)
    choice, warm = start_from(registry, cfg, method, loaded, train_ex, warm, state, total_steps=total, pad_id=pad_id,
                              batch_size=eval_bs)
    settings = method.read_config(warm[1]) if warm else settings
    run_key = {**cfg.run_key(), "method": kind, "lr": lr, "dtype": dtype, "domain": domain, "base": str(base),
               "init_choice": choice.to_dict()}
    run_key = json.loads(json.dumps(run_key, default=str))
    start, prior_losses, prior_tokens, prior_seconds = 0, [], 0, 0.0
    base_params = _base_state(loaded.model)

    torch.manual_seed(cfg.seed)
    if cfg.resume:
        if state["run_key"] != run_key or state["data_fingerprint"] != dd.fingerprint \
                or state["base_fingerprint"] != loaded.fingerprint:
            diff = sorted(k for k in set(run_key) | set(state["run_key"])
                          if run_key.get(k) != state["run_key"].get(k))
            if not diff:
                raise BadInputError(f"the checkpoint in {ckpt} was made on other data or another base; resume with "
                                    f"the same data and base, or drop --resume")
            raise BadInputError(f"the checkpoint in {ckpt} is from a run with other {diff[0]} "
                                f"({state['run_key'].get(diff[0])!r}); resume with the same options, or drop --resume")
        model = method.load(loaded.model, found / "adapter", trainable=True)
    elif warm:
        model = method.load(loaded.model, warm[1], trainable=True)
    else:
        model = method.attach(loaded.model, settings)
    _say(choice.describe(), cfg.progress and main)  # once the adapter is on: a bad option prints its error alone
    trainable_params = check_only_adapter_trainable(model, base_params)
    _say(choice.describe(), cfg.progress and main)  # once the adapter is on: a bad option prints its error alone
    optimizer = method.make_optimizer([p for p in model.parameters() if p.requires_grad], lr, cfg.weight_decay)

    if cfg.resume:
        restore_checkpoint(found, optimizer)
        start, prior_losses = state["step"], list(state["losses"])
        prior_tokens, prior_seconds = state["tokens"], state["seconds"]
    if parallel is not None:  # every rank starts from rank 0's adapter, whatever its RNG did
        parallel.broadcast([p for p in model.parameters() if p.requires_grad])

    def checkpoint(step: int, losses: list[float], tokens: int, seconds: float) -> None:
        save_checkpoint(ckpt, model=model, method=method, optimizer=optimizer, step=step,
                        losses=prior_losses + losses, tokens=prior_tokens + tokens, seconds=prior_seconds + seconds,
                        run_key=run_key, base_fingerprint=loaded.fingerprint, data_fingerprint=dd.fingerprint)

    losses, tokens, seconds = train_steps(
        model, method, optimizer, train_ex, start=start, total=total, batch_size=cfg.batch_size, seed=cfg.seed,
        pad_id=pad_id, dtype=dtype, grad_clip=cfg.grad_clip, on_step=on_step, checkpoint=checkpoint if main else None,
        checkpoint_every=cfg.checkpoint_every, progress=cfg.progress and main, parallel=parallel)
    if not main:  # rank 0 evaluates and registers; return once the version exists
        parallel.barrier()
        return None
    all_losses = prior_losses + losses
    tokens_total, seconds_total = prior_tokens + tokens, prior_seconds + seconds
    metrics = {"train_tokens_per_s": tokens_total / max(seconds_total, 1e-9), "peak_rss_mb": peak_rss_mb(),
               "trainable_params": float(trainable_params)}
    if cfg.evaluate:
        after = evaluate(model, eval_ex, pad_id=pad_id, batch_size=eval_bs, dtype=dtype, method=method)
        # the base's loss on the same split, through the same code path (adapter switched off),
        # after training: the frozen base gives the same figure either way
        with method.disabled(model):
            base_eval = evaluate(model, eval_ex, pad_id=pad_id, batch_size=eval_bs, dtype=dtype, method=method)
        metrics = {"eval_loss": after["loss"], "eval_perplexity": after["perplexity"],
                   "base_eval_loss": base_eval["loss"], **metrics}
    if torch.cuda.is_available():
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20

    version_config = {
        "method": kind, "adapter": asdict(settings), "base": str(base), "base_quantized": loaded.quantized,
        "dtype": dtype, "lr": lr, "steps": total, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "seed": cfg.seed, "grad_clip": cfg.grad_clip, "weight_decay": cfg.weight_decay,
        "warm_start": warm[0].ref if warm else None, **choice.record(), "processes": parallel.world_size if parallel else 1,
        "data": {"train_rows": len(dd.train), "eval_rows": len(dd.eval), "eval_source": dd.eval_source,
                 "validation_rows": len(dd.validation),
                 "train_examples": len(train_ex), "eval_examples": len(eval_ex)}}
    parents = [(warm[0].ref, "warm-start")] if warm else []
    params = {"domain": domain, "name": name, "base_fingerprint": loaded.fingerprint,
              "data_fingerprint": dd.fingerprint, "trainable_params": trainable_params,
              **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in version_config.items()}}

    with tempfile.TemporaryDirectory(prefix="plait-adapter-") as tmp:
        out = method.save(model, Path(tmp) / "adapter")
        info = registry.register_version(  # first: nothing MLflow does can lose the trained adapter
            name, domain=domain, kind=kind, files=out, base_fingerprint=loaded.fingerprint, config=version_config,
            parents=parents, data_fingerprint=dd.fingerprint, metrics=metrics, mirror=False)
        info = track_training(registry, info, out, params=params, metrics=metrics, losses=all_losses, steps=total)
    # the domain's first eval split is frozen in the registry for audits, its validation split
    # for router calibration and for choosing the version that serves it
    for split, rows in (("eval", dd.eval), ("validation", dd.validation)):
        try:
            if rows:
                registry.set_domain_rows(domain, split, [r.normalised() for r in rows])
        except ConflictError:
            pass  # an earlier run froze this domain's set; later runs keep using that one
    remove_checkpoints(ckpt)
    if parallel is not None:
        parallel.barrier()
    model.eval()
    return TrainResult(info, metrics, total, all_losses, info.mlflow_run_id, model, choice)
