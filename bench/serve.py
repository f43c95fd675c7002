"""Benchmark: `plait serve` (continuous or static batching) vs the same requests one at a time.

Setup: a temporary workspace on SmolLM2-135M (`smollm2`) with 8 random LoRA adapters (r=8,
alpha 16, q_proj/v_proj, random A and B, made by `bench.mixed_batch.make_adapters`) imported
with `Registry.import_peft`. The server runs as its own process (`plait serve`, loopback
only, default batching settings unless given) so the clients do not share its interpreter;
with `--scheduler continuous static` one server of each kind runs in turn on the same workspace.

Workload: a fixed list of requests, round-robin over the 8 adapters and `base` (mixed
adapters in every batch), 3 in 4 completions and 1 in 4 chat, greedy. Two named profiles:

  fixed   `max_tokens` --max-tokens (16) for every request (issue 8's profile)
  mixed   `max_tokens` drawn uniformly from 8-128 per request, seeded (the same list every run)

Rows may stop early at eos (`--ignore-eos` is not an OpenAI parameter); tokens/s counts the
tokens actually returned.

  one at a time     one client, each request after the previous answer (fixed profile)
  N clients         N client threads (closed loop), each sending its share of the list

Reported: requests/s, generated tokens/s, p50/p99 latency per request, failed requests, the
mean batch, and the ratio to one-at-a-time throughput. Targets: >= 3x one at a time at 16
clients on `fixed` with zero failures; continuous vs static at 16 clients on `mixed`:
tokens/s >= 1.2x and p50 latency <= 0.7x. Every client uses the official `openai` client
against http://127.0.0.1:PORT/v1.

With `--api-key KEY` the server requires the key (passed to it as PLAIT_API_KEY, so it is not on
its command line) and every client sends it as the openai client's `api_key`: run once with and
once without to see what authentication costs.

Run it alone on the machine (2 shared cores: numbers next to another heavy job are meaningless):

    flock /tmp/plait-cpu.lock env PYTHONPATH=$PWD .venv/bin/python bench/serve.py \
        --scheduler continuous static --profiles fixed mixed --clients 16 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

N_ADAPTERS = 8
PROMPTS = [
    "The history of the printing press",
    "Explain how a bicycle stays upright",
    "Write a short note to a colleague about the meeting",
    "What is the capital of France and why is it famous",
    "List three uses of copper",
    "Describe the water cycle in simple words",
    "Give a tip for learning a new language",
    "Summarise the rules of chess in one sentence",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_workspace(root: Path, base_model: str = "smollm2") -> list[str]:
    """A workspace on `base_model` with 8 imported random LoRA adapters; returns their refs."""
    from bench.mixed_batch import make_adapters
    from plait.workspace import Workspace
    from training.base import load_base

    ws = Workspace.init(root / "ws", base_model=base_model, tracking_uri="none")
    base = load_base(base_model)
    folders = make_adapters(base.model, root / "adapters", N_ADAPTERS)
    del base
    refs = []
    for i, f in enumerate(folders):
        info = ws.registry.import_peft(f, name=f"a{i}", domain=f"d{i}", base_fingerprint=ws.base_fingerprint)
        refs.append(info.ref)
    return refs


PROFILES = ("fixed", "mixed")
"""Named workloads: `fixed` = every request max_tokens --max-tokens (issue 8's profile);
`mixed` = max_tokens drawn uniformly from 8-128 per request (seeded: the same list every run)."""
MIXED_SEED = 16
MIXED_RANGE = (8, 128)


def requests_list(refs: list[str], n: int, profile: str = "fixed", max_tokens: int = 16) -> list[dict]:
    """The first `n` requests of a profile: round-robin over the adapters and base, 1 in 4 chat."""
    import random

    rng = random.Random(MIXED_SEED)
    models = refs + ["base"]
    out = []
    for i in range(n):
        n_tok = rng.randint(*MIXED_RANGE) if profile == "mixed" else max_tokens
        out.append({"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)] + f" (#{i})",
                    "chat": i % 4 == 3, "max_tokens": n_tok})
    return out


def send(client, req: dict) -> tuple[float, int, bool]:
    """One request; returns (latency s, completion tokens, ok)."""
    t = time.perf_counter()
    try:
        if req["chat"]:
            r = client.chat.completions.create(model=req["model"], messages=[{"role": "user", "content": req["prompt"]}],
                                               max_tokens=req["max_tokens"], temperature=0)
        else:
            r = client.completions.create(model=req["model"], prompt=req["prompt"], max_tokens=req["max_tokens"],
                                          temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens, True
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
        return time.perf_counter() - t, 0, False


def run_mode(url: str, reqs: list[dict], clients: int, api_key: str | None = None) -> dict:
    import openai

    pool_clients = [openai.OpenAI(base_url=url, api_key=api_key or "unused", max_retries=0, timeout=600)
                    for _ in range(clients)]
    shares = [reqs[i::clients] for i in range(clients)]

    def worker(i: int) -> list[tuple[float, int, bool]]:
        return [send(pool_clients[i], r) for r in shares[i]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ok = [r for r in results if r[2]]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "req_s": len(ok) / wall, "tok_s": sum(r[1] for r in ok) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]}


def start_server(ws: Path, args, scheduler: str) -> tuple[subprocess.Popen, int]:
    """`plait serve` as its own process (own session, stopped with its group); waits for /health."""
    import requests

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd(), TOKENIZERS_PARALLELISM="false")
    env.pop("PLAIT_API_KEY", None)
    if args.api_key:
        env["PLAIT_API_KEY"] = args.api_key
    cmd = [sys.executable, "-m", "plait.cli", "serve", "--workspace", str(ws), "--host", "127.0.0.1", "--port",
           str(port), "--scheduler", scheduler, "--max-batch", str(args.max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc, port
        except requests.ConnectionError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, 15)
            raise SystemExit("the server did not start")
        time.sleep(0.5)


def measure(port: int, refs: list[str], args, scheduler: str) -> list[dict]:
    """One-at-a-time on the fixed profile, then every (profile, clients) run, on one server."""
    import requests

    url = f"http://127.0.0.1:{port}/v1"
    health = f"http://127.0.0.1:{port}/health"
    run_mode(url, requests_list(refs, len(refs) + 3, max_tokens=2), 1, args.api_key)  # warm-up, not timed
    seq = run_mode(url, requests_list(refs, args.sequential_requests, max_tokens=args.max_tokens), 1, args.api_key)
    rows = [dict(seq, mode="one at a time", profile="fixed", scheduler=scheduler, vs_seq=1.0)]
    print(f"[{scheduler}] one at a time: {seq['req_s']:.2f} req/s", flush=True)
    for profile in args.profiles:
        for n in args.clients:
            before = requests.get(health).json()["stats"]
            row = dict(run_mode(url, requests_list(refs, args.requests, profile, args.max_tokens), n, args.api_key),
                       mode=f"{n} concurrent clients", profile=profile, scheduler=scheduler)
            after = requests.get(health).json()["stats"]
            d = {k: after[k] - before[k] for k in ("batches", "rows", "decode_steps", "decode_s", "resolve_s")}
            if "row_steps" in after:  # continuous: the mean running batch over decode steps
                row["mean_batch_rows"] = (after["row_steps"] - before["row_steps"]) / max(d["decode_steps"], 1)
            else:
                row["mean_batch_rows"] = d["rows"] / max(d["batches"], 1)
            row["vs_seq"] = row["req_s"] / seq["req_s"] if profile == "fixed" else None
            rows.append(row)
            print(f"[{scheduler}] {profile}, {n} clients: {row['req_s']:.2f} req/s, {row['tok_s']:.1f} tok/s, "
                  f"p50 {row['p50_s']:.2f} s, server decode {d['decode_s']:.1f} s over {d['decode_steps']} steps",
                  flush=True)
    return rows


def report(rows: list[dict], args) -> None:
    """The markdown table and the targets (3x over one at a time; continuous vs static on mixed)."""
    print()
    print(f"{'SmolLM2-135M' if args.base == 'smollm2' else args.base} fp32 on CPU ({os.cpu_count()} cores), "
          f"{N_ADAPTERS} LoRA adapters r=8 + base, requests 3/4 completions 1/4 chat, greedy; profiles: fixed = "
          f"max_tokens {args.max_tokens}, mixed = max_tokens uniform {MIXED_RANGE[0]}-{MIXED_RANGE[1]} (seed "
          f"{MIXED_SEED}); --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}, "
          f"{'API key required' if args.api_key else 'no API key'}")
    print()
    print("| scheduler | profile | mode | requests | failed | req/s | tokens/s | p50 latency | p99 latency | mean batch "
          "| vs one at a time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mb = f"{r['mean_batch_rows']:.1f}" if "mean_batch_rows" in r else "1"
        vs = f"{r['vs_seq']:.2f}x" if r["vs_seq"] is not None else "-"
        print(f"| {r['scheduler']} | {r['profile']} | {r['mode']} | {r['requests']} | {r['failed']} | {r['req_s']:.2f} "
              f"| {r['tok_s']:.1f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {mb} | {vs} |")
    print()
    pick = {(r["scheduler"], r["profile"], r["clients"]): r for r in rows if r["clients"] > 1}
    for sched in args.schedulers:
        at16 = pick.get((sched, "fixed", 16))
        if at16 is not None:
            met = at16["vs_seq"] >= 3 and at16["failed"] == 0
            print(f"target [{sched}]: >= 3x one-at-a-time at 16 clients on fixed, 0 failed: {at16['vs_seq']:.2f}x, "
                  f"{at16['failed']} failed -> {'met' if met else 'NOT met'}")
    c, s = pick.get(("continuous", "mixed", 16)), pick.get(("static", "mixed", 16))
    if c is not None and s is not None:
        tp, p50 = c["tok_s"] / s["tok_s"], c["p50_s"] / s["p50_s"]
        print(f"target: continuous vs static at 16 clients on mixed: throughput {tp:.2f}x (>= 1.2x), p50 latency "
              f"{p50:.2f}x (<= 0.7x), failed {c['failed'] + s['failed']} -> "
              f"{'met' if tp >= 1.2 and p50 <= 0.7 and c['failed'] + s['failed'] == 0 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrent run")
    ap.add_argument("--sequential-requests", type=int, default=32, help="requests in the one-at-a-time run")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the fixed profile")
    ap.add_argument("--profiles", nargs="+", choices=PROFILES, default=["fixed"], help="workloads to run")
    ap.add_argument("--scheduler", dest="schedulers", nargs="+", choices=("continuous", "static"),
                    default=["continuous"], help="server scheduler(s): one server each, in this order")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--base", default="smollm2", help="base model (a small local one checks the plumbing)")
    ap.add_argument("--api-key", help="serve with this API key (clients send it); default: no key")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1024 or not 1 <= args.sequential_requests <= 256 or max(args.clients) > 64:
        ap.error("keep it bounded: --requests <= 1024, --sequential-requests <= 256, --clients <= 64")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-serve-") as tmp:
        t0 = time.perf_counter()
        refs = build_workspace(Path(tmp), args.base)
        print(f"setup: {time.perf_counter() - t0:.1f} s (workspace, {len(refs)} adapters)", flush=True)
        for scheduler in args.schedulers:
            proc, port = start_server(Path(tmp) / "ws", args, scheduler)
            try:
                rows += measure(port, refs, args, scheduler)
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
    report(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
