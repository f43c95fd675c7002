"""Next-token cross-entropy without the [tokens, vocabulary] logits of the whole batch.

A causal LM's last step, `lm_head` then cross-entropy, holds the batch's logits, their
log-softmax and, in the backward pass, their gradient: three [tokens, vocab] fp32 tensors
(SmolLM2's 49k vocabulary at batch 8 x 128 tokens: 200 MB each), more than LoRA's whole
training state. Here the (frozen) output projection and the loss are computed together, a
few hundred tokens at a time, and since the output projection is frozen the gradient with
respect to the hidden states can be computed in the same pass: softmax(logits) - onehot(label)
is the gradient of the loss with respect to the logits, so

    d loss / d hidden = (softmax(h W^T) - onehot(y)) W

chunk by chunk, kept ([tokens, hidden], small) for the backward pass. Nothing is recomputed,
the matmuls are the same as in the unfused path, and only labelled positions reach the
projection at all (padding and prompt tokens cost nothing). This is the idea of the fused
linear cross-entropy kernels (Liger Kernel, Hsu et al. 2024; Apple's Cut Cross-Entropy,
Wijmans et al. 2024), in plain PyTorch.

`split_causal_lm` finds the decoder and output projection of the model families where the
logits are exactly `hidden @ W^T` (no softcapping, scaling or bias, a frozen plain Linear
head); any other model keeps the unfused path in `training.trainer.token_loss_sum`.
"""

from __future__ import annotations

import torch
from torch import nn

from training.data import IGNORE_INDEX

# model families whose causal-LM head is `lm_head(final_norm(decoder(x)))` with nothing after it
# (Gemma2/3 softcap, Granite and Cohere scale the logits: they keep the unfused path)
FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2"})
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 16M floats = 64 MB, whatever the vocabulary


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers causal LM under the adapter kinds' wrappers (each kind's `unwrap`)."""
    from training.methods import KINDS

    for _ in range(4):  # peft -> bottleneck -> ... never nests deeper
        inner = next((m for m in (meth.unwrap(model) for meth in KINDS.values()) if m is not None), None)
        if inner is None:
            break
        model = inner
    return model


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output projection) when the fused loss gives this model's loss, else None."""
    causal = _unwrap(model)
    config = getattr(causal, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", 1.0) != 1.0:
        return None
    try:
        decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or decoder is None:
        return None  # a LoRA on lm_head, a quantized or trainable head: the unfused path
    return decoder, head


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight^T, labels), weight frozen."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, matmul_dtype: torch.dtype):
        keep_grad = ctx.needs_input_grad[0]
        w = weight.to(matmul_dtype)
        chunk = max(16, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if keep_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk], labels[start:start + chunk]
                logits = (h.to(matmul_dtype) @ w.T).float()  # [c, vocab]
                lse = torch.logsumexp(logits, dim=-1)
                rows = torch.arange(len(y), device=y.device)
                total += (lse - logits[rows, y]).sum()
                if keep_grad:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[rows, y] -= 1.0
                    grad[start:start + chunk] = (probs.to(matmul_dtype) @ w).to(hidden.dtype)
        if keep_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def fused_token_loss_sum(decoder: nn.Module, head: nn.Linear, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count), as
    `cross_entropy(model(input_ids).logits, shifted labels, reduction="sum")` up to float rounding.

    Call it under the same autocast as the model's forward: the projection then runs in the
    autocast dtype, as `lm_head` would.
    """
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    where = (target != IGNORE_INDEX).nonzero().squeeze(1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    loss = _LinearCrossEntropy.apply(flat, head.weight, target.index_select(0, where), dtype)
    return loss, int(where.numel())
