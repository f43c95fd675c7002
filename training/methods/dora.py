"""DoRA: weight-decomposed low-rank adaptation, through peft (`LoraConfig(use_dora=True)`).

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353.
A targeted weight W [out, in] is split into a magnitude and a direction; the direction gets a
LoRA update and the magnitude m [out] (initialised to the row norms of W) trains as well:

    W' = m * (W + s B A) / ||W + s B A||_row           s = alpha / r  (alpha / sqrt(r): rsLoRA)

    x ──► W (frozen) ───────────────┐
    └───► A ──► B ── * s ──────────(+)──► * g ──► y     g = m / ||W + s B A||_row  [out]

so y = g * (W x + s B A x) (+ the base bias, unscaled). As in peft the norm is treated as a
constant in backward (section 4.3 of the paper: detaching it saves memory at no loss); A, B
and m train. The artifact is the plain PEFT layout with `use_dora: true` in
`adapter_config.json` and a `<module>.lora_magnitude_vector` tensor beside each module's
lora_A / lora_B, so `peft.PeftModel.from_pretrained` loads it as it is.

Serving (`make_stacker`). peft refuses DoRA in mixed batches; here, at load, the engine
computes each adapter's g per targeted layer (W dequantized for a 4-bit base) and folds it
into the stacked s*B^T, and keeps g - 1 per slot. Row b routed to DoRA slots idx[b, :k] with
weights w[b, :k] then gets

    y_b = W x_b + sum_j w[b, j] * ((g_j - 1) * W x_b + g_j * s_j B_j A_j x_b)

in the same gather + bmm pass as LoRA, plus one gathered [B, out] scale of the base output W x
(computed once per layer and shared by every family). With one adapter and weight 1 this is
peft's DoRA exactly. A top-k blend is, like LoRA's, the sum of the weighted per-layer deltas
(what each adapter alone adds to the layer's output); with weights summing to 1 a layer's
output is the weighted mean of the adapters' own outputs of that layer. That is not a merge
of magnitudes (peft's `add_weighted_adapter` has none for DoRA), so DoRA is not mergeable.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from registry.errors import BadInputError
from training.methods import artifact_matches, lora, read_adapter_config, register_kind
from training.methods._lora_stack import LoraDelta, LoraEntry, LoraStacker
from training.methods.lora import LoraSettings

DEFAULT_LR = lora.DEFAULT_LR
RANK_OPTION = lora.RANK_OPTION
MERGEABLE = False
MAGNITUDE = "lora_magnitude_vector"
#: a PEFT LoRA config with use_dora set
ARTIFACT_MATCH = {"peft_type": "LORA", "use_dora": True}


@dataclass
class DoraSettings(LoraSettings):
    """Options of a DoRA adapter: LoRA's (r, alpha, dropout, target_modules); m is always trained."""


def attach(model, settings: DoraSettings):
    """Wrap `model` with a fresh DoRA adapter; only A, B and the magnitudes m train.

    Returns:
        a `peft.PeftModel` (the base modules are changed in place).
    """
    from peft import get_peft_model

    model.requires_grad_(False)
    config = lora.peft_config(model, settings)
    config.use_dora = True
    return get_peft_model(model, config, adapter_name=lora.ADAPTER_NAME)


def read_config(folder) -> DoraSettings:
    """The DoRA settings a PEFT artifact was saved with.

    Raises:
        BadInputError: the config is a LoRA one without use_dora.
    """
    cfg = read_adapter_config(folder)
    if not artifact_matches(ARTIFACT_MATCH, cfg):
        raise BadInputError(f"{folder}/adapter_config.json is not a DoRA config (no use_dora: true)")
    s = lora.read_config(folder)
    return DoraSettings(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=s.target_modules)


save = lora.save
load = lora.load  # peft builds the DoRA layers from use_dora; lora.load checks every tensor is there
disabled = lora.disabled
unwrap = lora.unwrap


class DoraDelta(LoraDelta):
    """The LoRA stack with each slot's g folded into B, plus (g - 1) per slot for the W x term."""

    def __init__(self, in_features, out_features, cell, dtype, device):
        super().__init__(in_features, out_features, cell, dtype, device)
        self.register_buffer("dora_g1", torch.zeros(0, out_features, dtype=dtype, device=device), persistent=False)

    def scaled_b(self, entry: LoraEntry) -> torch.Tensor:
        return super().scaled_b(entry) * entry.extra["g"][:, None]

    def append_slot(self, entry: LoraEntry | None) -> None:
        if entry is not None:
            entry.extra["g"] = _magnitude_scale(entry)
        g1 = self.dora_g1.new_zeros(1, self.out_features)
        if entry is not None:
            g1[0] = (entry.extra["g"] - 1.0).to(g1.dtype)
        super().append_slot(entry)
        self.dora_g1 = torch.cat([self.dora_g1, g1])

    def keep_slots(self, keep: list[int]) -> None:
        super().keep_slots(keep)
        self.dora_g1 = self.dora_g1.index_select(0, torch.tensor(keep, dtype=torch.long, device=self.dora_g1.device))

    def forward(self, x: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
        delta = super().forward(x, wx)
        rt = self.cell.routing
        if rt.mode == "single":
            return delta + (self.dora_g1[rt.slot] * rt.weight) * wx.to(delta.dtype)
        n = rt.idx.shape[0]
        c = (rt.w.unsqueeze(-1) * self.dora_g1[rt.idx]).sum(1)  # [B, out]: sum_j w_j (g_j - 1)
        return delta + (wx.to(delta.dtype).reshape(n, -1, self.out_features) * c[:, None, :]).view(delta.shape)


def _magnitude_scale(entry: LoraEntry) -> torch.Tensor:
    """g = m / ||W + s B A||_row in fp32, [out] (W dequantized when the base is 4-bit)."""
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(entry.base_layer).detach().to("cpu", torch.float32)
    a, b = entry.a.to(torch.float32), entry.b.to(torch.float32)
    norm = torch.linalg.norm(weight + entry.scale * (b @ a), dim=1)
    return entry.extra[MAGNITUDE].to(torch.float32).reshape(-1) / norm


class DoraStacker(LoraStacker):
    """Every loaded DoRA adapter, one slot each (the engine's `Stacker` for the dora family)."""

    family = "dora"
    what = "DoRA"
    delta_cls = DoraDelta
    extra_tensors = (MAGNITUDE,)
    unsupported = tuple(u for u in LoraStacker.unsupported if u[0] != "use_dora")

    def check_config(self, name: str, cfg: dict) -> None:
        if not artifact_matches(ARTIFACT_MATCH, cfg):
            raise BadInputError(f"adapter {name!r} is not a DoRA adapter (its config lacks use_dora: true)")
        super().check_config(name, cfg)

    def parse(self, name, cfg, tensors):
        entries = super().parse(name, cfg, tensors)
        for e in entries:
            if e.extra[MAGNITUDE].numel() != e.base_layer.out_features:
                raise BadInputError(f"adapter {name!r}: {e.module} has a magnitude of {e.extra[MAGNITUDE].numel()} "
                                    f"values, the base layer has {e.base_layer.out_features} outputs; it was made "
                                    f"for another base")
        return entries


def make_stacker(sites) -> DoraStacker:
    """The composition engine's stack of DoRA adapters (`DoraStacker`)."""
    return DoraStacker(sites)


register_kind("dora", DoraSettings, sys.modules[__name__])
