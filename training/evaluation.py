"""Precision and evaluation: which dtype a run computes in, and the token loss of a model on examples.

`token_loss_sum` is the one loss the trainer steps on and `evaluate` measures with (the warm
start scores its candidates with it too, `training.warmstart`); Llama-style models take the
fused path of `training.loss`. `next_token_nll` is the per-position loss the composition
engine (audits, validation losses) and the perplexity router score rows with.
"""

from __future__ import annotations

import contextlib
import math

from training.data import IGNORE_INDEX, collate, iter_eval_batches
from training.methods import Kind


# ----------------------------------------------------------------------------- precision
def fast_bf16(workload: str = "train") -> bool:
    """Whether bf16 is the faster precision for `workload` here: bf16 CUDA, or measured on this CPU.

    See `training.precision`: timed once per machine and workload, never guessed from CPU flags.
    """
    from training.precision import choose

    return choose(workload).dtype == "bf16"


def resolve_dtype(dtype: str, workload: str = "train", *, announce: bool = False) -> str:
    """`auto` -> the precision measured faster for `workload` on this machine (else `dtype` as given).

    Args:
        dtype: auto, fp32 or bf16.
        workload: train, encode or serve (`training.precision.WORKLOADS`).
        announce: print the choice and why, once per process (the trainer does with its progress).
    """
    if dtype != "auto":
        return dtype
    from training.precision import choose

    return choose(workload, announce=announce).dtype


def _autocast(dtype: str, device: str):
    import torch

    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- loss / eval
def token_loss_sum(model, batch: dict, dtype: str, device: str):
    """(sum of next-token cross-entropy over labelled tokens, number of labelled tokens).

    Llama-style models take the fused path (`training.loss`): the output projection and the
    loss a few hundred tokens at a time, never the whole batch's [tokens, vocab] logits.
    """
    import torch.nn.functional as F

    from training.loss import fused_token_loss_sum, split_causal_lm

    parts = split_causal_lm(model)
    if parts is not None:
        with _autocast(dtype, device):
            return fused_token_loss_sum(*parts, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        batch["labels"].to(device))
    with _autocast(dtype, device):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
    # shift the labels, not the logits: slicing [B, L, vocab] logits would copy them (200 MB at
    # SmolLM2's 49k vocab, batch 8 x 128); the last position's label is -100
    labels = F.pad(batch["labels"].to(device), (0, 1), value=IGNORE_INDEX)[:, 1:]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def next_token_nll(logits, input_ids):
    """Per-position next-token loss (nats) of `logits` [B, T, V] for `input_ids` [B, T]: [B, T - 1].

    Position t scores token t + 1. Computed over the contiguous [B * T, V] view with the last
    position ignored, then dropped: a class-dim-1 cross-entropy on the transposed [B, V, T - 1]
    slice walks the vocabulary with a stride of T and was about 5x slower on CPU (0.33 s against
    0.07 s for 8 x 64 positions of SmolLM2's 49k-token vocabulary), a sixth of every audit's
    measuring time.
    """
    import torch.nn.functional as F

    b, t, v = logits.shape
    targets = F.pad(input_ids[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.view(b, t)[:, :-1]


def evaluate(model, examples, *, pad_id: int, batch_size: int = 8, dtype: str = "fp32",
             adapter_kind: Kind | None = None) -> dict[str, float]:
    """Mean token loss and perplexity of `model` on `examples` (no grad, eval mode).

    Returns:
        {"loss": mean next-token cross-entropy over labelled tokens, "perplexity": exp(loss), "tokens": n}
    """
    import torch

    was_training = model.training
    model.eval()
    if adapter_kind is not None:
        adapter_kind.prepare_for_eval(model)
    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in iter_eval_batches(examples, batch_size):
            loss, n = token_loss_sum(model, collate(chunk, pad_id), dtype, device)
            total += float(loss)
            count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": float(count)}


def _device(model) -> str:
    """The device type (cpu, cuda) of the model's parameters."""
    return next(model.parameters()).device.type
