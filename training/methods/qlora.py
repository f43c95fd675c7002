"""QLoRA: LoRA on a base whose linear layers are stored in 4-bit NF4.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314. The frozen base is loaded through bitsandbytes as NF4
with double quantization (the quantization constants are quantized too); its layers
dequantize on the fly in the compute dtype. LoRA A/B matrices on top stay in full
precision and are the only trainable tensors. The artifact is the same PEFT layout as
`lora`; that the base was 4-bit is recorded in the registry version's config.

The CPU repacking trap (measured on this project's AMD EPYC CPU): on CPUs with AVX512-BF16, bitsandbytes'
`Linear4bit.forward` repacks its weight into a CPU-only layout the first time it runs in
eval mode on an input that does not require grad (an ordinary no-grad evaluation). The
repacked path has no autograd kernel, so afterwards LoRA receives no gradient and the loss
stays flat, silently. Unpacking (what `state_dict()` does) is only a best-effort inverse
and changes the base's logits slightly. So `guard_cpu_4bit` turns the repacking off on every
4-bit layer before the first forward (at load and at attach), and unpacks, with a warning,
any layer some earlier code already repacked; the trainer calls it again on every switch
to training, and asserts that every trainable tensor receives a gradient.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

from registry.errors import BadInputError
from training.methods import lora, register_kind
from training.methods.lora import LoraSettings

#: kinds whose artifacts can initialise a QLoRA adapter (a warm start): LoRA's are the same PEFT layout
SEEDS_FROM = ("qlora", "lora")
DEFAULT_LR = lora.DEFAULT_LR
RANK_OPTION = lora.RANK_OPTION
MERGEABLE = True
#: a QLoRA artifact is a LoRA artifact (the 4-bit base is recorded in the registry version's
#: config, not in the files): a folder alone is detected as lora, and lora's family serves it
ARTIFACT_KIND = SERVE_FAMILY = "lora"


@dataclass
class QLoraSettings(LoraSettings):
    """Options of a QLoRA adapter: LoRA's, plus how the 4-bit base runs."""

    compute_dtype: str = "auto"
    """dtype the 4-bit layers compute in: auto (the trainer's dtype), fp32 or bf16"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory (slower)"""

    def __post_init__(self):
        super().__post_init__()
        if self.compute_dtype not in ("auto", "fp32", "bf16"):
            raise BadInputError(f"QLoRA compute dtype {self.compute_dtype!r} is invalid: use auto, fp32 or bf16")


def base_kwargs(settings: QLoraSettings, compute_dtype=None) -> dict:
    """`load_base` arguments for a 4-bit NF4 base with double quantization."""
    import torch

    if settings.compute_dtype != "auto":
        compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.compute_dtype]
    return {"quantize_4bit": True, "compute_dtype": compute_dtype or torch.float32}


def guard_cpu_4bit(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on CPU, and undo any repack already done.

    Returns:
        how many layers had been repacked and were unpacked.
    """
    import bitsandbytes as bnb

    unpacked = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the gate of the repacking branch in forward()
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.state_dict()  # bitsandbytes unpacks in _save_to_state_dict
                unpacked += 1
    if unpacked:
        warnings.warn(f"{unpacked} 4-bit layers had been repacked by an eval-mode forward and were unpacked so LoRA "
                      f"gets gradients; their outputs may differ slightly from before", stacklevel=2)
    return unpacked


def attach(model, settings: QLoraSettings):
    """Prepare the 4-bit base for training and wrap it with a fresh LoRA adapter."""
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise BadInputError("a qlora adapter needs a 4-bit base: load it with load_base(..., quantize_4bit=True), "
                            "or use adapter kind lora on a full-precision base")
    guard_cpu_4bit(model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=settings.gradient_checkpointing,
        # reentrant checkpointing passes no gradient through 4-bit layers
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return lora.attach(model, settings)


def prepare_base(model) -> None:
    guard_cpu_4bit(model)


prepare_for_training = prepare_for_eval = prepare_base


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    """Paged 8-bit AdamW on CUDA (optimizer state paged to host memory under pressure); AdamW on CPU."""
    import torch

    params = list(params)
    if torch.cuda.is_available() and all(p.is_cuda for p in params):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def read_config(folder) -> QLoraSettings:
    s = lora.read_config(folder)
    return QLoraSettings(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=s.target_modules)


def load(model, folder, trainable: bool = False):
    """Put a stored QLoRA (PEFT layout) adapter onto `model` (4-bit or full-precision)."""
    if getattr(model, "is_loaded_in_4bit", False):
        guard_cpu_4bit(model)
        if trainable:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.load(model, folder, trainable=trainable)


save = lora.save
disabled = lora.disabled
unwrap = lora.unwrap
make_stacker = lora.make_stacker

register_kind("qlora", QLoraSettings, sys.modules[__name__])
