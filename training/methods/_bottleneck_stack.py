"""Serving bottleneck adapters in the composition engine: `BottleneckStacker`.

A `StackedBottleneck` is a forward hook on a sublayer module (an MLP or attention block)
holding every loaded bottleneck adapter (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et
al. 2021, arXiv:2005.00247) of that module stacked: `down` [n, b_max, H], `up_t` [n, b_max, H]
(scaling folded in) and biases. It replaces the block output o by
o + sum_j w[b, j] * (up_j(act_j(down_j(o)))) with the gather + bmm scheme of the LoRA stack.
`BottleneckStacker` parses plait's bottleneck artifact (`layers.{i}.{site}.{down,up}.{weight,bias}`
and the `sites` / `layers_path` of its config) and keeps one `StackedBottleneck` per module.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from registry.errors import BadInputError
from training.methods._stacking import KindRouting, RoutingCell, SiteRegistry, grow

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
}
_BN_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<site>[A-Za-z0-9_]+)\.(?P<part>(down|up)\.(weight|bias))$")
_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


class StackedBottleneck(nn.Module):
    """A stack of bottleneck adapters applied, per row, to the output of one sublayer module.

    Attached with `attach(module)` as a forward hook; `detach()` removes it.
    """

    def __init__(self, hidden_size: int, cell: RoutingCell, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = cell
        z = dict(dtype=dtype, device=device)
        self.register_buffer("down", torch.zeros(0, 0, hidden_size, **z), persistent=False)
        self.register_buffer("down_b", torch.zeros(0, 0, **z), persistent=False)
        self.register_buffer("up_t", torch.zeros(0, 0, hidden_size, **z), persistent=False)
        self.register_buffer("up_b", torch.zeros(0, hidden_size, **z), persistent=False)
        self.acts: list[str] = []  # activation name per slot
        self._handle = None

    @property
    def n_slots(self) -> int:
        return self.down.shape[0]

    def attach(self, module: nn.Module) -> None:
        self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def append_slot(self, weights: dict[str, torch.Tensor] | None, act: str, scale: float) -> None:
        """Add one slot: weights {down.weight [b,H], down.bias [b], up.weight [H,b], up.bias [H]}
        or None for "this adapter has no module here" (zeros)."""
        b = 0 if weights is None else weights["down.weight"].shape[0]
        b_max = max(self.down.shape[1], b)
        down, up_t = grow(self.down, 1, b_max), grow(self.up_t, 1, b_max)
        down_b = grow(self.down_b, 1, b_max)
        nd, nub = down.new_zeros(1, b_max, self.hidden_size), down.new_zeros(1, self.hidden_size)
        ndb, nut = down.new_zeros(1, b_max), down.new_zeros(1, b_max, self.hidden_size)
        if weights is not None:
            f32 = {k: v.to(torch.float32) for k, v in weights.items()}
            nd[0, :b] = f32["down.weight"].to(down.dtype)
            ndb[0, :b] = f32["down.bias"].to(down.dtype)
            nut[0, :b] = (f32["up.weight"] * scale).t().to(down.dtype)
            nub[0] = (f32["up.bias"] * scale).to(down.dtype)
        self.down, self.down_b = torch.cat([down, nd]), torch.cat([down_b, ndb])
        self.up_t, self.up_b = torch.cat([up_t, nut]), torch.cat([self.up_b, nub])
        self.acts.append(act)

    def keep_slots(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.down.device)
        self.down = self.down.index_select(0, index)
        self.down_b = self.down_b.index_select(0, index)
        self.up_t = self.up_t.index_select(0, index)
        self.up_b = self.up_b.index_select(0, index)
        self.acts = [self.acts[i] for i in keep]

    def _activate(self, h: torch.Tensor, slots: torch.Tensor | int) -> torch.Tensor:
        """Apply each slot's activation; h is [..., k, b] and `slots` the slots of the k axis."""
        names = set(self.acts)
        if len(names) == 1 or isinstance(slots, int):
            name = self.acts[slots] if isinstance(slots, int) else names.pop()
            return ACTIVATIONS[name](h)
        # Adapters with different activations in one stack: pick per (row, entry). Every
        # activation maps 0 to 0, so zero-padded bottleneck units stay zero.
        act_ids = torch.tensor([sorted(names).index(a) for a in self.acts], device=h.device)[slots]  # [B, k]
        out = torch.zeros_like(h)
        for i, name in enumerate(sorted(names)):
            mask = (act_ids == i).view(act_ids.shape[0], 1, act_ids.shape[1], 1)
            out = torch.where(mask, ACTIVATIONS[name](h), out)
        return out

    def _hook(self, module: nn.Module, args, output):
        rt: KindRouting = self.cell.routing
        if rt.mode == "off" or self.down.shape[0] == 0:
            return None
        o = output[0] if isinstance(output, tuple) else output
        oa = o.to(self.down.dtype)
        if rt.mode == "single":
            s = rt.slot
            h = self._activate(oa @ self.down[s].t() + self.down_b[s], s)
            delta = h @ self.up_t[s] + self.up_b[s]
            if rt.weight != 1.0:
                delta = delta * rt.weight
        else:
            idx, w = rt.idx, rt.w
            n, k = idx.shape
            b = self.down.shape[1]
            o3 = oa.reshape(n, -1, self.hidden_size)
            h = torch.bmm(o3, self.down[idx].reshape(n, k * b, self.hidden_size).transpose(1, 2))
            h = h.view(n, -1, k, b) + self.down_b[idx].view(n, 1, k, b)
            h = self._activate(h, idx) * w.view(n, 1, k, 1)
            delta = torch.bmm(h.reshape(n, -1, k * b), self.up_t[idx].reshape(n, k * b, self.hidden_size))
            delta = delta + torch.bmm(w.view(n, 1, k), self.up_b[idx])  # sum_j w_j * up_bias_j
            delta = delta.view(o.shape)
        new = o + delta.to(o.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def extra_repr(self) -> str:
        return f"slots={self.down.shape[0]}, b_max={self.down.shape[1]}"


class BottleneckStacker:
    """Every loaded bottleneck adapter, one slot each (the engine's `Stacker`)."""

    family = "bottleneck"

    def __init__(self, sites: SiteRegistry):
        self.model = sites.model
        self.dtype, self.device = sites.dtype, sites.device
        self.cell = RoutingCell()
        self.layers: dict[str, StackedBottleneck] = {}
        self.n_slots = 0
        self._modules: list[list[str]] = []

    def route(self, routing: KindRouting) -> None:
        self.cell.routing = routing

    def _check_config(self, name: str, cfg: dict) -> tuple[str, float, dict, str, int | None]:
        act = cfg.get("non_linearity")
        if act not in ACTIVATIONS:
            raise BadInputError(f"bottleneck adapter {name!r}: non_linearity {act!r} is not one of "
                                f"{', '.join(ACTIVATIONS)}")
        scale, sites = cfg.get("scaling", 1.0), cfg.get("sites") or {}
        if not isinstance(scale, (int, float)) or not isinstance(sites, dict) or not sites:
            raise BadInputError(f"bottleneck adapter {name!r}: adapter_config.json needs a number 'scaling' and "
                                f"a non-empty 'sites' mapping")
        hidden = getattr(self.model.config, "hidden_size", None)
        if cfg.get("hidden_size") not in (None, hidden):
            raise BadInputError(f"bottleneck adapter {name!r} has hidden_size {cfg.get('hidden_size')}, the base has "
                                f"{hidden}; it was made for another base")
        return act, float(scale), sites, cfg.get("layers_path", "model.layers"), hidden

    def _group(self, name: str, tensors: dict, sites: dict, layers_path: str) -> dict[str, dict[str, torch.Tensor]]:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            m = _BN_KEY.match(key)
            if m is None:
                raise BadInputError(f"bottleneck adapter {name!r} has unexpected tensor {key!r}; expected "
                                    f"layers.I.SITE.(down|up).(weight|bias)")
            if m["site"] not in sites:
                raise BadInputError(f"bottleneck adapter {name!r}: tensor {key!r} names site {m['site']!r}, "
                                    f"which adapter_config.json 'sites' does not map")
            grouped.setdefault(f"{layers_path}.{m['layer']}.{sites[m['site']]}", {})[m["part"]] = value
        return grouped

    def parse(self, name: str, cfg: dict, tensors: dict) -> tuple[str, float, list[tuple[str, dict]]]:
        """Check the files completely; returns (activation, scaling, [(module, weights)])."""
        act, scale, sites, layers_path, hidden = self._check_config(name, cfg)
        plan: list[tuple[str, dict[str, torch.Tensor]]] = []
        for module, parts in sorted(self._group(name, tensors, sites, layers_path).items()):
            missing = set(_PARTS) - set(parts)
            if missing:
                raise BadInputError(f"bottleneck adapter {name!r}: {module} lacks {', '.join(sorted(missing))}")
            try:
                self.model.get_submodule(module)
            except AttributeError:
                raise BadInputError(f"bottleneck adapter {name!r} hooks {module!r}, which this base does not have; "
                                    f"check layers_path/sites or use the base it was trained on") from None
            b = parts["down.weight"].shape[0]
            want = {"down.weight": (b, hidden), "down.bias": (b,), "up.weight": (hidden, b), "up.bias": (hidden,)}
            for part, shape in want.items():
                if tuple(parts[part].shape) != shape:
                    raise BadInputError(f"bottleneck adapter {name!r}: {module} {part} has shape "
                                        f"{tuple(parts[part].shape)}, expected {shape} for this base")
            plan.append((module, parts))
        if not plan:
            raise BadInputError(f"bottleneck adapter {name!r} has no weights in adapter_model.safetensors")
        return act, scale, plan

    def add(self, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
        act, scale, plan = self.parse(name, config, tensors)
        hidden = getattr(self.model.config, "hidden_size", None)
        touched = set()
        for module, parts in plan:
            site = self.layers.get(module)
            if site is None:
                site = StackedBottleneck(hidden, self.cell, self.dtype, self.device)
                for _ in range(self.n_slots):
                    site.append_slot(None, act, 0.0)
                site.attach(self.model.get_submodule(module))
                self.layers[module] = site
            site.append_slot(parts, act, scale)
            touched.add(module)
        for module, site in self.layers.items():
            if module not in touched:
                site.append_slot(None, act, 0.0)
        self.n_slots += 1
        self._modules.append([m for m, _ in plan])
        return [m for m, _ in plan]

    def remove(self, slot: int) -> None:
        keep = [i for i in range(self.n_slots) if i != slot]
        del self._modules[slot]
        self.n_slots -= 1
        still = {m for mods in self._modules for m in mods}
        for module, site in list(self.layers.items()):
            site.keep_slots(keep)
            if module not in still:
                site.detach()
                del self.layers[module]
