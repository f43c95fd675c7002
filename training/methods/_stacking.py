"""What the composition engine (`routing.engine`) needs from an adapter kind to serve it.

The engine serves many adapters on one base and routes every row of a batch to its own
adapter or blend of adapters in one forward pass. Each kind contributes a `Stacker` (from
`make_stacker` in its module): the object that holds every loaded adapter of its serving
family stacked along a leading "slot" axis, parses and validates its own artifact files, and
applies the per-row routing with batched tensor ops. Kinds that share a family (lora and
qlora) share one stacker.

Shared pieces live here:

- `KindRouting`: how the current batch uses one family's slots (off / one slot for every row
  / per-row slots and weights); the engine computes it and hands it to `Stacker.route`.
- `RoutingCell`: a mutable holder of a family's current `KindRouting`, read by its layers,
  so switching the routing costs one assignment whatever the number of layers.
- `LinearSite` / `SiteRegistry`: a targeted linear layer is wrapped ONCE, however many
  families adapt it. The site runs the base layer once and adds each family's delta,
  computed from the input x and the base's own output W x (without bias). That is what a
  weight-decomposed family needs (DoRA rescales W x), and it keeps families independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from registry.errors import BadInputError


@dataclass
class KindRouting:
    """How the current batch uses the adapters of one serving family.

    mode "off": no row uses this family (layers return the base output untouched);
    "single": every row uses slot `slot` with the same weight `weight` (no gather needed);
    "mixed": row b blends slots `idx[b]` with weights `w[b]` (weight 0 pads unused entries).
    """

    mode: str = "off"
    slot: int = 0
    weight: float = 1.0
    idx: torch.Tensor | None = None  # [B, k] long
    w: torch.Tensor | None = None  # [B, k] compute dtype


@dataclass
class RoutingCell:
    """The current `KindRouting` of one family, shared by all of that family's layers."""

    routing: KindRouting = field(default_factory=KindRouting)


@runtime_checkable
class Stacker(Protocol):
    """The engine-side holder of every loaded adapter of one serving family.

    `add` validates the files completely before installing anything, so a refused adapter
    leaves no trace; slots are numbered 0..n_slots-1 in the order adapters were added.
    """

    n_slots: int

    def add(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Install one adapter as slot `n_slots`; returns the module paths it touches.

        Raises:
            BadInputError: the files do not fit this base or use options the family cannot serve.
        """

    def remove(self, slot: int) -> None:
        """Drop slot `slot` (later slots move down by one); unused modules get their base back."""

    def route(self, routing: KindRouting) -> None:
        """Use `routing` in the following forward passes (KindRouting() switches the family off)."""


def grow(stack: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `stack` along `dim` up to `size` (no-op if already that large)."""
    if stack.shape[dim] >= size:
        return stack
    pad_shape = list(stack.shape)
    pad_shape[dim] = size - stack.shape[dim]
    return torch.cat([stack, stack.new_zeros(pad_shape)], dim=dim)


class LinearDelta(Protocol):
    """One family's contribution at a linear site: delta(x, wx) with wx = W x (no bias)."""

    def active(self) -> bool:
        """Whether the current batch uses this family at this site at all."""

    def __call__(self, x: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
        """The delta to add to the base output (any dtype; the site casts)."""


class LinearSite(nn.Module):
    """A targeted linear layer (nn.Linear or bitsandbytes Linear4bit), kept as `base_layer`,
    plus the deltas of every family that adapts it.

    Attributes the site lacks are looked up on its deltas (e.g. `site.lora_A`), so code that
    inspects a family's stacks through the model keeps working.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.deltas = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `proj.weight` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            deltas = self._modules.get("deltas")
            for delta in (deltas.values() if deltas is not None else ()):
                if hasattr(delta, name):
                    return getattr(delta, name)
            raise

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        active = [d for d in self.deltas.values() if d.active()]
        if not active:
            return result
        wx = result if self.base_layer.bias is None else result - self.base_layer.bias
        for delta in active:
            result = result + delta(x, wx).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"families={list(self.deltas)}"


class SiteRegistry:
    """The engine's linear sites: wraps a linear layer on first use, unwraps it when unused.

    Args:
        model: the base model (its layers are replaced in place).
        dtype: the compute dtype adapter tensors are cast to.
        device: where adapter tensors live.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.dtype = dtype
        self.device = device
        self.sites: dict[str, LinearSite] = {}

    def linear_at(self, module: str, name: str) -> nn.Module:
        """The linear layer at `module` (a site's base layer if wrapped), validated.

        Raises:
            BadInputError: no such module, or not a linear layer.
        """
        try:
            target = self.model.get_submodule(module)
        except AttributeError:
            raise BadInputError(f"adapter {name!r} targets module {module!r}, which this base does not have; "
                                f"it was made for another model") from None
        if isinstance(target, LinearSite):
            return target.base_layer
        if not isinstance(target, nn.Linear):  # bitsandbytes Linear4bit subclasses nn.Linear
            raise BadInputError(f"adapter {name!r} targets {module!r}, a {type(target).__name__}; the engine "
                                f"applies LoRA to linear layers only")
        return target

    def site(self, module: str) -> LinearSite:
        """The site at `module`, wrapping the linear layer there on first use."""
        site = self.sites.get(module)
        if site is None:
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            site = LinearSite(getattr(parent, child))
            setattr(parent, child, site)
            self.sites[module] = site
        return site

    def release(self, module: str, family: str) -> None:
        """Take `family`'s delta off `module`; the last one out puts the bare layer back."""
        site = self.sites.get(module)
        if site is None or family not in site.deltas:
            return
        del site.deltas[family]
        if not len(site.deltas):
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, site.base_layer)
            del self.sites[module]
