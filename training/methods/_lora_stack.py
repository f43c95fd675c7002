"""Serving PEFT LoRA adapters in the composition engine: `LoraStacker` and `LoraDelta`.

The maths is in `training.methods.lora`'s module docstring. `LoraStacker` parses and checks
a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_{A,B}.weight`, `rank_pattern` / `alpha_pattern`, rsLoRA) and
installs one slot per adapter in the `LoraDelta` of every linear site it targets. A LoRA
variant (DoRA) subclasses both: it names the extra tensors its files hold, checks its own
config flags and adds its own term in the delta.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from registry.errors import BadInputError
from training.methods._stacking import KindRouting, RoutingCell, SiteRegistry, grow

_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraEntry:
    """One targeted module of an adapter being added: its A [r, in], B [out, r] and scaling."""

    module: str
    base_layer: nn.Module
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class LoraDelta(nn.Module):
    """A stack of LoRA adapters at one linear site, applied per row (see `lora`'s docstring)."""

    def __init__(self, in_features: int, out_features: int, cell: RoutingCell, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cell = cell
        # Buffers, not parameters: adapters are inference-only here and must not show up as
        # trainable weights of the base.
        self.register_buffer("lora_A", torch.zeros(0, 0, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_Bt", torch.zeros(0, 0, out_features, dtype=dtype, device=device), persistent=False)

    @property
    def n_slots(self) -> int:
        return self.lora_A.shape[0]

    def append_slot(self, entry: LoraEntry | None) -> None:
        """Add one slot at the end: the entry's A and B, or None for "not targeted" (zeros)."""
        r = 0 if entry is None else entry.a.shape[0]
        r_max = max(self.lora_A.shape[1], r)
        A, Bt = grow(self.lora_A, 1, r_max), grow(self.lora_Bt, 1, r_max)
        new_a = A.new_zeros(1, r_max, self.in_features)
        new_bt = Bt.new_zeros(1, r_max, self.out_features)
        if entry is not None:
            new_a[0, :r] = entry.a.to(A.dtype)
            # Fold the scaling (and any per-output factor) into B once here: one multiply less per forward.
            new_bt[0, :r] = self.scaled_b(entry).t().to(Bt.dtype)
        self.lora_A = torch.cat([A, new_a])
        self.lora_Bt = torch.cat([Bt, new_bt])

    def scaled_b(self, entry: LoraEntry) -> torch.Tensor:
        """s * B in fp32 [out, r]."""
        return entry.b.to(torch.float32) * entry.scale

    def keep_slots(self, keep: list[int]) -> None:
        """Keep only the slots `keep` (in that order) and trim the rank padding."""
        index = torch.tensor(keep, dtype=torch.long, device=self.lora_A.device)
        A = self.lora_A.index_select(0, index)
        Bt = self.lora_Bt.index_select(0, index)
        used = (A.abs().sum(dim=(0, 2)) + Bt.abs().sum(dim=(0, 2))) > 0
        r_max = int(used.nonzero().max().item()) + 1 if used.any() else 0
        self.lora_A = A[:, :r_max].contiguous()
        self.lora_Bt = Bt[:, :r_max].contiguous()

    def active(self) -> bool:
        return self.cell.routing.mode != "off" and self.lora_A.shape[1] > 0

    def forward(self, x: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
        rt: KindRouting = self.cell.routing
        xa = x.to(self.lora_A.dtype)
        if rt.mode == "single":
            delta = (xa @ self.lora_A[rt.slot].t()) @ self.lora_Bt[rt.slot]
            return delta * rt.weight if rt.weight != 1.0 else delta
        idx, w = rt.idx, rt.w
        n, k = idx.shape
        r = self.lora_A.shape[1]
        x3 = xa.reshape(n, -1, self.in_features)
        # Gather each row's k adapters and fold them into one [k*r] inner dimension, so a top-k
        # blend is still two bmm calls.
        a = self.lora_A[idx].reshape(n, k * r, self.in_features)
        h = torch.bmm(x3, a.transpose(1, 2))
        h = (h.view(n, -1, k, r) * w.view(n, 1, k, 1)).view(n, -1, k * r)
        delta = torch.bmm(h, self.lora_Bt[idx].reshape(n, k * r, self.out_features))
        return delta.view(*wx.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"slots={self.lora_A.shape[0]}, r_max={self.lora_A.shape[1]}"


class LoraStacker:
    """Every loaded adapter of a LoRA-style family, one slot each (the engine's `Stacker`)."""

    family = "lora"
    what = "LoRA"
    delta_cls = LoraDelta
    #: tensor names besides lora_A / lora_B a module may hold in the file
    extra_tensors: tuple[str, ...] = ()
    #: config flags the family cannot serve, with what they are called
    unsupported = (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers"),
                   ("lora_bias", "LoRA bias terms"), ("modules_to_save", "modules_to_save"),
                   ("layer_replication", "layer_replication"))

    def __init__(self, sites: SiteRegistry):
        self.sites = sites
        self.cell = RoutingCell()
        self.layers: dict[str, LoraDelta] = {}
        self.n_slots = 0
        self._modules: list[list[str]] = []  # the modules each slot touches

    def route(self, routing: KindRouting) -> None:
        self.cell.routing = routing

    def check_config(self, name: str, cfg: dict) -> None:
        """Refuse options the family cannot serve and a config without r / lora_alpha."""
        for flag, why in self.unsupported:
            if cfg.get(flag):
                raise BadInputError(f"adapter {name!r} uses {why}, which the composition engine does not "
                                    f"support; train a plain {self.what} adapter")
        if cfg.get("bias", "none") != "none":
            raise BadInputError(f"adapter {name!r} trains biases (bias={cfg['bias']!r}); the engine supports "
                                f"bias='none' only")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise BadInputError(f"adapter {name!r}: adapter_config.json needs a positive int r and a number "
                                f"lora_alpha (got r={r!r}, lora_alpha={alpha!r})")

    def _group(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        parts = "|".join(["lora_A\\.weight", "lora_B\\.weight", *map(re.escape, self.extra_tensors)])
        key_re = re.compile(rf"^(?P<module>.+)\.(?P<part>{parts})$")
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            stripped = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            m = key_re.match(stripped)
            if m is None:
                raise BadInputError(f"adapter {name!r} has tensor {key!r}, which is not a {self.what} weight of a "
                                    f"linear layer; only plain {self.what} on linear layers is supported")
            grouped.setdefault(m["module"], {})[m["part"].removesuffix(".weight")] = value
        if not grouped:
            raise BadInputError(f"adapter {name!r} has no {self.what} weights in adapter_model.safetensors")
        return grouped

    def parse(self, name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> list[LoraEntry]:
        """Check the files completely and return what `add` installs."""
        self.check_config(name, cfg)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

        def pattern_value(module: str, patterns: dict, default):
            for pat, val in patterns.items():
                if re.match(rf"(.*\.)?{pat}$", module):
                    return val
            return default

        entries = []
        for module, parts in sorted(self._group(name, tensors).items()):
            missing = [p for p in ("lora_A", "lora_B", *self.extra_tensors) if p not in parts]
            if missing:
                raise BadInputError(f"adapter {name!r}: module {module} lacks its {missing[0]} "
                                    f"weight; the file is incomplete")
            target = self.sites.linear_at(module, name)
            a, b = parts["lora_A"], parts["lora_B"]
            r = pattern_value(module, rank_pattern, cfg["r"])
            alpha = pattern_value(module, alpha_pattern, cfg["lora_alpha"])
            if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
                raise BadInputError(
                    f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but r={r} "
                    f"and the base layer is {target.in_features}->{target.out_features}; it was made for another base")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            extra = {p: parts[p] for p in self.extra_tensors}
            entries.append(LoraEntry(module, target, a, b, scale, extra))
        return entries

    def _delta(self, module: str) -> LoraDelta:
        delta = self.layers.get(module)
        if delta is None:
            site = self.sites.site(module)
            delta = self.delta_cls(site.in_features, site.out_features, self.cell, self.sites.dtype, self.sites.device)
            for _ in range(self.n_slots):  # earlier adapters do not touch this layer
                delta.append_slot(None)
            site.deltas[self.family] = delta
            self.layers[module] = delta
        return delta

    def add(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
        entries = self.parse(name, config, tensors)
        # Validated: now install, so a bad file never leaves a half-loaded adapter behind.
        touched = set()
        for entry in entries:
            self._delta(entry.module).append_slot(entry)
            touched.add(entry.module)
        for module, delta in self.layers.items():
            if module not in touched:
                delta.append_slot(None)
        self.n_slots += 1
        self._modules.append([e.module for e in entries])
        return [e.module for e in entries]

    def remove(self, slot: int) -> None:
        keep = [i for i in range(self.n_slots) if i != slot]
        del self._modules[slot]
        self.n_slots -= 1
        still = {m for mods in self._modules for m in mods}
        for module, delta in list(self.layers.items()):
            delta.keep_slots(keep)
            if module not in still:
                self.sites.release(module, self.family)
                del self.layers[module]
