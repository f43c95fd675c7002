"""What routing costs and what blending buys: eval loss under hard routing, top-2 blend and oracle.

    python bench/routing_loss.py WORKSPACE        # e.g. the demo's: plait-demo/.plait

For every domain's frozen eval set in a trained workspace, the mean token loss of
  * oracle  — each row served by its own domain's adapter,
  * hard    — the router's top-1 choice (base fallback below its threshold),
  * top-2   — the router's two best adapters blended by their renormalised scores,
  * base    — no adapter;
and the cross-precision check of issue 4: each adapter's loss on its own eval set on a
full-precision base and on a 4-bit NF4 base (a QLoRA adapter on fp32, a LoRA adapter on 4-bit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    import torch

    from plait.continual import row_input
    from plait.workspace import Workspace
    from routing.engine import CompositionEngine, Routing

    torch.set_num_threads(2)
    ws = Workspace(args.workspace)
    rm = ws.routed_model
    rm.engine.max_length = args.max_length
    router = rm.router
    print(f"router {rm.router_info.ref} ({router.kind}), threshold {router.threshold:.3f}")
    print(f"{'domain':<15}{'base':>9}{'oracle':>9}{'hard':>9}{'top-2':>9}{'hard-oracle':>13}{'top2-oracle':>13}")
    rows = {}
    for d in router.domains:
        ev = ws.registry.get_domain_eval(d)
        texts = [row_input(r) for r in ev]
        own = rm.ensure_adapter(router.refs[d])
        res = {"base": rm.engine.loss(texts, Routing.base()).mean().item(),
               "oracle": rm.engine.loss(texts, Routing.one(own)).mean().item()}
        for k, name in ((1, "hard"), (2, "top-2")):
            served = rm.decide(texts, "auto", top_k=min(k, len(router.domains)))
            res[name] = rm.loss(texts, served).mean().item()
        rows[d] = res
        print(f"{d:<15}{res['base']:>9.4f}{res['oracle']:>9.4f}{res['hard']:>9.4f}{res['top-2']:>9.4f}"
              f"{res['hard'] - res['oracle']:>+13.4f}{res['top-2'] - res['oracle']:>+13.4f}")

    print("\ncross precision: each adapter on its own eval set, fp32 base vs 4-bit NF4 base")
    t = time.time()
    q = CompositionEngine.from_base(ws.config.base_model, quantize_4bit=True, max_length=args.max_length)
    print(f"(4-bit base loaded in {time.time() - t:.1f} s)")
    print(f"{'adapter':<18}{'kind':<12}{'fp32 base':>11}{'4-bit base':>12}{'diff':>10}")
    for d in router.domains:
        info, path = ws.registry.artifact_path(router.refs[d])
        q.add_adapter(info.ref, path, kind=info.kind, fingerprint=info.base_fingerprint)
        texts = [row_input(r) for r in ws.registry.get_domain_eval(d)]
        fp = rm.engine.loss(texts, Routing.one(rm.ensure_adapter(info.ref))).mean().item()
        nf4 = q.loss(texts, Routing.one(info.ref)).mean().item()
        print(f"{info.ref:<18}{info.kind:<12}{fp:>11.4f}{nf4:>12.4f}{nf4 - fp:>+10.4f}")


if __name__ == "__main__":
    main()
