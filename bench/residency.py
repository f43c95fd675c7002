"""Benchmark: `plait serve --max-adapters 32` with 256 adapters requested by Zipf(1.0) popularity.

Setup: a temporary workspace on SmolLM2-135M (`smollm2`) with 256 random LoRA adapters (r=8,
alpha 16, q_proj/v_proj, made by `bench.mixed_batch.make_adapters`), each imported with
`Registry.import_peft` as its own registered version (so every load from the registry is
hash-checked, as in production). Each server runs as its own process (`plait serve`, loopback
only), started afresh for each load so its peak RSS is its own.

Loads (the same requests otherwise: 16 client threads, greedy, max_tokens 16, 3 in 4
completions and 1 in 4 chat, prompts from `bench.serve`):

  one adapter          every request names a0 (--max-adapters 32)
  zipf 256 / 32 slots  request i names adapter a_k with P(k) proportional to 1/k, k = 1..256
                       (seeded), --max-adapters 32: misses load from the registry, the least
                       recently used idle adapter is evicted
  32 resident          --max-adapters 32 --preload a0..a31, requests by Zipf(1.0) over those 32
                       only: the same 32 adapters resident, nothing ever evicted

Each server is warmed with 16 requests of its own load (not timed); then the peak-RSS mark is
reset (`/proc/PID/clear_refs` = 5) and the timed requests run. Reported per load: requests/s,
tokens/s, p50/p99 latency, failed requests, the residency counters of the timed window
(`/health` -> residency: hits, misses, loads, evictions, load seconds), and the server's peak
RSS while serving (VmHWM after the reset) and at the end (VmRSS).

Targets (issue 16): zipf throughput >= 0.7x one adapter; zipf peak RSS <= 1.2x the 32-resident
server's; 0 failed requests.

Run it alone on the machine (2 shared cores):

    flock /tmp/plait-cpu.lock env PYTHONPATH=$PWD .venv/bin/python bench/residency.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.serve import PROMPTS, free_port, run_mode

N_ADAPTERS = 256
SLOTS = 32
WARM_REQUESTS = 16


def build_workspace(root: Path, n: int, base_model: str = "smollm2") -> list[str]:
    """A workspace with `n` imported random LoRA adapters a0..a{n-1}; returns their refs."""
    from bench.mixed_batch import make_adapters
    from plait.workspace import Workspace
    from training.base import load_base

    ws = Workspace.init(root / "ws", base_model=base_model, tracking_uri="none")
    base = load_base(base_model)
    folders = make_adapters(base.model, root / "adapters", n)
    del base
    return [ws.registry.import_peft(f, name=f"a{i}", domain=f"d{i}", base_fingerprint=ws.base_fingerprint).ref
            for i, f in enumerate(folders)]


def zipf_models(n_adapters: int, n: int, seed: int) -> list[str]:
    """`n` adapter names drawn with P(a_{k-1}) proportional to 1/k (Zipf, exponent 1.0)."""
    rng = random.Random(seed)
    weights = [1.0 / k for k in range(1, n_adapters + 1)]
    return [f"a{i}" for i in rng.choices(range(n_adapters), weights=weights, k=n)]


def requests_for(models: list[str], offset: int = 0) -> list[dict]:
    return [{"model": m, "prompt": PROMPTS[(i + offset) % len(PROMPTS)] + f" (#{i + offset})",
             "chat": (i + offset) % 4 == 3} for i, m in enumerate(models)]


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of process `pid` in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) // 1024
    return out


class Server:
    """`plait serve` in its own process group on a free loopback port."""

    def __init__(self, ws: Path, extra: list[str]):
        import requests

        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=os.getcwd(), TOKENIZERS_PARALLELISM="false")
        env.pop("PLAIT_API_KEY", None)
        cmd = [sys.executable, "-m", "plait.cli", "serve", "--workspace", str(ws), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 240
        while True:
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit("the server did not start")
            time.sleep(0.5)

    def residency(self) -> dict:
        import requests

        return requests.get(self.url + "/health", timeout=10).json()["residency"]

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=30)


def run_load(ws: Path, name: str, extra: list[str], models: list[str], warm: list[str], args) -> dict:
    t0 = time.perf_counter()
    server = Server(ws, extra)
    try:
        start_peak = proc_status(server.proc.pid)["VmHWM"]
        run_mode(server.url + "/v1", requests_for(warm, 10_000), args.clients, args.max_tokens)
        server.reset_peak()
        before = server.residency()
        row = run_mode(server.url + "/v1", requests_for(models), args.clients, args.max_tokens)
        after = server.residency()
        mem = proc_status(server.proc.pid)
    finally:
        server.stop()
    delta = {k: after[k] - before[k] for k in ("hits", "misses", "loads", "evictions", "load_seconds")}
    row.update(load=name, distinct=len(set(models)), startup_peak_mib=start_peak, serving_peak_mib=mem["VmHWM"],
               end_rss_mib=mem["VmRSS"], resident=after["resident"], max_adapters=after["max_adapters"], **delta)
    print(f"{name}: {row['req_s']:.2f} req/s, {row['failed']} failed, {delta['misses']} misses, "
          f"{delta['evictions']} evictions, load {delta['load_seconds']:.2f} s, peak {mem['VmHWM']} MiB "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160, help="timed requests per load")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=N_ADAPTERS)
    ap.add_argument("--slots", type=int, default=SLOTS, help="--max-adapters of the zipf and resident servers")
    ap.add_argument("--base", default="smollm2", help="base model (a small local one checks the plumbing)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1024 or not 1 <= args.clients <= 64 or not 1 <= args.slots <= args.adapters <= 1024:
        ap.error("keep it bounded: --requests <= 1024, --clients <= 64, 1 <= --slots <= --adapters <= 1024")

    with tempfile.TemporaryDirectory(prefix="plait-bench-residency-") as tmp:
        t0 = time.perf_counter()
        build_workspace(Path(tmp), args.adapters, args.base)
        ws = Path(tmp) / "ws"
        print(f"setup: {time.perf_counter() - t0:.1f} s ({args.adapters} adapters registered)", flush=True)
        slots = ["--max-adapters", str(args.slots)]
        zipf = zipf_models(args.adapters, args.requests, seed=1)
        resident = zipf_models(args.slots, args.requests, seed=1)
        rows = [
            run_load(ws, "one adapter", slots, ["a0"] * args.requests, ["a0"] * WARM_REQUESTS, args),
            run_load(ws, f"zipf {args.adapters} / {args.slots} slots", slots, zipf,
                     zipf_models(args.adapters, WARM_REQUESTS, seed=2), args),
            run_load(ws, f"{args.slots} resident, no eviction",
                     [*slots, "--preload", ",".join(f"a{i}" for i in range(args.slots))], resident,
                     zipf_models(args.slots, WARM_REQUESTS, seed=2), args),
        ]

    one, zipf_row, res = rows
    print()
    print(f"{'SmolLM2-135M' if args.base == 'smollm2' else args.base} fp32 on CPU ({os.cpu_count()} cores), "
          f"{args.adapters} LoRA adapters r=8 registered, {args.clients} clients, {args.requests} timed requests "
          f"per load, greedy, max_tokens {args.max_tokens}, 3/4 completions 1/4 chat")
    print()
    print("| load | distinct adapters | failed | req/s | tokens/s | p50 | p99 | hits | misses | evictions | "
          "load s | peak RSS serving | vs one adapter |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['load']} | {r['distinct']} | {r['failed']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['hits']} | {r['misses']} | {r['evictions']} | "
              f"{r['load_seconds']:.2f} | {r['serving_peak_mib']} MiB | {r['req_s'] / one['req_s']:.2f}x |")
    ratio = zipf_row["req_s"] / one["req_s"]
    rss = zipf_row["serving_peak_mib"] / res["serving_peak_mib"]
    failed = sum(r["failed"] for r in rows)
    print()
    print(f"targets: throughput {ratio:.2f}x one adapter (>= 0.7x: {'met' if ratio >= 0.7 else 'NOT met'}); "
          f"peak RSS {rss:.2f}x the {args.slots}-resident server (<= 1.2x: {'met' if rss <= 1.2 else 'NOT met'}); "
          f"{failed} failed requests (0: {'met' if failed == 0 else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
