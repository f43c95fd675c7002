"""`plait train DOMAIN --data FILE`: train a new adapter version for one domain and register it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from plait.commands._common import JsonOpt, WorkspaceOpt, console, open_workspace, print_json, short
from training.data import DEFAULT_MAX_LENGTH
from training.replay import REPLAY_SHARE
from training.methods import kind_names


#: `--method` choices: the adapter kinds registered in training/methods (read without importing torch)
MethodName = Enum("MethodName", {k: k for k in kind_names()}, type=str)


class DtypeName(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _options(pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs; values are read as JSON where they parse (numbers, lists), else as text."""
    from registry.errors import BadInputError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"option {pair!r} is invalid: write KEY=VALUE, e.g. --option placement=houlsby")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def train(
    domain: Annotated[str, typer.Argument(help="The domain to train (also the adapter's name unless --name).",
                                          show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Training data: .jsonl/.csv/.parquet rows with text or "
                                                      "prompt+completion, or a folder of .txt files.",
                                       show_default=False)],
    eval_: Annotated[Path | None, typer.Option("--eval", help="Eval data (default: hold out 10% of --data).")] = None,
    method: Annotated[MethodName | None, typer.Option(
        "--method", help="Adapter kind, one of the registered kinds (default lora, or the kind of --from).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Adapter name (default: the domain).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the data (default 1).")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Examples per step (the global batch when data-parallel).")] = 4,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = DEFAULT_MAX_LENGTH,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default: the kind's, 2e-4 for LoRA kinds, 1e-3 for bottleneck).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Adapter rank: LoRA kinds' r, a bottleneck's size.")] = None,
    dtype: Annotated[DtypeName, typer.Option("--dtype", help="auto = fp32 or bf16, whichever this machine ran faster (timed once, cached).")]
        = DtypeName.auto,
    init: Annotated[str | None, typer.Option(
        "--init", show_default="auto",
        help="Where the adapter starts: auto = from the registered version (of any real domain, a kind that can "
             "seed this one) with the lowest loss on a sample of the training rows, if it beats the base there, "
             "else fresh; base = fresh; or a version NAME[:N|@ALIAS].")] = None,
    from_ref: Annotated[str | None, typer.Option(
        "--from", help="Warm-start from this version (NAME[:N|@ALIAS]); the same as --init NAME[:N|@ALIAS].")]
        = None,
    replay: Annotated[float, typer.Option(
        "--replay", help="Share of a warm-started run's training examples replayed from the stored training rows "
                         "of the domains its starting version covers, so the new version keeps serving them "
                         "(0 = the new domain's rows only).")] = REPLAY_SHARE,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of init, data order and dropout.")] = 0,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Adapter option KEY=VALUE, repeatable (e.g. placement=houlsby, alpha=32).")] = None,
    audit: Annotated[bool, typer.Option("--audit/--no-audit", help="Run the forgetting audit afterwards.")] = True,
    json_: JsonOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train a new adapter for DOMAIN, register it, update the router, then audit forgetting.

    Nothing learned before is touched: earlier adapters and the base stay bit-identical.
    Under `accelerate launch` or `torchrun` the training is data-parallel and rank 0 alone
    registers and prints.
    """
    from plait.continual import add_domain
    from training.trainer import TrainConfig

    ws = open_workspace(workspace)
    config = TrainConfig(
        method=method.value if method else None, name=name, steps=steps, epochs=epochs, batch_size=batch_size,
        max_length=max_length, lr=lr, rank=rank, dtype=dtype.value, from_ref=from_ref,
        init=init if init is not None or from_ref is not None else "auto", replay=replay, resume=resume, seed=seed,
        method_options=_options(option or []), progress=not json_)
    added = add_domain(ws, domain, data, eval_, config, audit=audit,
                       audit_options={"progress": not json_, "log": lambda m: console().print(m, style="dim")},
                       log=None if json_ else lambda m: console().print(m, style="bold"))
    if added is None:  # a data-parallel rank other than 0: rank 0 prints the result
        return
    if json_:
        return print_json(added.summary())
    _print_added(added)


def _print_added(added) -> None:
    """The registered version, its training figures and the router, then the audit (if it ran)."""
    result = added.train
    m, v = result.metrics, result.version
    c = console()
    c.print(f"[bold green]registered {v.ref}[/bold green]  ({v.kind}, domain {v.domain}, {result.steps} steps)")
    parent = v.parents[0] if v.parents else {}
    rows = [("sha256", short(v.sha256, 16)), ("parent", parent.get("ref") or f"base {short(parent.get('base'), 19)}"),
            ("init", result.init.describe().removeprefix("init ") if result.init else "-"),
            ("replay", _replay_line(v.config.get("replay") or {})),
            ("train loss", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}"),
            ("eval loss", f"{m['eval_loss']:.4f}  (base {m['base_eval_loss']:.4f}, perplexity {m['eval_perplexity']:.2f})"),
            ("speed", f"{m['train_tokens_per_s']:.0f} tokens/s"), ("peak RSS", f"{m['peak_rss_mb']:.0f} MB"),
            ("trainable", f"{int(m['trainable_params']):,} parameters"),
            ("mlflow run", result.mlflow_run_id or "-"),
            ("router", f"{added.router.ref} covering {len(added.router.covers)} domain(s), held-out accuracy "
                       f"{added.router.metrics['heldout']['accuracy']:.1%}")]
    for label, value in rows:
        c.print(f"  {label:<11} {value}")
    if added.audit is not None:
        from plait.commands.audit import print_audit

        print_audit(added.audit)


def _replay_line(replay: dict) -> str:
    if not replay.get("examples"):
        return "none"
    return f"{replay['examples']} examples of {', '.join(replay['per_domain'])} (share {replay['share']:g})"
