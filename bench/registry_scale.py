"""Registry latency at scale: `plait registry list` / `show` / resolve with 10,000 versions.

    python bench/registry_scale.py [--versions 10000] [--adapters 500] [--postgres URL]

Fills a fresh workspace registry with N versions across A adapters (rows inserted in bulk;
they share a few real artifacts, since only reads are timed), then measures:
  * the command body of `plait registry list --json`, `list` (rich table), `show NAME:V --json`
    and `Registry.get_version` (resolve), in-process, median and p99 over repeated runs,
    each run opening the workspace afresh like a CLI process does;
  * the whole CLI process (`plait registry show ...`) and the bare interpreter start-up
    (`python -c pass`) and `import plait.cli`, so the start-up share is visible;
  * registrations per second with 8 writer processes (real artifacts, real commits).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out), pct(out, 0.99)


def fill(reg, n_versions, n_adapters):
    from sqlalchemy import insert

    from registry.models import Adapter, AdapterVersion, Domain, Lineage

    art = reg.store.put({"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"})
    with reg.engine.begin() as conn:
        conn.execute(insert(Domain), [{"name": f"domain-{d}", "position": d + 1, "description": ""} for d in range(10)])
        ids = {r.name: r.id for r in conn.execute(Domain.__table__.select())}
        conn.execute(insert(Adapter), [{"name": f"adapter-{a:04d}", "domain_id": ids[f"domain-{a % 10}"], "kind": "lora"}
                                       for a in range(n_adapters)])
        aids = [r.id for r in conn.execute(Adapter.__table__.select().order_by(Adapter.id))]
        per = n_versions // n_adapters
        rows = [{"adapter_id": aid, "version": v + 1, "base_fingerprint": "sha256:base", "config_json": "{}",
                 "sha256": art.sha256, "size_bytes": art.size_bytes, "location": art.location, "status": "ready",
                 "description": ""} for aid in aids for v in range(per)]
        conn.execute(insert(AdapterVersion), rows)
        vids = [r.id for r in conn.execute(AdapterVersion.__table__.select())]
        conn.execute(insert(Lineage), [{"child_id": v, "parent_base": "sha256:base", "relation": "trained-from-base"}
                                       for v in vids])
    return per


def writers_per_second(url, root, n_procs=8, per_proc=25):
    script = Path(__file__).resolve().parents[1] / "tests" / "test_registry_concurrency.py"
    ns: dict = {}
    exec(compile(script.read_text().split("def run_writers")[0], str(script), "exec"), ns)  # the WRITER script
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", ns["WRITER"], url, str(root), str(w), str(per_proc)], env=env)
             for w in range(n_procs)]
    assert all(p.wait() == 0 for p in procs)
    return n_procs * per_proc / (time.perf_counter() - t)


def bench_backend(label, db_url, tmp, n_versions, n_adapters, runs):
    from plait.cli import main
    from plait.workspace import Workspace

    ws = Workspace.init(tmp / label, base_model=str(tmp), db_url=db_url, tracking_uri="none")
    per = fill(ws.registry, n_versions, n_adapters)
    w = ["--workspace", str(ws.path)]
    mid = f"adapter-{n_adapters // 2:04d}:{per // 2 + 1}"

    def body(*args):
        def run():
            with redirect_stdout(io.StringIO()):
                assert main([*args, *w]) == 0
        return run

    rows = {
        "registry list --json": timed(body("registry", "list", "--json"), runs),
        "registry list (table)": timed(body("registry", "list"), runs),
        f"registry show {mid} --json": timed(body("registry", "show", mid, "--json"), runs),
        "resolve (Registry.get_version)": timed(lambda: Workspace(ws.path).registry.get_version(mid), runs),
    }
    exe = Path(sys.executable).with_name("plait")
    proc = timed(lambda: subprocess.run([str(exe), "registry", "show", mid, "--json", *w], check=True,
                                        capture_output=True), max(3, runs // 4))
    rate = writers_per_second(db_url if "postgres" in db_url else f"sqlite:///{tmp / (label + '-w.db')}",
                              tmp / f"{label}-w-art")
    return rows, proc, rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--postgres", default=os.environ.get("PLAIT_TEST_POSTGRES_URL"),
                    help="SQLAlchemy URL of a PostgreSQL database to bench too (its tables are created there)")
    args = ap.parse_args()
    start = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 10)
    imp = timed(lambda: subprocess.run([sys.executable, "-c", "import plait.cli"], check=True), 5)
    print(f"python start-up: median {start[0]:.0f} ms; python + import plait.cli: median {imp[0]:.0f} ms")
    backends = [("sqlite", None)] + ([("postgres", args.postgres)] if args.postgres else [])
    results = {}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        (tmp / "config.json").write_text("{}")
        for label, url in backends:
            if label == "postgres":
                from sqlalchemy import create_engine, text

                admin = create_engine(url, isolation_level="AUTOCOMMIT")
                with admin.connect() as c:
                    c.execute(text("DROP DATABASE IF EXISTS plait_bench WITH (FORCE)"))
                    c.execute(text("CREATE DATABASE plait_bench"))
                url = url.rsplit("/", 1)[0] + "/plait_bench"
            results[label] = bench_backend(label, url or f"sqlite:///{tmp / 'bench.db'}", tmp, args.versions,
                                           args.adapters, args.runs)
    print(f"\n{args.versions:,} versions across {args.adapters} adapters; command body in-process "
          f"(opening the workspace each run), {args.runs} runs")
    print(f"{'command':<40}" + "".join(f"{b + ' median':>16}{b + ' p99':>14}" for b in results))
    for key in next(iter(results.values()))[0]:
        print(f"{key:<40}" + "".join(f"{r[0][key][0]:>13.1f} ms{r[0][key][1]:>11.1f} ms" for r in results.values()))
    for b, (_, proc, rate) in results.items():
        print(f"[{b}] whole `plait registry show` process: median {proc[0]:.0f} ms (python start-up {start[0]:.0f} ms); "
              f"8 writers: {rate:.0f} registrations/s")
    print(json.dumps({b: {"rows": r[0], "process_ms": r[1], "registrations_per_s": r[2]} for b, r in results.items()}))


if __name__ == "__main__":
    main()
