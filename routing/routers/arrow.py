"""Arrow router: data-free prototypes from each LoRA's weights.

After Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library
of LoRAs", https://arxiv.org/abs/2405.11157, Sec. 4): for every LoRA layer l of adapter d the
prototype v_{l,d} is the top right singular vector of the update dW = B @ A, the input
direction the adapter changes most. An input is routed by how strongly its hidden states
(the base model's inputs to the LoRA-wrapped modules) align with each adapter's prototypes:
|<x_t, v_{l,d}>|, absolute because a singular vector's sign is arbitrary.

Arrow routes every token in every layer; a plait router picks adapters per input, so the
score of domain d is the mean over its layers and over the input's tokens of
|cos(x_t, v_{l,d})| (tokens normalised so that layers with larger activations do not
dominate the average), and probabilities are softmax(score / temperature). An adapter
imported without any data gets a prototype all the same, which is why this router exists.
(peft 0.21's `peft/tuners/lora/arrow.py` implements the per-token variant inside the LoRA layers.)

The prototype is computed exactly, not by power iteration: with B = QR (B is out x r),
dW = Q (R A), so dW's right singular vectors are those of the small r x in matrix R A.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, NotFoundError
from routing.routers import RouterCore

_LORA_A = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$")


def top_right_singular_vector(A, B):
    """Unit top right singular vector of B @ A without forming it, sign fixed (largest entry > 0).

    Args:
        A: [r, in] LoRA down projection.
        B: [out, r] LoRA up projection.

    Returns:
        float32 tensor [in].
    """
    import torch

    A32, B32 = A.float(), B.float()
    _, R = torch.linalg.qr(B32)                       # B = Q R, Q orthonormal columns
    _, _, Vh = torch.linalg.svd(R @ A32, full_matrices=False)
    v = Vh[0]
    return v * torch.sign(v[v.abs().argmax()])


def lora_prototypes(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """{module path: prototype} for every LoRA layer of a PEFT state dict.

    Module paths are relative to the causal LM (e.g. `model.layers.0.self_attn.q_proj`).

    Raises:
        BadInputError: no LoRA layer (lora_A/lora_B pairs) in the tensors.
    """
    protos = {}
    for key in sorted(tensors):
        m = _LORA_A.match(key)
        if not m:
            continue
        b_key = key.replace(".lora_A", ".lora_B", 1)
        if b_key not in tensors:
            raise BadInputError(f"LoRA tensor {key!r} has no matching {b_key!r}; give a complete PEFT adapter")
        protos[m.group("module")] = top_right_singular_vector(tensors[key], tensors[b_key])
    if not protos:
        raise BadInputError("no LoRA layers (…lora_A.weight / …lora_B.weight) in the adapter: the arrow "
                            "router needs a LoRA or QLoRA adapter in PEFT layout")
    return protos


def read_peft_adapter(folder: str | Path) -> dict[str, Any]:
    """The tensors of a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    Raises:
        NotFoundError: the folder or its files are missing.
        BadInputError: the adapter is not a LoRA.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise NotFoundError(f"{folder} is not a PEFT adapter folder: it needs adapter_config.json "
                            f"and adapter_model.safetensors")
    config = json.loads(cfg.read_text())
    kind = config.get("peft_type") or config.get("plait_adapter")
    if kind != "LORA":
        raise BadInputError(f"{folder} holds a {kind!r} adapter; the arrow router needs a LoRA (peft_type LORA)")
    return load_file(str(weights))


class ArrowRouter(RouterCore):
    """Route by alignment of the base model's hidden states with each LoRA's prototypes.

    Args:
        model: the base causal LM (a PeftModel works: its adapters are disabled while scoring).
            Not part of the artifact: pass it again to `from_files`.
        tokenizer: its tokenizer.
        max_length: inputs are truncated to this many tokens.
        batch_size: inputs per forward pass.
        temperature: softmax temperature over the mean |cosine| scores.
    """

    kind = "arrow"
    needs_all_adapters = False
    """Unlike perplexity, routing reads no adapter: the prototypes are stored in the router's own
    artifact and scored against the base model's hidden states, so adapters load on demand."""

    def __init__(self, model: Any = None, tokenizer: Any = None, max_length: int = 64, batch_size: int = 16,
                 temperature: float = 0.01, threshold: float = 0.0):
        super().__init__(temperature=temperature, threshold=threshold)
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.prototypes: dict[str, dict[str, Any]] = {}  # domain -> {module path: [in]}

    def _reset(self) -> None:
        self.prototypes = {}

    def _add(self, domain: str, data: str | Path | Mapping[str, Any]) -> None:
        """`data`: a PEFT LoRA folder, or its state dict {tensor name: tensor}."""
        if isinstance(data, (str, Path)):
            tensors = read_peft_adapter(data)
        elif isinstance(data, Mapping):
            tensors = data
        else:
            raise BadInputError(f"domain {domain!r}: the arrow router takes a PEFT LoRA folder or its tensors, "
                                f"not {type(data).__name__}")
        self.prototypes[domain] = lora_prototypes(tensors)

    def _modules(self) -> tuple[Any, dict[str, Any]]:
        """The module that runs the decoder stack, and {path: module} of every prototyped layer."""
        if self.model is None or self.tokenizer is None:
            raise BadInputError("the arrow router needs the base model: pass model= and tokenizer=")
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        paths = sorted({p for protos in self.prototypes.values() for p in protos})
        modules = {}
        for p in paths:
            try:
                modules[p] = lm.get_submodule(p)
            except AttributeError as e:
                raise BadInputError(f"the model has no module {p!r} that a LoRA of this router targets; "
                                    f"use the base the adapters were trained on") from e
        return lm, modules

    def _score_logits(self, texts: list[str]):
        import contextlib

        import torch

        lm, modules = self._modules()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # per module: the domains that adapt it and their prototypes stacked [n_d, in]
        stacks = {}
        for p in modules:
            ds = [i for i, d in enumerate(self.domains) if p in self.prototypes[d]]
            stacks[p] = (ds, torch.stack([self.prototypes[self.domains[i]][p] for i in ds]))
        n_layers = torch.tensor([len(self.prototypes[d]) for d in self.domains], dtype=torch.float32)
        captured: dict[str, Any] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, p=p: captured.__setitem__(p, args[0]))
                 for p, m in modules.items()]
        disable = getattr(self.model, "disable_adapter", None)
        # the decoder stack alone (no LM head) when the model exposes it: the logits are not needed
        inner = getattr(lm, "model", None)
        runner = inner if isinstance(inner, torch.nn.Module) and all(p.startswith("model.") for p in modules) else lm
        out = []
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length)
                captured.clear()
                with torch.inference_mode(), (disable() if disable else contextlib.nullcontext()):
                    runner(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                mask = enc["attention_mask"].float().unsqueeze(-1)        # [b, T, 1]
                total = torch.zeros(mask.shape[0], len(self.domains))
                for p, (ds, protos) in stacks.items():
                    x = torch.nn.functional.normalize(captured[p].float(), dim=-1)
                    sims = (x @ protos.T).abs()                           # [b, T, n_d]
                    total[:, ds] += (sims * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(total / n_layers)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(out)

    def _domain_tensors(self, domain: str) -> dict[str, Any]:
        return dict(self.prototypes[domain])

    def _load_domain_tensors(self, domain: str, tensors: dict[str, Any]) -> None:
        if not tensors:
            raise NotFoundError(f"the arrow router artifact has no prototypes for domain {domain!r}")
        self.prototypes[domain] = dict(tensors)

    def _params(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "batch_size": self.batch_size}


ROUTER_CLASS = ArrowRouter
