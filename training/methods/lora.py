"""LoRA: low-rank adapters on the base's linear layers, through peft.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
https://arxiv.org/abs/2106.09685. Each targeted weight W gets a trainable update
(alpha / r) * B @ A with A: [r, in] and B: [out, r]; B starts at zero, so a fresh adapter
is the identity and only A and B train:

    x ──► W (frozen) ─────────────┐
    └───► A ──► B ── * alpha/r ──(+)──► y

Artifacts are plain PEFT layout (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained` and vLLM load them as they are.

Serving (`make_stacker`, for `routing.engine`): every targeted linear layer gets a `LoraDelta`
holding all loaded adapters' A [n_slots, r_max, in] and s*B^T [n_slots, r_max, out] (the
scaling alpha/r or alpha/sqrt(r) folded in; ranks below r_max zero-padded, which adds exact
zeros). For a batch whose row b is routed to slots idx[b, :k] with weights w[b, :k]:

    h[b]     = x[b] @ concat_j A[idx[b, j]]^T              bmm   [T, k*r]
    h[b, j] *= w[b, j]                                      broadcast
    y[b]     = base(x)[b] + h[b] @ concat_j Bt[idx[b, j]]  bmm   [T, out]

i.e. y[b] = base(x[b]) + sum_j w[b, j] * s_j * B_j A_j x[b]: the gather + batched-matmul
("BGMV") formulation of Punica (Chen et al. 2023, arXiv:2310.18547) and S-LoRA (Sheng et al.
2023, arXiv:2311.03285), done with plain `torch.bmm`. It needs no grouping of rows by adapter,
so its cost does not grow with the number of distinct adapters in a batch. Rows with weight 0
get an exact zero delta, so a base-routed row equals the bare base bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from registry.errors import BadInputError, IntegrityError
from registry.names import whole_number
from training.methods import register_kind

DEFAULT_LR = 2e-4
RANK_OPTION = "r"
MERGEABLE = True
ADAPTER_NAME = "default"
#: default targets by architecture style: attention and MLP projections
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")
#: kinds whose artifacts can initialise a LoRA adapter (a warm start): QLoRA's are the same PEFT layout
SEEDS_FROM = ("lora", "qlora")
#: a PEFT LoRA config with none of the variant options that change its maths (use_dora: `dora`)
ARTIFACT_MATCH = {"peft_type": "LORA", "use_dora": False}


@dataclass
class LoraSettings:
    """Options of a LoRA adapter."""

    r: int = 8
    """rank of the update B @ A"""
    alpha: float = 16.0
    """the update is scaled by alpha / r"""
    dropout: float = 0.0
    """dropout on the adapter's input while training"""
    target_modules: list[str] | None = None
    """names of the linear layers to adapt; None = the architecture's defaults"""

    def __post_init__(self):
        whole_number(self.r, "LoRA rank", 1, example=8)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise BadInputError(f"LoRA alpha {self.alpha!r} is invalid: use a number > 0 (e.g. 16)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"LoRA dropout {self.dropout!r} is invalid: use a number in [0, 1)")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [t for t in self.target_modules.split(",") if t]
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise BadInputError(f"LoRA target modules {self.target_modules!r} are invalid: give module names "
                                    f"such as q_proj,v_proj, or leave them unset for the defaults")
            self.target_modules = list(self.target_modules)


def default_targets(model) -> list[str]:
    """The linear layers to adapt when none are named: Llama-style or BERT-style projections.

    Raises:
        BadInputError: the architecture matches neither style.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for style in (LLAMA_TARGETS, BERT_TARGETS):
        found = [t for t in style if t in leaves]
        if found:
            return found
    raise BadInputError(f"{type(model).__name__} has none of the default LoRA target modules "
                        f"({', '.join(LLAMA_TARGETS + BERT_TARGETS)}); name them with target_modules")


def _check_targets(model, targets: list[str]) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise BadInputError(f"LoRA target module {missing[0]!r} does not exist in {type(model).__name__}; "
                            f"pick from its linear layers (e.g. {', '.join(sorted(leaves & set(LLAMA_TARGETS + BERT_TARGETS))) or 'see model.named_modules()'})")


def peft_config(model, settings: LoraSettings):
    """The peft `LoraConfig` for `settings` on `model`."""
    from peft import LoraConfig

    targets = settings.target_modules or default_targets(model)
    _check_targets(model, targets)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")


def attach(model, settings: LoraSettings):
    """Wrap `model` with a fresh LoRA adapter; only the adapter's A and B matrices train.

    Returns:
        a `peft.PeftModel` (the base modules are changed in place).
    """
    from peft import get_peft_model

    model.requires_grad_(False)
    peft_model = get_peft_model(model, peft_config(model, settings), adapter_name=ADAPTER_NAME)
    return peft_model


def save(model, out_dir: Path) -> Path:
    """Write the adapter as `adapter_config.json` + `adapter_model.safetensors` (nothing else)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # peft also writes a README model card; the artifact is exactly the two files
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[ADAPTER_NAME])
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
        # peft writes target_modules from a set, in an order that changes per process; sorted,
        # identical runs give identical bytes and so the same content hash
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def read_config(folder: Path) -> LoraSettings:
    """The LoRA settings a PEFT artifact was saved with."""
    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path} is not a readable adapter config ({e}); re-save the adapter") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise BadInputError(f"{path} is not a LoRA adapter config (peft_type {cfg.get('peft_type')!r})")
    targets = cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, (list, set)) else ([targets] if targets else None)
    return LoraSettings(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 16)),
                        dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=targets)


def load(model, folder: Path, trainable: bool = False):
    """Put the adapter stored in `folder` onto the base `model`.

    Raises:
        IntegrityError: the file lacks a tensor the adapter needs, or holds one it does not.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    folder = Path(folder)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        stored = set(f.keys())
    model.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=ADAPTER_NAME, is_trainable=trainable)
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME).keys())
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise IntegrityError(f"{folder} does not fit this base: "
                             + (f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}")
                             + f" ({len(missing)} missing, {len(extra)} unexpected); load it on the base it was trained on")
    return peft_model


def disabled(model):
    """A context in which the LoRA update is off and outputs equal the base's."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def unwrap(model):
    """The model under a peft wrapper, or None when `model` is not one."""
    fn = getattr(model, "get_base_model", None)
    if callable(fn):
        inner = fn()
        return inner if inner is not model else None
    return None


def make_stacker(sites):
    """The composition engine's stack of plain LoRA adapters (`LoraStacker`)."""
    from training.methods._lora_stack import LoraStacker

    return LoraStacker(sites)


register_kind("lora", LoraSettings, sys.modules[__name__])
