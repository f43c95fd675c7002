"""What a new domain costs at 5, 100 and 1,000 domains (issue 16, items 4 and 5).

    python bench/scale.py --sizes 5,100 [--sizes 1000] [--profile DIR] [--json FILE]

Builds one real workspace per size (SQLite registry, MLflow tracking in the workspace's
`mlflow.db`, the content-addressed store) from text every machine has offline: the Python
standard library's own sources. A domain is one module, or one part of a large module: the
module's source is cut at blank lines into chunks of about 600 characters, 12 chunks to a
part (8 train, 2 validation, 2 eval, interleaved), at most 12 parts a module. Domains are
taken round-robin over modules (every module's first part, then every second part, ...), so
5 and 100 domains are 5 and 100 different modules; 1,000 needs second and later parts of
large modules, which are hard to tell apart from their first part (the accuracy figures show
it). The files used are pinned by sha256 in `bench/scale_domains.txt` (written with --pin on
Python 3.11.7); a file that differs is refused, so every machine builds the same domains.

Adapters: 8 tiny PEFT LoRAs (r=4, q/v) on the tiny 2-layer Llama of `tests/tiny.py`, imported
round-robin (`Registry.import_peft`): every domain has its own registered version (its own
row, lineage, MLflow model version) but 8 artifacts are shared by all of them (the store is
content-addressed). Every domain has its own frozen eval, validation and train rows in the
registry and its own router state (hybrid router, the default).

Build (not timed): N-1 domains registered, one router version fitted over them through
`plait.continual.change_router` (the path `plait train` takes), and one audit (which stores
every figure). Then, timed, the N-th domain is added the way `plait train` does after
training: `update_router` (router update: load, add the domain, calibrate, evaluate,
register) and `run_audit` without baselines. Both run with cold in-process caches (as a new
`plait train` process would); caches on disk (`$PLAIT_CACHE`) are warm from the build, as
they are in a workspace that has been used.

Reported per size: router update and audit seconds, route latency per query (batches of 32),
routing accuracy on every domain's eval rows next to a nearest-centroid reference on the same
MiniLM embeddings and rows, the fraction of the held-out control texts (`AUDIT_CONTROL`)
sent to the base, router artifact bytes, `plait registry list --json` and `show --json`
command-body medians, adapter bytes per resident adapter, and the engine's memory with every
domain's version loaded: all resident vs `--max-adapters 32` (resident count, evictions, MB of
adapter tensors the engine holds).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIN_FILE = Path(__file__).with_name("scale_domains.txt")
SKIP = ("test", "tests", "site-packages", "idle_test", "lib2to3", "__pycache__")
CHUNK_CHARS, MIN_CHUNK_CHARS, PART_CHUNKS, MAX_PARTS = 600, 120, 12, 12
N_LORAS = 8


# ----------------------------------------------------------------------------- domains
def chunks(source: str) -> list[str]:
    """The source cut at blank lines into pieces of about CHUNK_CHARS (short ones dropped)."""
    out, cur = [], ""
    for block in source.split("\n\n"):
        if cur and len(cur) + len(block) > CHUNK_CHARS:
            if len(cur.strip()) >= MIN_CHUNK_CHARS:
                out.append(cur.strip())
            cur = ""
        cur += block + "\n\n"
    if len(cur.strip()) >= MIN_CHUNK_CHARS:
        out.append(cur.strip())
    return out


def stdlib_files() -> list[Path]:
    from plait.datasets import stdlib_root

    root = stdlib_root()
    return [p for p in sorted(root.rglob("*.py")) if not any(x in p.relative_to(root).parts for x in SKIP)]


def write_pins() -> None:
    """Pin every file that yields at least one part: `relpath sha256` per line."""
    from plait.datasets import stdlib_root

    root, lines = stdlib_root(), []
    for p in stdlib_files():
        data = p.read_bytes()
        if len(chunks(data.decode("utf-8", errors="replace"))) >= PART_CHUNKS:
            lines.append(f"{p.relative_to(root).as_posix()} {hashlib.sha256(data).hexdigest()}")
    PIN_FILE.write_text(f"# bench/scale.py domains: Python {sys.version.split()[0]} standard library\n"
                        + "\n".join(lines) + "\n")
    print(f"pinned {len(lines)} files in {PIN_FILE}")


def domains(n: int) -> dict[str, dict[str, list[str]]]:
    """The first `n` domains (round-robin over modules): {name: {"train", "validation", "eval"}}."""
    from plait.datasets import stdlib_root

    root, parts = stdlib_root(), []
    for line in PIN_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rel, want = line.split()
        data = (root / rel).read_bytes() if (root / rel).is_file() else b""
        if hashlib.sha256(data).hexdigest() != want:
            raise SystemExit(f"{root / rel} is missing or differs from the pinned copy: run with Python 3.11.7")
        cs = chunks(data.decode("utf-8", errors="replace"))
        name = "py." + rel[:-3].replace("/", ".")
        parts.append([(f"{name}.{k + 1}", cs[k * PART_CHUNKS:(k + 1) * PART_CHUNKS])
                      for k in range(min(MAX_PARTS, len(cs) // PART_CHUNKS))])
    order = [p[k] for k in range(MAX_PARTS) for p in parts if k < len(p)]
    if n > len(order):
        raise SystemExit(f"only {len(order)} domains can be cut from the pinned files; ask for fewer")
    out = {}
    for name, cs in order[:n]:
        out[name[-64:].lstrip("._-")] = {"train": [c for i, c in enumerate(cs) if i % 6 not in (2, 5)],
                                         "validation": [cs[2], cs[8]], "eval": [cs[5], cs[11]]}
    return out


# ----------------------------------------------------------------------------- build
def build(root: Path, n: int, doms: dict, loras: list[Path], base: Path):
    """A workspace with the first n-1 domains registered, routed and audited once."""
    from plait.audit import run_audit
    from plait.continual import ROUTER_TEXTS_PER_DOMAIN, change_router
    from plait.workspace import Workspace

    if (root / f"ws-{n}" / "plait.toml").is_file():  # built earlier (--build-only): reuse it as it is
        ws = Workspace(root / f"ws-{n}")
        # n - 1 as built; more once earlier measuring runs each added a domain (reported as measured)
        if len(ws.registry.search_domains()) >= n - 1 and ws.registry.search_audits():
            print(f"[{n}] reusing the workspace built in {ws.path}", flush=True)
            return ws
        raise SystemExit(f"{ws.path} is not a finished build of {n - 1} domains: delete it and build again")
    ws = Workspace.init(root / f"ws-{n}", base_model=str(base))
    names = list(doms)[:n - 1]  # (doms holds n + 1: a rerun on a kept workspace adds domain n + 1)
    refs = {}
    t = time.perf_counter()
    for i, d in enumerate(names):
        refs[d] = register(ws, d, doms[d], loras[i % len(loras)])
    reg_s = time.perf_counter() - t

    def apply(router):
        for d in names:
            if d not in router.domains:
                router.add_domain(d, doms[d]["train"][:ROUTER_TEXTS_PER_DOMAIN], ref=refs[d])
        return {}

    t = time.perf_counter()
    change_router(ws, apply)
    router_s = time.perf_counter() - t
    t = time.perf_counter()
    run_audit(ws, progress=False)
    audit_s = time.perf_counter() - t
    print(f"[{n}] built {n - 1} domains: register {reg_s:.1f} s, router fit {router_s:.1f} s, "
          f"first audit {audit_s:.1f} s", flush=True)
    return ws


def register(ws, domain: str, rows: dict, lora: Path) -> str:
    reg = ws.registry
    v = reg.import_peft(lora, name=domain, domain=domain, base_fingerprint=ws.base_fingerprint)
    for split in ("eval", "validation", "train"):
        reg.set_domain_rows(domain, split, [{"text": t} for t in rows[split]])
    return v.ref


def drop_process_caches(ws) -> None:
    """What a fresh `plait train` process would not have: the loaded router and in-process caches."""
    import importlib

    for module in ("registry.hashing", "routing.routers._features"):
        clear = getattr(importlib.import_module(module), "clear_memory_cache", None) \
            if importlib.util.find_spec(module) else None
        if clear:
            clear()
    ws.__dict__.pop("routed_model", None)


# ----------------------------------------------------------------------------- measure
def median_ms(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def add_one(ws, name: str, rows: dict, lora: Path, profile: Path | None):
    """Register domain N, then time its router update and its audit (no baselines)."""
    from plait.audit import run_audit
    from plait.continual import update_router

    from routing.routers.embedding import minilm_model

    ref = register(ws, name, rows, lora)
    drop_process_caches(ws)
    minilm_model()  # importing sentence-transformers and loading MiniLM (~12 s cold) is the same at every size
    ws.registry.drain_mlflow()  # `plait train` has MLflow open (its run) and mirrors the version at once
    import matplotlib.figure  # noqa: F401 - the heatmap's import (~2 s cold) is the same at every size
    prof = cProfile.Profile() if profile else None
    calls = count_engine_calls()
    t = time.perf_counter()
    if prof:
        prof.enable()
    update_router(ws, name, rows["train"], ref)
    update_s = time.perf_counter() - t
    drop_process_caches(ws)
    t = time.perf_counter()
    audit = run_audit(ws, progress=False)
    audit_s = time.perf_counter() - t
    if prof:
        prof.disable()
        prof.dump_stats(str(profile))
    return update_s, audit_s, audit, calls()


def count_engine_calls():
    """Count `CompositionEngine.loss` calls (and rows) from now on; returns a reader."""
    from routing import engine

    cls = engine.CompositionEngine
    real, seen = cls.loss, {"calls": 0, "rows": 0}

    def loss(self, texts, *a, **k):
        seen["calls"] += 1
        seen["rows"] += len(texts)
        return real(self, texts, *a, **k)

    cls.loss = loss

    def read():
        cls.loss = real
        return dict(seen)
    return read


def routing_figures(ws, doms: dict) -> dict:
    """Route latency per query (batch 32), accuracy vs nearest centroid, control fallback."""
    import torch

    from plait.datasets import AUDIT_CONTROL
    from routing.routers import load_router, read_files
    from routing.routers._features import cached_embeddings

    reg = ws.registry
    router = load_router(read_files(reg.router_path(reg.get_router(ws.router_kind))))
    texts = [t for d in router.domains for t in doms[d]["eval"]]
    labels = [i for i, d in enumerate(router.domains) for _ in doms[d]["eval"]]
    router.route(texts[:32])  # warm up (encoder loaded, table built)
    batches = [texts[i:i + 32] for i in range(0, len(texts), 32)][:20]
    t = time.perf_counter()
    for b in batches:
        router.route(b)
    per_query_ms = (time.perf_counter() - t) * 1000 / sum(len(b) for b in batches)
    with cached_embeddings():  # the eval rows were encoded by the audit: reuse those embeddings
        probs, _ = router.scored(texts)
        decisions = router.route(texts)
        # nearest centroid on the same MiniLM embeddings: the router's own dense prototypes are the
        # unit means of each domain's training-text embeddings (first embed_chars characters)
        q = router.encoder.encode([t[:router.embed_chars] for t in texts])
    acc = float((probs.argmax(-1) == torch.tensor(labels)).float().mean())
    acc_fb = sum(d.domain == router.domains[y] for d, y in zip(decisions, labels)) / len(texts)
    nc = float(((q @ router.dense._prototype_matrix().T).argmax(-1) == torch.tensor(labels)).float().mean())
    control = router.route(list(AUDIT_CONTROL))
    size = sum(p.stat().st_size for p in reg.router_path(reg.get_router(ws.router_kind)).iterdir())
    return {"route_ms_per_query": per_query_ms, "accuracy": acc, "accuracy_with_fallback": acc_fb,
            "nearest_centroid_accuracy": nc, "eval_rows": len(texts),
            "control_to_base": sum(d.domain is None for d in control) / len(control), "n_control": len(control),
            "router_bytes": size, "threshold": router.threshold}


def registry_figures(ws, some: str, runs: int = 15) -> dict:
    from plait.cli import main

    w = ["--workspace", str(ws.path)]

    def body(*args):
        def run():
            with redirect_stdout(io.StringIO()):
                assert main([*args, *w]) == 0
        return run
    return {"list_ms": median_ms(body("registry", "list", "--json"), runs),
            "show_ms": median_ms(body("registry", "show", f"{some}:1", "--json"), runs)}


def _tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer the engine's model holds (the base's, and every loaded
    adapter's stacked tensors). An in-process RSS delta would not show them: the audit before has
    just freed far more than they take, and the allocator reuses it."""
    import itertools

    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def engine_memory(ws, limit: int = 32) -> dict:
    """Every domain's version loaded through `RoutedModel.ensure_adapter`, once with no limit (all
    resident) and once with `--max-adapters limit`: adapters resident, evictions, and the bytes of
    adapter tensors the engine holds (its model's tensors minus the base's)."""
    from plait.service import RoutedModel

    refs = [v.ref for v in ws.registry.search_versions()]
    out = {}
    for label, cap in (("all", len(refs)), (f"max{limit}", limit)):
        rm = RoutedModel(ws, max_adapters=cap)
        base = _tensor_bytes(rm.engine.model)
        for ref in refs:
            rm.ensure_adapter(ref)
        stats = rm.residency_stats()
        out[label] = {"resident": stats["resident"], "evictions": stats["evictions"],
                      "adapter_tensor_mb": round((_tensor_bytes(rm.engine.model) - base) / 2**20, 3)}
        del rm
    return {"engine_memory": out, "engine_versions": len(refs)}


def adapter_bytes(lora: Path) -> int:
    return sum(p.stat().st_size for p in lora.iterdir() if p.suffix == ".safetensors")


def smollm2_lora_bytes(r: int = 8) -> int:
    """fp32 bytes of a LoRA r on q_proj and v_proj of SmolLM2-135M (30 layers, 576 wide, kv 192)."""
    return 30 * r * ((576 + 576) + (576 + 192)) * 4


def run_size(n: int, root: Path, loras: list[Path], base: Path, profile_dir: Path | None,
             build_only: bool = False) -> dict | None:
    doms = domains(n + 1)
    ws = build(root, n, doms, loras, base)
    if build_only:
        return None
    have = len(ws.registry.search_domains())  # n - 1; more when measured runs already added domains
    if have >= len(doms):
        doms = domains(have + 1)
    last = list(doms)[have]
    profile = profile_dir / f"add-domain-{n}.prof" if profile_dir else None
    update_s, audit_s, audit, calls = add_one(ws, last, doms[last], loras[(n - 1) % len(loras)], profile)
    print(f"[{n}] router update {update_s:.2f} s, audit {audit_s:.2f} s, engine calls {calls}", flush=True)
    out = {"domains": have + 1, "router_update_s": update_s, "audit_s": audit_s, "add_domain_s": update_s + audit_s,
           "audit_engine_calls": calls["calls"], "audit_engine_rows": calls["rows"], "audit_passed": audit.passed,
           **routing_figures(ws, doms), **registry_figures(ws, list(doms)[0]), **engine_memory(ws),
           "adapter_bytes": adapter_bytes(loras[0]), "smollm2_lora_r8_bytes": smollm2_lora_bytes()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,100", help="comma-separated domain counts")
    ap.add_argument("--profile", type=Path, help="write a cProfile of each timed add-domain here")
    ap.add_argument("--json", type=Path, help="append the results here")
    ap.add_argument("--keep", type=Path, help="build the workspaces here (kept) instead of a temp folder")
    ap.add_argument("--pin", action="store_true", help="write bench/scale_domains.txt from this Python")
    ap.add_argument("--build-only", action="store_true",
                    help="only build the workspaces into --keep (a later run with the same --keep measures them)")
    args = ap.parse_args()
    if args.pin:
        return write_pins()
    from tests.tiny import make_peft_lora, make_tiny_base

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as d:
        root = args.keep or Path(d)
        root.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PLAIT_CACHE", str(root / "cache"))
        base = root / "base" if (root / "base" / "config.json").is_file() else make_tiny_base(root / "base")
        loras = [root / f"lora-{i}" if (root / f"lora-{i}" / "adapter_config.json").is_file()
                 else make_peft_lora(base, root / f"lora-{i}", seed=100 + i) for i in range(N_LORAS)]
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        results = [run_size(int(n), root, loras, base, args.profile, args.build_only) for n in args.sizes.split(",")]
        if args.build_only:
            return
    print(f"\n{'domains':>8} {'update s':>9} {'audit s':>8} {'route ms/q':>11} {'acc':>6} {'centroid':>9} "
          f"{'ctrl->base':>10} {'router MB':>10} {'list ms':>8} {'show ms':>8}")
    for r in results:
        print(f"{r['domains']:>8} {r['router_update_s']:>9.2f} {r['audit_s']:>8.2f} {r['route_ms_per_query']:>11.2f} "
              f"{r['accuracy']:>6.1%} {r['nearest_centroid_accuracy']:>9.1%} {r['control_to_base']:>10.0%} "
              f"{r['router_bytes'] / 2**20:>10.2f} {r['list_ms']:>8.1f} {r['show_ms']:>8.1f}")
        m = r["engine_memory"]
        print(f"{'':>8} engine: {m['all']['resident']} adapters resident, {m['all']['adapter_tensor_mb']} MB of "
              f"adapter tensors; --max-adapters 32: {m['max32']['resident']} resident, {m['max32']['evictions']} "
              f"evictions, {m['max32']['adapter_tensor_mb']} MB")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"command": " ".join(sys.argv), "results": results}) + "\n")


if __name__ == "__main__":
    main()
