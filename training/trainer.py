"""The incremental trainer: one new adapter for one domain, nothing else touched.

An explicit loop (no framework trainer) in a recipe class shaped like torchtune's
(`DomainRecipe`: setup -> train -> evaluate -> register -> cleanup):

    load the base (frozen; 4-bit for qlora) -> attach a fresh adapter, or warm-start from a
    registered version -> assert only the adapter trains -> base eval loss on the eval split
    -> AdamW steps with gradient clipping (bf16 autocast where the hardware is fast at it),
    checkpointing every N steps -> eval loss and perplexity -> store + register the version
    with its metrics and lineage -> MLflow run (params, loss per step, metrics, artifact).

Checkpoints (`training.checkpoints`) hold the adapter, the optimizer and RNG state and the
step; `resume` takes the newest complete one. The loss and eval live in `training.evaluation`.
The batch of step k is a function of (seed, k) alone, so `resume=True` continues
bit-exactly where an interrupted run stopped (on CPU), and under a launcher every
data-parallel process can take its shard of the same global batch (`training.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, ConflictError, PlaitError
from registry.names import validate_name, whole_number
from registry.tracking import TRAIN_EXPERIMENT
from training.checkpoints import (STATE_FILE, checkpoint_folder, checkpoint_lock, checkpoint_to_resume,
                                  complete_checkpoint_state, holding_checkpoint_lock, latest_checkpoint,
                                  read_checkpoint_state, remove_checkpoints, restore_checkpoint, save_checkpoint)
from training.data import (DEFAULT_MAX_LENGTH, VALIDATION_FRACTION, DomainData, batch_at, collate, frozen_splits,
                           load_domain_data, steps_per_epoch, tokenize_rows)
from training.distributed import DataParallel, data_parallel
from training.evaluation import _device, evaluate, fast_bf16, resolve_dtype, token_loss_sum
from training.methods import Kind, count_trainable, get_kind
from training.replay import REPLAY_SHARE, check_share, covers_after, replay_count, replay_rows
from training.warmstart import AUTO, BASE, InitChoice, check_init, explicit_start, given_options, start_from

__all__ = [  # its own names, and those callers imported from here before evaluation and checkpoints split off
    "DTYPES", "EXPERIMENT", "DomainRecipe", "GradientError", "TrainConfig", "TrainResult", "check_only_adapter_trainable",
    "peak_rss_mb", "track_training", "train_domain", "train_steps",
    "evaluate", "fast_bf16", "resolve_dtype", "token_loss_sum",
    "STATE_FILE", "checkpoint_folder", "checkpoint_lock", "complete_checkpoint_state", "latest_checkpoint",
    "read_checkpoint_state", "remove_checkpoints", "restore_checkpoint", "save_checkpoint"]

DTYPES = ("auto", "fp32", "bf16")
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
    max_length: int = DEFAULT_MAX_LENGTH
    """tokens per example; longer text rows are cut into windows"""
    lr: float | None = None
    """AdamW learning rate; None = the kind's default (2e-4 LoRA/QLoRA, 1e-3 bottleneck)"""
    rank: int | None = None
    """LoRA rank, or bottleneck size for bottleneck adapters; None = the kind's default"""
    dtype: str = "auto"
    """auto (the faster of fp32 and bf16 autocast on this machine, timed once: `training.precision`), fp32 or bf16"""
    from_ref: str | None = None
    """warm-start from this registered version (NAME, NAME:3, NAME@alias); the same as init=REF"""
    init: str | None = None
    """where the adapter starts: auto (the registered version that fits a sample of the training rows best,
    if it beats the base there; see `training.warmstart`), base (fresh) or a version; None = from_ref if
    given, else base (`plait train` and `Workspace.add_domain` default to auto)"""
    replay: float = REPLAY_SHARE
    """share of a warm-started run's training examples drawn from the stored training rows of the
    domains its source covers (rehearsal, `training.replay`); 0 = the new domain's rows only"""
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
            get_kind(self.method)
        if self.name is not None:
            validate_name(self.name, "adapter name")
        if self.steps is not None and self.epochs is not None:
            raise BadInputError(f"give the step count ({self.steps}) or the epoch count ({self.epochs}), not both")
        for what, value in (("steps", self.steps), ("batch size", self.batch_size), ("max length", self.max_length),
                            ("rank", self.rank)):
            if value is not None:
                whole_number(value, what, 1)
        whole_number(self.max_length, "max length", 2, example=DEFAULT_MAX_LENGTH)
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or self.epochs <= 0):
            raise BadInputError(f"epochs {self.epochs!r} is invalid: use a number > 0")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1):
            raise BadInputError(f"learning rate {self.lr!r} is invalid: use a number between 0 and 1 (e.g. 2e-4)")
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype {self.dtype!r} is invalid: use auto, fp32 or bf16")
        self.init = check_init(self.init, self.from_ref)
        self.replay = check_share(self.replay)
        if self.from_ref is None and self.init not in (AUTO, BASE):
            self.from_ref = self.init
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise BadInputError(f"gradient clip {self.grad_clip!r} is invalid: use a number > 0, or None for no clipping")
        whole_number(self.checkpoint_every, "checkpoint interval", 0)
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


# ----------------------------------------------------------------------------- the loop
def _progress(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)
    task = progress.add_task("train", total=total, completed=start, loss="-", tps="-")
    return progress, task


def train_steps(model, adapter_kind: Kind, optimizer, examples, *, start: int, total: int, batch_size: int,
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
    adapter_kind.prepare_for_training(model)
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
                                        f"the adapter would not learn (for qlora on CPU: see the README, 4-bit repacking)")
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


@holding_checkpoint_lock
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
    return DomainRecipe(registry, base, domain, data, eval_data, config, checkpoint_dir=checkpoint_dir,
                        on_step=on_step).run()


class DomainRecipe:
    """One domain's training run as phases, in the shape of torchtune's recipe classes.

    `setup` (`_resolve_options` -> `_setup_data` -> `_setup_model` -> `_setup_optimizer`),
    `train`, `evaluate`, `register`, `cleanup`; `run` calls them in that order. Nothing loads
    before the options are checked, and nothing is printed before the adapter is on, so a bad
    option prints its error alone. `train_domain` is the entry point (it holds the checkpoint lock).
    """

    def __init__(self, registry, base: str | os.PathLike, domain: str, data: str | os.PathLike | DomainData,
                 eval_data: str | os.PathLike | None = None, config: TrainConfig | None = None, *,
                 checkpoint_dir: Path | None = None, on_step: Callable[[int, float], None] | None = None):
        self.registry, self.base, self.domain = registry, base, domain
        self.data_source, self.eval_source = data, eval_data
        self.cfg = config or TrainConfig()
        self.checkpoint_dir, self.on_step = checkpoint_dir, on_step

    def run(self) -> TrainResult | None:
        """All the phases; the registered version's result (None on a data-parallel rank other than 0)."""
        self.setup()
        self.train()
        if not self.main:  # rank 0 evaluates and registers; return once the version exists
            self.parallel.barrier()
            return None
        metrics = self.evaluate()
        info = self.register(metrics)
        self.cleanup()
        return TrainResult(info, metrics, self.total, self.all_losses, info.mlflow_run_id, self.model, self.choice)

    # ------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the options, read the data, load the base with the adapter on, make the optimizer."""
        self._resolve_options()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()

    def _resolve_options(self) -> None:
        """Names, data parallelism, the kind and its settings: every option error before anything loads."""
        cfg, registry, domain = self.cfg, self.registry, self.domain
        validate_name(domain, "domain name")
        self.name = name = cfg.name or domain
        validate_name(name, "adapter name")
        self.parallel = data_parallel()
        if self.parallel is not None:
            self.parallel.check_batch_size(cfg.batch_size)
        self.main = self.parallel is None or self.parallel.is_main
        kind, self.warm = explicit_start(registry, cfg)
        self.kind = kind
        self.adapter_kind = get_kind(kind)
        registry.check_line(name, kind, domain)  # fail before training, not after
        self.dtype = resolve_dtype(cfg.dtype, announce=cfg.progress and self.main)  # measured: training.precision
        self.lr = cfg.lr or self.adapter_kind.default_lr
        self.settings = self.adapter_kind.read_config(self.warm[1]) if self.warm \
            else self.adapter_kind.make_config(**given_options(cfg, kind))

    def _setup_data(self) -> None:
        """The domain's rows; a retrain keeps its frozen eval and validation sets and never trains on their rows."""
        cfg, data = self.cfg, self.data_source
        self.dd = data if isinstance(data, DomainData) else load_domain_data(
            data, self.eval_source, cfg.eval_fraction, cfg.validation_fraction,
            frozen=frozen_splits(self.registry, self.domain))

    def _setup_model(self) -> None:
        """Load the base, tokenize, choose where the adapter starts, and put it on (fresh, warm or resumed)."""
        import torch

        compute = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        self.loaded = self.adapter_kind.load_base(self.base, self.settings, compute_dtype=compute)
        self._tokenize()
        self._choose_start()
        base_params = _base_state(self.loaded.model)
        torch.manual_seed(self.cfg.seed)
        self.model = self._attach()
        # announced once the adapter is on, so a bad option prints its error alone
        _say(self.choice.describe(), self.cfg.progress and self.main)
        if self.replay_ex:
            _say(f"replay: {len(self.replay_ex)} examples of {', '.join(self.replayed)} beside "
                 f"{len(self.train_ex)} of {self.domain} (share {self.cfg.replay:g})", self.cfg.progress and self.main)
        self.trainable_params = check_only_adapter_trainable(self.model, base_params)

    def _tokenize(self) -> None:
        """The tokenized splits, the step count and the padding id."""
        cfg, tok = self.cfg, self.loaded.tokenizer
        self.train_ex = tokenize_rows(self.dd.train, tok, cfg.max_length)
        self.eval_ex = tokenize_rows(self.dd.eval, tok, cfg.max_length)
        self.total = _total_steps(cfg, len(self.train_ex))
        self.eval_bs = cfg.eval_batch_size or cfg.batch_size
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def _choose_start(self) -> None:
        """The checkpoint to resume (if `resume`), the warm-start choice (`training.warmstart`) and the run key."""
        cfg = self.cfg
        self.ckpt = checkpoint_folder(self.registry, self.name, self.checkpoint_dir)  # held (`holding_checkpoint_lock`)
        self.found, self.state = checkpoint_to_resume(self.ckpt) if cfg.resume else (None, None)
        self.choice, self.warm = start_from(self.registry, cfg, self.adapter_kind, self.loaded, self.train_ex,
                                            self.warm, self.state, total_steps=self.total, pad_id=self.pad_id,
                                            batch_size=self.eval_bs)
        self.settings = self.adapter_kind.read_config(self.warm[1]) if self.warm else self.settings
        self._setup_replay()
        run_key = {**cfg.run_key(), "method": self.kind, "lr": self.lr, "dtype": self.dtype, "domain": self.domain,
                   "base": str(self.base), "init_choice": self.choice.to_dict()}
        self.run_key = json.loads(json.dumps(run_key, default=str))

    def _setup_replay(self) -> None:
        """What the new version covers and, for a warm start, the replayed examples of its source's domains."""
        from training.data import Row

        cfg = self.cfg
        self.covers = covers_after(self.warm[0] if self.warm else None, self.domain, self._related())
        self.replay_ex, self.replayed = [], {}
        if not self.warm or not cfg.replay:
            return
        want = replay_count(len(self.train_ex), cfg.replay)
        # none when the covered domains stored no training rows (e.g. trained through `train_domain` alone)
        for n, (d, r) in enumerate(replay_rows(self.registry, self.covers, len(self.train_ex), cfg.replay, cfg.seed)):
            row = Row(text=r.get("text"), prompt=r.get("prompt"), completion=r.get("completion"),
                      where=f"replay:{d}:{n + 1}")
            try:
                examples = tokenize_rows([row], self.loaded.tokenizer, cfg.max_length)[:want - len(self.replay_ex)]
            except BadInputError:  # a prompt too long for this run's max length: nothing of it to learn from
                continue
            self.replay_ex += examples
            self.replayed[d] = self.replayed.get(d, 0) + len(examples)
            if len(self.replay_ex) == want:
                break

    def _related(self) -> list:
        """The other candidates `--init auto` scored below the base (related to the new domain), best first."""
        losses = self.choice.losses
        base = losses.get(BASE)
        refs = sorted((r for r in losses if r not in (BASE, self.choice.ref) and base is not None and losses[r] < base),
                      key=losses.get)
        return [self.registry.get_version(r) for r in refs]

    def _attach(self):
        """The model with its adapter: the checkpoint's (resume), the warm start's, or a fresh one."""
        adapter_kind, base_model = self.adapter_kind, self.loaded.model
        if self.cfg.resume:
            self._check_resumable()
            return adapter_kind.load(base_model, self.found / "adapter", trainable=True)
        if self.warm:
            return adapter_kind.load(base_model, self.warm[1], trainable=True)
        return adapter_kind.attach(base_model, self.settings)

    def _check_resumable(self) -> None:
        """The checkpoint is of this run: the same options, data and base."""
        state, run_key, ckpt = self.state, self.run_key, self.ckpt
        if state["run_key"] != run_key or state["data_fingerprint"] != self.dd.fingerprint \
                or state["base_fingerprint"] != self.loaded.fingerprint:
            diff = sorted(k for k in set(run_key) | set(state["run_key"])
                          if run_key.get(k) != state["run_key"].get(k))
            if not diff:
                raise BadInputError(f"the checkpoint in {ckpt} was made on other data or another base; resume with "
                                    f"the same data and base, or start afresh (do not resume)")
            raise BadInputError(f"the checkpoint in {ckpt} is from a run with other {diff[0]} "
                                f"({state['run_key'].get(diff[0])!r}); resume with the same options, or start afresh (do not resume)")

    def _setup_optimizer(self) -> None:
        """The kind's optimizer over the adapter, restored from the checkpoint on resume; ranks start alike."""
        cfg, model = self.cfg, self.model
        self.optimizer = self.adapter_kind.make_optimizer([p for p in model.parameters() if p.requires_grad], self.lr,
                                                    cfg.weight_decay)
        self.start, self.prior_losses, self.prior_tokens, self.prior_seconds = 0, [], 0, 0.0
        if cfg.resume:
            restore_checkpoint(self.found, self.optimizer)
            self.start, self.prior_losses = self.state["step"], list(self.state["losses"])
            self.prior_tokens, self.prior_seconds = self.state["tokens"], self.state["seconds"]
        if self.parallel is not None:  # every rank starts from rank 0's adapter, whatever its RNG did
            self.parallel.broadcast([p for p in model.parameters() if p.requires_grad])

    # ------------------------------------------------------------------------- train
    def _checkpoint(self, step: int, losses: list[float], tokens: int, seconds: float) -> None:
        save_checkpoint(self.ckpt, model=self.model, adapter_kind=self.adapter_kind, optimizer=self.optimizer,
                        step=step,
                        losses=self.prior_losses + losses, tokens=self.prior_tokens + tokens,
                        seconds=self.prior_seconds + seconds, run_key=self.run_key,
                        base_fingerprint=self.loaded.fingerprint, data_fingerprint=self.dd.fingerprint)

    def train(self) -> None:
        """The optimizer steps (`train_steps`), checkpointing on rank 0; adds this run's to any resumed figures."""
        cfg = self.cfg
        losses, tokens, seconds = train_steps(
            self.model, self.adapter_kind, self.optimizer, self.train_ex + self.replay_ex, start=self.start,
            total=self.total,
            batch_size=cfg.batch_size, seed=cfg.seed, pad_id=self.pad_id, dtype=self.dtype, grad_clip=cfg.grad_clip,
            on_step=self.on_step, checkpoint=self._checkpoint if self.main else None,
            checkpoint_every=cfg.checkpoint_every, progress=cfg.progress and self.main, parallel=self.parallel)
        self.all_losses = self.prior_losses + losses
        self.tokens_total, self.seconds_total = self.prior_tokens + tokens, self.prior_seconds + seconds

    # ------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        """The run's metrics: throughput, memory, and (with `cfg.evaluate`) eval loss against the base's."""
        import torch

        metrics = {"train_tokens_per_s": self.tokens_total / max(self.seconds_total, 1e-9),
                   "peak_rss_mb": peak_rss_mb(), "trainable_params": float(self.trainable_params)}
        if self.cfg.evaluate:
            kw = dict(pad_id=self.pad_id, batch_size=self.eval_bs, dtype=self.dtype, adapter_kind=self.adapter_kind)
            after = evaluate(self.model, self.eval_ex, **kw)
            # the base's loss on the same split, through the same code path (adapter switched off),
            # after training: the frozen base gives the same figure either way
            with self.adapter_kind.disabled(self.model):
                base_eval = evaluate(self.model, self.eval_ex, **kw)
            metrics = {"eval_loss": after["loss"], "eval_perplexity": after["perplexity"],
                       "base_eval_loss": base_eval["loss"], **metrics}
        if torch.cuda.is_available():
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return metrics

    # ------------------------------------------------------------------------- register
    def _version_config(self) -> dict[str, Any]:
        """What the version records of how it was trained (its `config` in the registry)."""
        cfg, dd, warm = self.cfg, self.dd, self.warm
        return {
            "method": self.kind, "adapter": asdict(self.settings), "base": str(self.base),
            "base_quantized": self.loaded.quantized, "dtype": self.dtype, "lr": self.lr, "steps": self.total,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "seed": cfg.seed, "grad_clip": cfg.grad_clip,
            "weight_decay": cfg.weight_decay, "warm_start": warm[0].ref if warm else None, **self.choice.record(),
            "covers": self.covers, "replay": {"share": cfg.replay, "examples": len(self.replay_ex),
                                              "per_domain": self.replayed},
            "processes": self.parallel.world_size if self.parallel else 1,
            "data": {"train_rows": len(dd.train), "eval_rows": len(dd.eval), "eval_source": dd.eval_source,
                     "validation_rows": len(dd.validation),
                     "train_examples": len(self.train_ex), "eval_examples": len(self.eval_ex)}}

    def register(self, metrics: dict[str, float]):
        """Save the adapter, register the version (then mirror it to MLflow), freeze the domain's splits.

        Returns:
            the registered `registry.client.VersionInfo`.
        """
        version_config = self._version_config()
        parents = [(self.warm[0].ref, "warm-start")] if self.warm else []
        params = {"domain": self.domain, "name": self.name, "base_fingerprint": self.loaded.fingerprint,
                  "data_fingerprint": self.dd.fingerprint, "trainable_params": self.trainable_params,
                  **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in version_config.items()}}
        with tempfile.TemporaryDirectory(prefix="plait-adapter-") as tmp:
            out = self.adapter_kind.save(self.model, Path(tmp) / "adapter")
            info = self.registry.register_version(  # first: nothing MLflow does can lose the trained adapter
                self.name, domain=self.domain, kind=self.kind, files=out, base_fingerprint=self.loaded.fingerprint,
                config=version_config, parents=parents, data_fingerprint=self.dd.fingerprint, metrics=metrics,
                mirror=False)
            info = track_training(self.registry, info, out, params=params, metrics=metrics, losses=self.all_losses,
                                  steps=self.total)
        self._freeze_splits()
        return info

    def _freeze_splits(self) -> None:
        """The domain's first eval split is frozen in the registry for audits, its validation split
        for router calibration and for choosing the version that serves it."""
        for split, rows in (("eval", self.dd.eval), ("validation", self.dd.validation)):
            try:
                if rows:
                    self.registry.set_domain_rows(self.domain, split, [r.normalised() for r in rows])
            except ConflictError:
                pass  # an earlier run froze this domain's set; later runs keep using that one

    # ------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Remove the checkpoints, release the other ranks (the version exists), leave the model in eval mode."""
        remove_checkpoints(self.ckpt)
        if self.parallel is not None:
            self.parallel.barrier()
        self.model.eval()
