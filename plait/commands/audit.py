"""`plait audit`: the forgetting audit over every domain, its report, and the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from plait.commands._common import JsonOpt, WorkspaceOpt, console, open_workspace, print_json
from training.data import DEFAULT_MAX_LENGTH


def print_audit(result) -> None:
    """The audit's one-screen summary."""
    from rich.table import Table

    c = console()
    if not result.matrices:  # stopped at the integrity check
        c.print(f"[bold red]FAILED[/bold red] audit #{result.audit_id}: report {result.out_dir}/report.md")
        for r in result.reasons:
            c.print(f"  [red]- {r}[/red]")
        return
    systems = list(result.current)
    table = Table("domain", *systems, "routed acc.", title=f"audit #{result.audit_id}: mean token loss, final stage")
    for d in result.domains:
        acc = result.routing_accuracy.get(d)
        table.add_row(d, *(f"{result.current[s][d]:.4f}" for s in systems), "-" if acc is None else f"{acc:.0%}")
    c.print(table)
    metrics = Table("system", "ACC (loss)", "BWT", "FWT", "max forgetting", title="continual metrics (+ forgetting = worse)")
    fmt = lambda v: "-" if v is None else f"{v:+.4f}"  # noqa: E731
    for s, m in result.metrics.items():
        metrics.add_row(s, f"{m['acc']:.4f}", fmt(m["bwt"]), fmt(m["fwt"]), fmt(m["max_forgetting"]))
    c.print(metrics)
    _print_baselines(c, result)
    c.print("served: " + served_line(result), style="dim")
    ctl = result.control
    c.print(f"control set: base {ctl['base_loss']:.4f}, routed {ctl['routed_loss']:.4f} "
            f"({ctl['fallback_rate']:.0%} sent to the base)")
    verdict = "[bold green]PASSED[/bold green]" if result.passed else "[bold red]FAILED[/bold red]"
    c.print(f"{verdict}  report: {result.out_dir}/report.md  heatmap: {result.out_dir}/heatmap.png")
    for r in result.reasons:
        c.print(f"  [red]- {r}[/red]")


def _print_baselines(c, result) -> None:
    """How the merged and joint baselines were built, one line each."""
    from plait.audit import joint_note

    merged = result.baselines.get("merged")
    if merged:
        c.print(f"merged baseline ({merged['method']}):")
        for st in merged["stages"]:
            c.print(f"  {st['note']}", style="dim")
    joint = result.baselines.get("joint")
    if joint:
        c.print(f"joint baseline: {joint_note(joint)}", style="dim")


def served_line(result) -> str:
    """Per domain, the versions the router served it with across the stages, e.g.
    `cats cats:1 -> law:1 (after law); law law:1`: a change names the stage it came with."""
    parts = []
    for d in result.domains:
        runs, last = [], None
        for i, ref in enumerate(result.served.get(d, [])):
            if ref is not None and ref != last:
                runs.append(ref if last is None else f"{ref} (after {result.domains[i]})")
                last = ref
        parts.append(f"{d} {' -> '.join(runs) or '-'}")
    return "; ".join(parts)


def audit(
    domains: Annotated[str | None, typer.Option("--domains", help="Comma-separated domains (default: all).")] = None,
    baseline: Annotated[str, typer.Option(
        "--baseline", help="Also measure baselines, comma-separated: sequential (one LoRA fine-tuned domain after "
        "domain), merged (the domains' LoRAs merged into one), joint (one LoRA trained on every domain's rows at "
        "once, with the sequential chain's total steps), or none.")] = "none",
    merge: Annotated[str, typer.Option(
        "--merge", help="How the merged baseline merges: cat (exact mean of the LoRA deltas), ties (TIES, "
        "density 0.2; slower) or linear (peft's approximate linear merge; one rank only).")] = "cat",
    gate: Annotated[bool, typer.Option("--gate", help="Exit 1 when the audit fails (forgetting or integrity).")] = False,
    max_forgetting: Annotated[float, typer.Option(
        "--max-forgetting", help="Largest allowed forgetting of own/routed, in nats of mean token loss.")] = 0.05,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Tokens per eval text (default: what earlier audits of the workspace used, "
        f"{DEFAULT_MAX_LENGTH} for the first; a different value than earlier audits' is refused).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: WORKSPACE/audits/ID).")] = None,
    json_: JsonOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Measure every domain with the base, its own adapter and the routed system; report forgetting."""
    from plait.audit import BASELINES, run_audit
    from registry.errors import BadInputError
    from training.merge import check_method

    chosen = [b.strip() for b in baseline.split(",") if b.strip()]
    for b in chosen:
        if b not in (*BASELINES, "none") or (b == "none" and len(chosen) > 1):
            raise BadInputError(f"unknown baseline {b!r}: use none, or one or more of {', '.join(BASELINES)} "
                                f"(comma-separated)")
    check_method(merge)
    ws = open_workspace(workspace)
    result = run_audit(ws, domains=[d.strip() for d in domains.split(",") if d.strip()] if domains else None,
                       baselines=tuple(b for b in chosen if b != "none"), merge=merge,
                       max_forgetting=max_forgetting, max_length=max_length, out_dir=out, progress=not json_,
                       log=lambda m: console().print(m, style="dim"))
    if json_:
        print_json(result.summary())
    else:
        print_audit(result)
    if gate and not result.passed:
        raise typer.Exit(1)
