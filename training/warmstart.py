"""Forward transfer: where a new adapter starts (`plait train --init auto|base|REF`).

A new domain rarely arrives with nothing in common with the ones before it, and sequential
fine-tuning profits from that for free: it starts every domain from everything learned so
far. plait keeps every adapter apart (that is how it forgets nothing), so it gets this
forward transfer another way: a new adapter may start from the weights of an earlier,
registered version (lineage edge `warm-start`), which stays untouched in the store.

    base      a fresh adapter (the kind's own initialisation, seeded)
    REF       the weights of one registered version (`--from REF` is the same)
    auto      score the candidates and the base on a sample of the new domain's training
              rows; start from the candidate with the lowest loss per token when it beats
              the base on that sample, else fresh

The candidates of `auto` are the newest ready version of every adapter of a real domain
whose weights can initialise the new kind (each kind names the kinds it can start from in
its module's `SEEDS_FROM`, read through `Kind.seeds_from`: LoRA and QLoRA share the PEFT
layout and seed each other, a bottleneck starts from a bottleneck), trained on the same
base. Never a baseline (domain `plait-baselines`), an archived or an imported version (an
import is someone else's adapter: plait has no record of what it learned). The domain's own
newest version is a candidate too, so a retrain starts from it when it still fits. When
`--rank` or `--option` are given, only candidates whose stored settings equal every given
value are scored (a warm start keeps its source's shape).

The scoring pass is bounded by the training it serves: it may cost at most `SCORE_SHARE`
(10%) of the training's compute. A no-grad forward costs about half a training step per token
on a frozen base (`FORWARD_COST`), and three quarters of the share go to the forwards
(`SAMPLE_SHARE`; the rest pays for finding, checking and loading the candidates), so each of the
n + 1 passes (n candidates and the base) scores a seeded sample of the training examples of at
most 0.15 x (training tokens) / (n + 1) tokens,
and no more than `MAX_CANDIDATES` candidates (the newest) are scored. The base is loaded
once; the candidates are loaded side by side into their kinds' engine stackers
(`training/methods/_stacking.py`, `make_stacker`), which wrap each targeted layer once, and
each is scored by switching the stack to its slot (`_stack`); a candidate no stacker serves is
put on the base by its kind's `load`, scored and taken off again (`_take_off`).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import BadInputError
from registry.names import BASELINE_DOMAIN, parse_ref  # noqa: F401 - BASELINE_DOMAIN: re-exported
from training.methods import get_kind

AUTO, BASE = "auto", "base"
#: the most candidates one `auto` pass scores (the newest versions first)
MAX_CANDIDATES = 8
#: the share of the training's compute the scoring pass may cost
SCORE_SHARE = 0.1
#: the part of that share the forward passes may use: the rest is for finding, hash-checking,
#: loading and stacking the candidates (about 0.5-1 s with 4 candidates on SmolLM2, measured:
#: with the whole share for the forwards the choice took 10.6-12.1% of the demo's training steps)
SAMPLE_SHARE = 0.75 * SCORE_SHARE
#: the cost of a token in a no-grad forward, relative to a token of a training step. With the base
#: frozen, a step is a forward plus a backward that computes activation gradients only (no weight
#: gradients but the adapter's), about two forwards: 1/2, not the 1/3 of full fine-tuning (with 1/3
#: the choice measured 15-22% of the demo's training time instead of 10%)
FORWARD_COST = 1 / 2
#: the most tokens one pass scores, however long the training (more only makes it slower)
MAX_SAMPLE_TOKENS = 4096


@dataclass
class InitChoice:
    """Where a new adapter started, and why."""

    init: str
    """the setting: auto, base, or the reference given"""
    ref: str | None = None
    """the version whose weights it started from (NAME:N); None = a fresh adapter"""
    losses: dict[str, float] = field(default_factory=dict)
    """auto: the sample loss per token of each scored version and of the base (key `base`)"""
    sample_tokens: int = 0
    """auto: labelled tokens in the sample each candidate was scored on"""
    seconds: float = 0.0
    """auto: wall time of the whole choice (finding, verifying, loading and scoring candidates)"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InitChoice:
        return cls(**d)

    def record(self) -> dict[str, Any]:
        """What the version's config keeps: the setting, and for auto the scores and the time spent."""
        if self.init != AUTO:
            return {"init": self.init}
        return {"init": AUTO, "init_candidates": self.losses, "init_sample_tokens": self.sample_tokens,
                "init_seconds": self.seconds}

    def describe(self) -> str:
        """One line for the progress output, e.g. `init auto: warm start from law:2 (3.412 < base 3.980; 2 candidates, 0.8 s)`."""
        if self.init != AUTO:
            return f"init {self.init}: " + (f"warm start from {self.ref}" if self.ref else "fresh adapter")
        base = self.losses.get(BASE)
        n = max(len(self.losses) - 1, 0)
        if self.ref is None:
            why = "no candidate" if n == 0 else f"none of {n} candidate(s) beats base {base:.3f}"
            return f"init auto: fresh adapter ({why}; {self.seconds:.1f} s)"
        return (f"init auto: warm start from {self.ref} ({self.losses[self.ref]:.3f} < base {base:.3f} on "
                f"{self.sample_tokens} sample tokens; {n} candidate(s), {self.seconds:.1f} s)")


def check_init(init: str | None, from_ref: str | None) -> str:
    """The effective `--init` of a run: auto, base, or a reference (then equal to `from_ref`).

    Raises:
        BadInputError: `init` is not auto, base or a valid reference, or disagrees with `from_ref`.
    """
    if init is not None and init not in (AUTO, BASE):
        try:
            parse_ref(init)
        except BadInputError as e:
            raise BadInputError(f"init {init!r} is invalid: use auto, base or a version NAME[:N|@ALIAS] ({e})") \
                from None
    if from_ref is not None:
        parse_ref(from_ref)
        if init is not None and init != from_ref:
            raise BadInputError(f"init {init} and from_ref {from_ref} disagree: from_ref REF means init REF; "
                                f"give one of them")
        return from_ref
    return init or BASE


def given_options(cfg, kind: str) -> dict[str, Any]:
    """The kind options the user set, `--rank` included under the kind's own name."""
    options = dict(cfg.method_options)
    if cfg.rank is not None:
        options.setdefault(get_kind(kind).rank_option, cfg.rank)
    return options


def explicit_start(registry, cfg) -> tuple[str, tuple[Any, Path] | None]:
    """The new adapter's kind and, for `--init REF` / `--from REF`, the version it starts from.

    Returns:
        (kind, (VersionInfo, verified folder) or None)

    Raises:
        NotFoundError: no such version.
        BadInputError: the version's kind cannot initialise the kind asked for, or --rank/--option are given.
    """

    if cfg.from_ref is None:
        return cfg.method or "lora", None
    info, path = registry.artifact_path(cfg.from_ref)
    kind = cfg.method or info.kind
    if info.kind not in get_kind(kind).seeds_from:
        raise BadInputError(f"{info.ref} is a {info.kind} adapter; warm-start it as adapter kind {info.kind} "
                            f"(or give no adapter kind)")
    if cfg.rank is not None or cfg.method_options:
        raise BadInputError(f"a warm start keeps the shape of {info.ref}; give no rank or kind options "
                            f"(or train a fresh adapter: init base)")
    return kind, (info, path)


def start_from(registry, cfg, adapter_kind, loaded, examples: list, warm: tuple[Any, Path] | None,
               resumed: dict | None, **score: Any) -> tuple[InitChoice, tuple[Any, Path] | None]:
    """The start of a run: a resumed run's recorded choice, the version given, fresh, or auto's pick.

    Args:
        warm: what `explicit_start` returned.
        resumed: the state of the checkpoint being resumed (its run key holds the choice), or None.
        score: `choose_init`'s keyword arguments (total_steps, pad_id, batch_size).

    Returns:
        (the choice, (VersionInfo, verified folder) of the version to load, or None for a fresh adapter)

    Raises:
        IncompatibleBaseError: the version was trained on another base.
    """
    from training.base import check_compatible

    record = ((resumed or {}).get("run_key") or {}).get("init_choice")
    if record is not None:  # --resume keeps the interrupted run's choice; nothing is scored again
        choice = InitChoice.from_dict(record)
    elif warm is not None:
        choice = InitChoice(cfg.init, warm[0].ref)
    elif cfg.init == BASE:
        choice = InitChoice(BASE)
    else:
        choice = choose_init(registry, cfg, adapter_kind, loaded, examples, **score)
    if choice.ref is None:
        return choice, None
    if warm is None or warm[0].ref != choice.ref:
        warm = registry.artifact_path(choice.ref)
    check_compatible(warm[0].base_fingerprint, loaded.fingerprint, f"adapter {warm[0].ref}")
    return choice, warm


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(a) == sorted(b)
    return a == b


def find_candidates(registry, adapter_kind, fingerprint: str, given: dict[str, Any]) -> list[tuple[Any, Path]]:
    """The versions `auto` scores: (VersionInfo, verified artifact folder), newest first.

    Args:
        registry: a `registry.client.Registry`.
        adapter_kind: the new adapter's kind (`training.methods.Kind`).
        fingerprint: the loaded base's fingerprint (candidates must be trained on it).
        given: the kind options the user set (rank included); a candidate must match them all.
    """
    newest: dict[str, Any] = {}
    for v in registry.search_versions(base=fingerprint):  # ready versions only, by name then version
        newest[v.name] = v
    wanted = adapter_kind.make_config(**given) if given else None
    found = []
    for v in sorted(newest.values(), key=lambda v: v.id, reverse=True):
        if v.kind not in adapter_kind.seeds_from or v.domain == BASELINE_DOMAIN or v.base_fingerprint != fingerprint \
                or any(p.get("relation") == "import" for p in v.parents):
            continue
        info, path = registry.artifact_path(v)
        if wanted is not None:
            stored = adapter_kind.read_config(path)
            if not all(_same(getattr(stored, k), getattr(wanted, k)) for k in given):
                continue
        found.append((info, path))
        if len(found) == MAX_CANDIDATES:
            break
    return found


def sample_examples(examples: list, n_passes: int, train_tokens: int, seed: int) -> list:
    """A seeded sample of `examples` within the scoring budget of one of `n_passes` passes (at least one)."""
    budget = min(MAX_SAMPLE_TOKENS, SAMPLE_SHARE / FORWARD_COST * train_tokens / max(n_passes, 1))
    order = random.Random(f"plait-init-{seed}").sample(range(len(examples)), len(examples))
    picked, tokens = [], 0
    for i in order:
        n = len(examples[i].input_ids)
        if picked and tokens + n > budget:
            break
        picked.append(examples[i])
        tokens += n
    return picked


def _take_off(model):
    """The bare base under a scoring adapter: peft's `unload`, or the bottleneck wrapper's `remove`."""
    for verb in ("remove", "unload"):
        fn = getattr(model, verb, None)
        if callable(fn):
            return fn()
    raise TypeError(f"cannot take the adapter off a {type(model).__name__}")


def _stack(base_model, candidates: list[tuple[Any, Path]]) -> tuple[dict[str, tuple[Any, int]], list]:
    """Load the candidates onto `base_model` as slots of their kinds' engine stackers (`make_stacker`).

    A stacker builds each layer's wrapper once and holds every candidate's weights side by side, so
    putting a candidate "on" the base is one routing switch instead of peft building (and
    unbuilding) its layers (~1.2 s a candidate on SmolLM2). A candidate a stacker refuses (an
    option the engine does not serve) is left out and scored the kind's own way.

    Returns:
        ({ref: (stacker, slot)}, the stackers, to empty afterwards with `_unstack`)
    """
    import torch
    from safetensors.torch import load_file

    from training.methods import read_adapter_config
    from training.methods._stacking import SiteRegistry

    device = next(base_model.parameters()).device
    sites = SiteRegistry(base_model, torch.float32, device)  # scored in fp32, like the peft path (see below)
    stackers: dict[str, Any] = {}
    slots: dict[str, tuple[Any, int]] = {}
    for info, path in candidates:
        kind = get_kind(info.kind)
        stacker = stackers.get(kind.family)
        if stacker is None:
            stacker = stackers[kind.family] = kind.make_stacker(sites)
        try:
            tensors = load_file(str(Path(path) / "adapter_model.safetensors"), device="cpu")
            slot = stacker.n_slots
            stacker.add(info.ref, read_adapter_config(path), tensors)
        except BadInputError:
            continue  # add validates before installing anything: nothing of it is left on the base
        slots[info.ref] = (stacker, slot)
    return slots, list(stackers.values())


def _unstack(stackers: list) -> None:
    """Empty the stackers; the last slot out puts every wrapped layer of the base back."""
    from training.methods._stacking import KindRouting

    for stacker in stackers:
        stacker.route(KindRouting())
        for slot in reversed(range(stacker.n_slots)):
            stacker.remove(slot)


def score_candidates(base_model, adapter_kind, candidates: list[tuple[Any, Path]], sample: list, *, pad_id: int,
                     batch_size: int, stacked: bool = True) -> tuple[dict[str, float], int]:
    """Loss per token on `sample` of the base and of each candidate, all on the same base.

    Args:
        stacked: hold the candidates in their kinds' engine stackers and switch between them
            (`_stack`); False puts each on the base through its kind's `load` and takes it off
            again (`_take_off`), the reference the stacked scores are tested equal to.

    Returns:
        ({"base": loss, ref: loss, ...}, labelled tokens in the sample)
    """
    import torch

    from training.methods._stacking import KindRouting
    from training.evaluation import evaluate

    # scored in fp32 whatever the training's dtype: a no-grad forward under CPU bf16 autocast measured 5x
    # slower than fp32 on the 2-core demo machine (bf16 speed depends on the machine: a CPU with
    # avx512_bf16 but no AMX ran a bf16 matmul at about half the fp32 speed), and the
    # choice compares losses with each other, not with the training's numbers
    kw = dict(pad_id=pad_id, batch_size=batch_size, dtype="fp32", adapter_kind=adapter_kind)
    base = evaluate(base_model, sample, **kw)
    losses = {BASE: base["loss"]}
    with torch.random.fork_rng(devices=[]):  # loading draws init values; the fresh adapter's seed stays as it was
        slots, stackers = _stack(base_model, candidates) if stacked else ({}, [])
        try:
            for info, path in candidates:
                if info.ref in slots:
                    stacker, slot = slots[info.ref]
                    stacker.route(KindRouting("single", slot))
                    try:
                        losses[info.ref] = evaluate(base_model, sample, **kw)["loss"]
                    finally:
                        stacker.route(KindRouting())
                    continue
                scored = adapter_kind.load(base_model, path)
                try:
                    losses[info.ref] = evaluate(scored, sample, **kw)["loss"]
                finally:
                    _take_off(scored)
        finally:
            _unstack(stackers)
    return losses, int(base["tokens"])


def choose_init(registry, cfg, adapter_kind, loaded, examples: list, *, total_steps: int, pad_id: int,
                batch_size: int) -> InitChoice:
    """Run `auto`: find the candidates, score them and the base, pick the start.

    Args:
        cfg: the run's `training.trainer.TrainConfig` (its rank, options and seed are used).
        loaded: the loaded base (`training.base.LoadedBase`), with no adapter on it.
        examples: the new domain's tokenized training examples.
        total_steps: the run's optimizer steps (with `cfg.batch_size`, the scoring budget).
    """
    t0 = time.perf_counter()
    candidates = find_candidates(registry, adapter_kind, loaded.fingerprint, given_options(cfg, adapter_kind.name))
    if not candidates:
        return InitChoice(AUTO, None, {}, 0, time.perf_counter() - t0)
    mean_tokens = sum(len(e.input_ids) for e in examples) / max(len(examples), 1)
    sample = sample_examples(examples, len(candidates) + 1, int(total_steps * cfg.batch_size * mean_tokens), cfg.seed)
    losses, tokens = score_candidates(loaded.model, adapter_kind, candidates, sample, pad_id=pad_id,
                                      batch_size=batch_size)
    best = min((ref for ref in losses if ref != BASE), key=lambda r: losses[r])
    chosen = best if losses[best] < losses[BASE] else None
    return InitChoice(AUTO, chosen, losses, tokens, time.perf_counter() - t0)
