"""`plait registry ...`: read and manage the versioned adapter registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from plait.commands._common import JsonOpt, WorkspaceOpt, console, open_workspace, print_json, print_table, short

app = typer.Typer(no_args_is_help=True, help="The versioned adapter registry: versions, aliases, lineage, metrics.")

RefArg = Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS.", show_default=False)]


@app.command("list")
def list_adapters(
    domain: Annotated[str | None, typer.Option(help="Only adapters of this domain.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only adapters of this adapter kind (see `plait train --method`).")] = None,
    json_: JsonOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """List adapters with their version count, newest version and aliases."""
    rows = open_workspace(workspace).registry.search_adapters(domain=domain, kind=kind)
    if json_:
        return print_json([r.to_dict() for r in rows])
    print_table("adapters", ["adapter", "domain", "kind", "versions", "latest", "aliases"],
                [[r.name, r.domain, r.kind, str(r.versions), str(r.latest or "-"),
                  ", ".join(f"{a}->{v}" for a, v in sorted(r.aliases.items())) or "-"] for r in rows])


@app.command()
def show(ref: RefArg, json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Show one version: provenance, hashes, lineage, aliases and metrics."""
    reg = open_workspace(workspace).registry
    info = reg.get_version(ref)
    metrics = reg.get_metrics(info.ref)
    queued = reg.pending_mirrors(info.ref)  # registered or aliased by a command that left MLflow closed
    if json_:
        return print_json({**info.to_dict(), "metrics": metrics, "mlflow_queued": queued})
    c = console()
    c.print(f"[bold]{info.ref}[/bold]  ({info.kind}, domain {info.domain}, {info.status})")
    for label, value in [("sha256", info.sha256), ("size", f"{info.size_bytes:,} bytes"),
                         ("base", info.base_fingerprint), ("data", info.data_fingerprint or "-"),
                         ("mlflow run", info.mlflow_run_id or "-"),
                         ("mlflow", "off" if not reg.tracking_uri else
                          f"{queued} change(s) queued: `plait registry sync-mlflow` mirrors them now" if queued
                          else "mirrored"), ("created", info.created_at.isoformat()),
                         ("aliases", ", ".join(info.aliases) or "-"),
                         ("parents", ", ".join(_parent(p) for p in info.parents) or "-")]:
        c.print(f"  {label:<11} {value}")
    for m in metrics:
        audit = f" (audit {m['audit_id']})" if m["audit_id"] else ""
        c.print(f"  metric      {m['name']} [{m['eval_domain']}] = {m['value']:.6g}{audit}")


def _parent(p: dict) -> str:
    target = p.get("ref") or f"base {short((p.get('base') or '').removeprefix('sha256:'))}"
    return f"{target} ({p['relation']})"


@app.command()
def versions(name: Annotated[str, typer.Argument(help="Adapter name.")], json_: JsonOpt = False,
             workspace: WorkspaceOpt = None) -> None:
    """Every version of an adapter: number, sha256, parents, aliases, created."""
    from registry.names import validate_name

    reg = open_workspace(workspace).registry
    validate_name(name, "adapter name")
    rows = reg.search_versions(name=name, include_archived=True)
    if not rows:
        reg.get_version(name)  # raises the clear "no adapter named ..." error
    if json_:
        return print_json([{"version": v.version, "ref": v.ref, "sha256": v.sha256, "parents": v.parents,
                            "aliases": v.aliases, "status": v.status, "created_at": v.created_at.isoformat()}
                           for v in rows])
    print_table(f"versions of {name}", ["version", "sha256", "parents", "aliases", "status", "created"],
                [[str(v.version), short(v.sha256), ", ".join(_parent(p) for p in v.parents) or "-",
                  ", ".join(v.aliases) or "-", v.status, v.created_at.strftime("%Y-%m-%d %H:%M:%S")] for v in rows])


@app.command()
def lineage(
    ref: RefArg,
    direction: Annotated[str, typer.Option(help="up (ancestors), down (descendants) or both.")] = "both",
    json_: JsonOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """The lineage graph around a version (parents, merges, warm starts, children)."""
    graph = open_workspace(workspace).registry.get_lineage(ref, direction=direction)
    if json_:
        return print_json(graph)
    c = console()
    c.print(f"[bold]{graph['root']}[/bold]")
    for e in graph["edges"]:
        weight = f" w={e['weight']:g}" if e["weight"] is not None else ""
        parent = e["parent"] if not e["parent"].startswith("base:") else f"base {short(e['parent'][12:])}"
        c.print(f"  {e['child']}  <-[{e['relation']}{weight}]-  {parent}")


def _forced(call, what: str):
    """Run a registry call whose safety refusal `--force` overrides; the refusal names the flag."""
    from registry.errors import RefusedError

    try:
        return call()
    except RefusedError as e:
        raise RefusedError(f"{e.message}; or pass --force to {what} anyway") from None


ForceGateOpt = Annotated[bool, typer.Option(
    help="Promote to production even when no passed audit covered the version (its newest covering audit failed, "
         "or none covered it).")]


@app.command()
def alias(
    ref: RefArg,
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="Alias to set or move, e.g. production.")],
    force: ForceGateOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Point ALIAS at the version REF (create or move it); production needs a passed audit of it."""
    reg = open_workspace(workspace).registry
    info = _forced(lambda: reg.set_alias(ref, alias_name, force=force), f"promote {ref}")
    typer.echo(f"{info.name}@{alias_name} -> {info.ref}")


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Adapter name.")],
             alias_name: Annotated[str, typer.Argument(metavar="ALIAS")], force: ForceGateOpt = False,
             workspace: WorkspaceOpt = None) -> None:
    """Move ALIAS back to the version it pointed at before its latest move (production: audit gate)."""
    reg = open_workspace(workspace).registry
    info = _forced(lambda: reg.rollback_alias(name, alias_name, force=force), f"roll {name}@{alias_name} back")
    typer.echo(f"{info.name}@{alias_name} -> {info.ref}")


@app.command()
def metrics(ref: RefArg, json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Every metric recorded for a version (training, evaluation, audits)."""
    reg = open_workspace(workspace).registry
    info = reg.get_version(ref)
    rows = reg.get_metrics(info.ref)
    if json_:
        return print_json(rows)
    print_table(f"metrics of {info.ref}", ["metric", "eval domain", "value", "audit", "recorded"],
                [[m["name"], m["eval_domain"] or "-", f"{m['value']:.6g}", str(m["audit_id"] or "-"),
                  m["created_at"][:19]] for m in rows])


@app.command("import")
def import_(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).")],
    name: Annotated[str, typer.Option(help="Adapter name in the registry.")],
    domain: Annotated[str, typer.Option(help="Domain the adapter serves.")],
    workspace: WorkspaceOpt = None,
) -> None:
    """Import a PEFT LoRA folder as the next version of adapter NAME."""
    from registry.names import validate_name

    validate_name(name, "adapter name")  # before hashing the base: bad input answers at once
    validate_name(domain, "domain name")
    ws = open_workspace(workspace)
    info = ws.registry.import_peft(peft_dir, name=name, domain=domain, base_fingerprint=ws.base_fingerprint,
                                   **_detected_kind(peft_dir))
    typer.echo(f"imported {peft_dir} as {info.ref} (sha256 {short(info.sha256)}, {info.kind})")


def _detected_kind(peft_dir: Path) -> dict:
    """{"kind": K} for a readable PEFT LoRA config (a variant such as use_dora is its own kind, and
    one no kind claims is refused); {} otherwise, so the registry's own checks name the problem."""
    import json

    try:
        config = json.loads((peft_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        return {}
    from training.methods import detect_folder

    return {"kind": detect_folder(peft_dir)}


@app.command()
def export(ref: RefArg, out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="New or empty folder.")],
           workspace: WorkspaceOpt = None) -> None:
    """Copy a version (hash-checked) to DIR in PEFT layout, loadable by peft and vLLM."""
    out = open_workspace(workspace).registry.export_version(ref, out_dir)
    typer.echo(f"exported {ref} to {out}")


@app.command()
def verify(json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Re-hash every stored artifact and check every live router's coverage; exit 1 when any fails."""
    report = open_workspace(workspace).registry.verify()
    bad = [r for r in report if not r["ok"]]
    if json_:
        print_json({"ok": not bad, "checked": len(report), "failed": bad})
    else:
        for r in bad:
            typer.echo(f"FAILED {r['ref']}: {r['error']}", err=True)
        typer.echo(f"verified {len(report)} artifact(s): {len(report) - len(bad)} ok, {len(bad)} failed")
    if bad:
        raise typer.Exit(1)


@app.command()
def archive(ref: RefArg,
            force: Annotated[bool, typer.Option(
                help="Archive even a version a live router covers (gc keeps its files while one does).")] = False,
            workspace: WorkspaceOpt = None) -> None:
    """Archive a version: NAME no longer resolves to it, it is no longer served, and `gc` may delete its
    files once no live router covers it. Refused for aliased versions and (without --force) for versions
    the newest router, or an audit stage's router, covers."""
    reg = open_workspace(workspace).registry
    info = _forced(lambda: reg.archive(ref, force=force), f"archive {ref}")
    typer.echo(f"archived {info.ref}")


@app.command()
def gc(grace: Annotated[float, typer.Option(help="Keep files younger than this many seconds.")] = 600.0,
       workspace: WorkspaceOpt = None) -> None:
    """Delete artifact files no ready version, live router or domain split references."""
    out = open_workspace(workspace).registry.gc(grace_s=grace)
    typer.echo(f"removed {out['artifacts_removed']} artifact(s), {out['bytes_freed']:,} bytes, "
               f"{out['temp_removed']} temp folder(s)")


@app.command()
def domains(json_: JsonOpt = False, workspace: WorkspaceOpt = None) -> None:
    """Domains in the order they were added."""
    rows = open_workspace(workspace).registry.search_domains()
    if json_:
        return print_json(rows)
    for d in rows:
        typer.echo(f"{d['position']:>3}  {d['name']:<24} {', '.join(d['adapters']) or '-'}")


@app.command("sync-mlflow")
def sync_mlflow(workspace: WorkspaceOpt = None) -> None:
    """Mirror every version and alias into the workspace's MLflow model registry again."""
    n = open_workspace(workspace).registry.sync_mlflow()
    typer.echo(f"mirrored {n} version(s) into MLflow")
