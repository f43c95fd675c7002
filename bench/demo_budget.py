"""The demo's training budget on this machine: how long `plait demo`'s training steps alone take.

    flock /tmp/plait-cpu.lock python bench/demo_budget.py [--steps 6]

`plait demo` (issue 13) trains every domain's own adapter, then the final audit trains two
baselines: the sequential chain (one LoRA through every domain, each domain's steps) and the
joint LoRA (as many steps as the chain in all). So its optimizer steps are three times the
domains' own; nothing about plait decides that, the baselines' definition does. This script
prices those steps: for each adapter kind the demo trains (bottleneck for python-code, LoRA and
QLoRA for the news domains, LoRA for both baselines) it runs the trainer's own step loop
(`training.trainer.train_steps`, at the precision `--dtype auto` picks here) on the demo's rows
with the demo's batch and length, `--steps` timed steps after one warm-up step, and multiplies
the median seconds per step by the steps the demo gives that kind. It prints the sum beside the
8 minutes issue 13 allows for the whole demo: a floor under the demo's time on this machine
before any evaluation, router update or model load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 8 * 60


def demo_steps(settings) -> dict[str, int]:
    """Optimizer steps of a demo run per adapter kind: the domains' own, then the two trained baselines."""
    from plait.demo import CODE_DOMAIN, KINDS

    steps = {kind: 0 for kind in ("bottleneck", "lora", "qlora")}
    chain = 0
    for d in settings.domains:
        n = settings.code_steps if d == CODE_DOMAIN and settings.code_steps else settings.steps
        steps[KINDS[d]] += n
        chain += n
    steps["lora (sequential baseline)"] = chain
    steps["lora (joint baseline)"] = chain  # the chain's total steps and batch size
    return steps


def step_seconds(kind_name: str, rows, settings, n_steps: int, dtype: str) -> tuple[float, int]:
    """Median seconds of one optimizer step of a fresh `kind_name` adapter on `rows`, and tokens per step."""
    import torch

    from training.data import tokenize_rows
    from training.methods import get_kind
    from training.trainer import train_steps

    kind = get_kind(kind_name)
    config = kind.make_config()
    loaded = kind.load_base("smollm2", config, compute_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    torch.manual_seed(0)
    model = kind.attach(loaded.model, config)
    examples = tokenize_rows(rows, loaded.tokenizer, settings.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = kind.make_optimizer(params, kind.default_lr)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    common = dict(batch_size=settings.batch_size, seed=0, pad_id=pad, dtype=dtype)
    train_steps(model, kind, optimizer, examples, start=0, total=1, **common)  # warm-up (first-call costs)
    times, tokens = [], 0
    for step in range(1, n_steps + 1):
        _, t, s = train_steps(model, kind, optimizer, examples, start=step, total=step + 1, **common)
        times.append(s)
        tokens += t
    return statistics.median(times), round(tokens / n_steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per adapter kind (after one warm-up)")
    a = p.parse_args()

    from plait.datasets import write_bbc_jsonl, write_code_jsonl
    from plait.demo import CODE_DOMAIN, FULL
    from training.data import read_rows
    from training.evaluation import resolve_dtype

    settings = FULL
    dtype = resolve_dtype("auto")
    with tempfile.TemporaryDirectory(prefix="plait-budget-") as tmp:
        news = write_bbc_jsonl(Path(tmp), settings.n_train, settings.n_eval, settings.max_chars, ("business",))
        code = write_code_jsonl(Path(tmp), settings.n_train, settings.n_eval, settings.max_chars)
        rows = {"news": read_rows(news["business"][0]), CODE_DOMAIN: read_rows(code[0])}
    t0 = time.time()
    measured = {"bottleneck": step_seconds("bottleneck", rows[CODE_DOMAIN], settings, a.steps, dtype),
                "lora": step_seconds("lora", rows["news"], settings, a.steps, dtype),
                "qlora": step_seconds("qlora", rows["news"], settings, a.steps, dtype)}
    print(f"plait demo's training steps on this machine (precision {dtype}, batch {settings.batch_size} x "
          f"{settings.max_length} tokens; median of {a.steps} steps per kind, measured in {time.time() - t0:.0f} s)\n")
    print("| trained by the demo | adapter kind | steps | s / step | tokens / step | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    total_s = total_steps = 0
    for what, n in demo_steps(settings).items():
        kind = what.split(" ")[0]
        s, tok = measured[kind]
        owner = "the final audit" if "baseline" in what else "the domains"
        print(f"| {owner} | {what} | {n} | {s:.2f} | {tok} | {n * s:.0f} |")
        total_s += n * s
        total_steps += n
    print(f"| **all** | | **{total_steps}** | | | **{total_s:.0f}** |\n")
    print(f"training steps alone: {total_s:.0f} s = {total_s / TARGET_S:.2f}x the {TARGET_S} s issue 13 allows for "
          f"the whole demo ({'under' if total_s < TARGET_S else 'over'} it before any evaluation)")


if __name__ == "__main__":
    main()
