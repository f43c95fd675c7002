"""Benchmark: `plait serve` with dynamic batching vs the same requests sent one at a time.

Setup: a temporary workspace on SmolLM2-135M (`smollm2`) with 8 random LoRA adapters (r=8,
alpha 16, q_proj/v_proj, random A and B, made by `bench.mixed_batch.make_adapters`) imported
with `Registry.import_peft`. The server runs as its own process (`plait serve`, loopback
only, default batching settings unless given) so the clients do not share its interpreter.

Workload: a fixed list of requests, round-robin over the 8 adapters and `base` (mixed
adapters in every batch), 3 in 4 completions and 1 in 4 chat, greedy, `max_tokens` 16 (the
server decodes every row to its limit: `--ignore-eos` is not an OpenAI parameter, so a few
rows may stop early at eos; tokens/s counts the tokens actually returned).

  one at a time     one client, each request after the previous answer
  N clients         N client threads (closed loop), each sending its share of the list

Reported: requests/s, generated tokens/s, p50/p99 latency per request, failed requests, and
the ratio to one-at-a-time throughput; target >= 3x at 16 clients with zero failures. Every
client uses the official `openai` client against http://127.0.0.1:PORT/v1.

With `--api-key KEY` the server requires the key (passed to it as PLAIT_API_KEY, so it is not on
its command line) and every client sends it as the openai client's `api_key`: run once with and
once without to see what authentication costs.

Run it alone on the machine (2 shared cores: numbers next to another heavy job are meaningless):

    flock /tmp/plait-cpu.lock env PYTHONPATH=$PWD .venv/bin/python bench/serve.py [--api-key KEY]
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


def requests_list(refs: list[str], n: int) -> list[dict]:
    models = refs + ["base"]
    out = []
    for i in range(n):
        out.append({"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)] + f" (#{i})",
                    "chat": i % 4 == 3})
    return out


def send(client, req: dict, max_tokens: int) -> tuple[float, int, bool]:
    """One request; returns (latency s, completion tokens, ok)."""
    t = time.perf_counter()
    try:
        if req["chat"]:
            r = client.chat.completions.create(model=req["model"], messages=[{"role": "user", "content": req["prompt"]}],
                                               max_tokens=max_tokens, temperature=0)
        else:
            r = client.completions.create(model=req["model"], prompt=req["prompt"], max_tokens=max_tokens,
                                          temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens, True
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
        return time.perf_counter() - t, 0, False


def run_mode(url: str, reqs: list[dict], clients: int, max_tokens: int, api_key: str | None = None) -> dict:
    import openai

    pool_clients = [openai.OpenAI(base_url=url, api_key=api_key or "unused", max_retries=0, timeout=600)
                    for _ in range(clients)]
    shares = [reqs[i::clients] for i in range(clients)]

    def worker(i: int) -> list[tuple[float, int, bool]]:
        return [send(pool_clients[i], r, max_tokens) for r in shares[i]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ok = [r for r in results if r[2]]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
            "req_s": len(ok) / wall, "tok_s": sum(r[1] for r in ok) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrent run")
    ap.add_argument("--sequential-requests", type=int, default=32, help="requests in the one-at-a-time run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--base", default="smollm2", help="base model (a small local one checks the plumbing)")
    ap.add_argument("--api-key", help="serve with this API key (clients send it); default: no key")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1024 or not 1 <= args.sequential_requests <= 256 or max(args.clients) > 64:
        ap.error("keep it bounded: --requests <= 1024, --sequential-requests <= 256, --clients <= 64")

    with tempfile.TemporaryDirectory(prefix="plait-bench-serve-") as tmp:
        t0 = time.perf_counter()
        refs = build_workspace(Path(tmp), args.base)
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.getcwd(), TOKENIZERS_PARALLELISM="false")
        env.pop("PLAIT_API_KEY", None)
        if args.api_key:
            env["PLAIT_API_KEY"] = args.api_key
        cmd = [sys.executable, "-m", "plait.cli", "serve", "--workspace", str(Path(tmp) / "ws"), "--host",
               "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
               str(args.max_wait_ms), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            import requests

            deadline = time.time() + 180
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            # warm-up: load every adapter and run each path once (not timed)
            run_mode(url, requests_list(refs, len(refs) + 3), 1, 2, args.api_key)
            print(f"setup: {time.perf_counter() - t0:.1f} s (workspace, {len(refs)} adapters, server up, warm)",
                  flush=True)
            seq = run_mode(url, requests_list(refs, args.sequential_requests), 1, args.max_tokens, args.api_key)
            rows = [dict(seq, mode="one at a time")]
            print(f"one at a time: {rows[0]['req_s']:.2f} req/s", flush=True)
            for n in args.clients:
                before = requests.get(f"http://127.0.0.1:{port}/health").json()["stats"]
                row = dict(run_mode(url, requests_list(refs, args.requests), n, args.max_tokens, args.api_key),
                           mode=f"{n} concurrent clients")
                after = requests.get(f"http://127.0.0.1:{port}/health").json()["stats"]
                batches = after["batches"] - before["batches"]
                row["mean_batch_rows"] = (after["rows"] - before["rows"]) / max(batches, 1)
                row["server_resolve_s"] = after["resolve_s"] - before["resolve_s"]
                row["server_decode_s"] = after["decode_s"] - before["decode_s"]
                rows.append(row)
                print(f"{n} clients: {row['req_s']:.2f} req/s, {batches} batches, server: resolve "
                      f"{row['server_resolve_s']:.2f} s, decode {row['server_decode_s']:.2f} s, wall {row['wall_s']:.2f} s",
                      flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)

    seq = rows[0]
    print()
    print(f"{'SmolLM2-135M' if args.base == 'smollm2' else args.base} fp32 on CPU ({os.cpu_count()} cores), {N_ADAPTERS} LoRA adapters r=8 + base, "
          f"mixed requests (3/4 completions, 1/4 chat), greedy, max_tokens {args.max_tokens}, "
          f"--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}, "
          f"{'API key required' if args.api_key else 'no API key'}")
    print()
    print("| mode | requests | failed | req/s | tokens/s | p50 latency | p99 latency | mean batch | vs one at a time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mb = f"{r['mean_batch_rows']:.1f}" if "mean_batch_rows" in r else "1"
        print(f"| {r['mode']} | {r['requests']} | {r['failed']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {mb} | {r['req_s'] / seq['req_s']:.2f}x |")
    at16 = next((r for r in rows if r["clients"] == 16), None)
    if at16 is not None:
        ratio = at16["req_s"] / seq["req_s"]
        met = ratio >= 3 and at16["failed"] == 0 and seq["failed"] == 0
        print()
        print(f"target: >= 3x one-at-a-time throughput at 16 clients, zero failures: {ratio:.2f}x, "
              f"{at16['failed']} failed -> {'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
