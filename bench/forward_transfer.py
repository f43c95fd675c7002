"""Forward transfer bought by `--init auto`: each domain's own eval loss right after training,
warm-started (`auto`, as the workspace trained it) against a fresh adapter (`--init base`).

Reads a workspace made by `plait demo` (or any workspace), and for every real domain's FIRST
version retrains the same adapter kind with the same settings (steps, batch size, length,
learning rate, seed) on exactly the same rows (the registry's stored training rows, its frozen
eval and validation sets) in a scratch workspace, from the base. Prints per domain: the stored
`auto` version's `eval_loss`, its init choice, the fresh run's `eval_loss`, and the difference.

    python bench/forward_transfer.py plait-demo/.plait
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--domains", default=None, help="comma-separated domains to measure (default: all)")
    a = p.parse_args()
    only = set(a.domains.split(",")) if a.domains else None

    from plait.workspace import Workspace
    from registry.names import BASELINE_DOMAIN
    from training.data import DomainData, Row, fingerprint_rows
    from training.trainer import TrainConfig, train_domain

    ws = Workspace(a.workspace)
    reg = ws.registry
    scratch = Workspace.init(Path(tempfile.mkdtemp(prefix="plait-fwt-")) / ".plait", base_model=ws.config.base_model,
                             tracking_uri="none")
    print(f"{'domain':<15} {'kind':<11} {'auto: init':<28} {'auto':>7} {'base':>7} {'auto-base':>10}")
    gains = []
    for d in [d["name"] for d in reg.search_domains() if d["eval_sha256"] and d["name"] != BASELINE_DOMAIN
              and (only is None or d["name"] in only)]:
        first = sorted(reg.search_versions(domain=d), key=lambda v: v.created_at)[0]
        cfg = first.config

        def rows(items, split):
            return [Row(text=r.get("text"), prompt=r.get("prompt"), completion=r.get("completion"),
                        where=f"{d}:{split}:{n + 1}") for n, r in enumerate(items)]

        train, ev = rows(reg.get_domain_rows(d, "train"), "train"), rows(reg.get_domain_eval(d), "eval")
        val = rows(reg.get_domain_rows(d, "validation"), "validation")
        dd = DomainData(train, ev, fingerprint_rows(train, ev), "file", val)
        fresh = train_domain(scratch.registry, ws.config.base_model, d, dd, config=TrainConfig(
            method=first.kind, steps=cfg["steps"], batch_size=cfg["batch_size"], max_length=cfg["max_length"],
            lr=cfg["lr"], seed=cfg["seed"], dtype=cfg["dtype"], init="base", progress=False))
        auto = next(m["value"] for m in reg.get_metrics(first.ref) if m["name"] == "eval_loss")
        base = fresh.metrics["eval_loss"]
        gains.append(auto - base)
        init = cfg.get("warm_start") or "fresh (base)"
        print(f"{d:<15} {first.kind:<11} {init:<28} {auto:7.4f} {base:7.4f} {auto - base:+10.4f}", flush=True)
    print(f"mean auto - base: {sum(gains) / len(gains):+.4f} nats over {len(gains)} domains")


if __name__ == "__main__":
    main()
