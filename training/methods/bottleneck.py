"""Bottleneck adapters (Houlsby / Pfeiffer), written for plait.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
https://arxiv.org/abs/1902.00751 (an adapter after the attention and after the MLP
sublayer of every block); Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning", https://arxiv.org/abs/2005.00247 (one adapter after
the MLP sublayer only). An adapter is a small residual bottleneck

    o ──► down [H -> b] ──► act ──► up [b -> H] ── * scaling ──(+)──► o'
    └─────────────────────────────────────────────────────────┘

with b = H // reduction_factor and `up` zero-initialised, so a fresh adapter is the
identity. It is applied by a forward hook on the module `<layers_path>.{i}.<site module>`
that replaces its output o (the first element when it returns a tuple) by o' - no base
code is edited, so any architecture works once its module names are given. Defaults exist
for Llama-style (`model.layers.{i}.self_attn` / `.mlp`) and BERT-style
(`encoder.layer.{i}.attention.output` / `.output`) models.

(AdapterHub's `adapters` library pins transformers 4.x and saves pickle files, hence ours.)
The artifact: `adapter_config.json` (`adapter_config()` below writes its schema) +
`adapter_model.safetensors` with `layers.{i}.{site}.{down,up}.{weight,bias}`. The composition
engine serves it through `make_stacker` (`training/methods/_bottleneck_stack.py`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from registry.errors import BadInputError, IntegrityError
from registry.names import whole_number
from training.methods import register_kind

DEFAULT_LR = 1e-3
RANK_OPTION = "bottleneck_size"
#: a plait bottleneck config
ARTIFACT_MATCH = {"plait_adapter": "bottleneck"}
PLACEMENTS = {"pfeiffer": ("mlp",), "houlsby": ("attn", "mlp")}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: (layers_path, {site: module name inside a block}) tried in order when none is given
ARCH_DEFAULTS = (
    ("model.layers", {"mlp": "mlp", "attn": "self_attn"}),                            # Llama, Mistral, Qwen
    ("encoder.layer", {"mlp": "output", "attn": "attention.output"}),                 # BertModel
    ("bert.encoder.layer", {"mlp": "output", "attn": "attention.output"}),            # Bert heads
    ("roberta.encoder.layer", {"mlp": "output", "attn": "attention.output"}),
    ("transformer.h", {"mlp": "mlp", "attn": "attn"}),                                # GPT-2
)


@dataclass
class BottleneckSettings:
    """Options of a bottleneck adapter."""

    placement: str = "pfeiffer"
    """pfeiffer: after the MLP of each block; houlsby: after attention and after the MLP"""
    reduction_factor: int = 16
    """bottleneck size = hidden size // reduction_factor"""
    bottleneck_size: int | None = None
    """set the bottleneck size directly (overrides reduction_factor)"""
    non_linearity: str = "relu"
    """activation between down and up: relu, gelu, silu or tanh"""
    scaling: float = 1.0
    """the adapter's output is multiplied by this before the residual add"""
    layers_path: str | None = None
    """dotted path of the block list (e.g. model.layers); None = the architecture's default"""
    sites: dict[str, str] | None = None
    """{"mlp": module, "attn": module} inside each block; None = the architecture's default"""

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise BadInputError(f"bottleneck placement {self.placement!r} is invalid: use pfeiffer or houlsby")
        whole_number(self.reduction_factor, "bottleneck reduction factor", 1, example=16)
        if self.bottleneck_size is not None:
            whole_number(self.bottleneck_size, "bottleneck size", 1)
        if self.non_linearity not in ACTIVATIONS:
            raise BadInputError(f"bottleneck non-linearity {self.non_linearity!r} is invalid: "
                                f"use one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool) or self.scaling <= 0:
            raise BadInputError(f"bottleneck scaling {self.scaling!r} is invalid: use a number > 0 (e.g. 1.0)")
        if self.sites is not None:
            needed = PLACEMENTS[self.placement]
            if not isinstance(self.sites, dict) or any(not isinstance(self.sites.get(s), str) for s in needed):
                raise BadInputError(f"bottleneck sites {self.sites!r} are invalid: placement {self.placement} "
                                    f"needs module names for {', '.join(needed)}, e.g. {{'mlp': 'mlp', 'attn': 'self_attn'}}")


class Bottleneck(nn.Module):
    """down -> act -> up, with `up` zero-initialised (a fresh adapter adds exactly zero)."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class BottleneckAdapters(nn.Module):
    """All adapters of a model; its state_dict keys are the artifact's (`layers.{i}.{site}...`)."""

    def __init__(self, num_layers: int, sites: tuple[str, ...], hidden: int, size: int, activation: str):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({s: Bottleneck(hidden, size, activation) for s in sites}) for _ in range(num_layers))


class BottleneckModel(nn.Module):
    """A base model with bottleneck adapters hooked onto its blocks.

    Attribute access falls through to the base, so `config`, `generate` etc. work as on it.
    """

    def __init__(self, base: nn.Module, config: dict, adapters: BottleneckAdapters):
        super().__init__()
        self.base = base
        self.adapter_config = config
        self.adapters = adapters
        self.enabled = True
        self._handles = []
        scaling = float(config["scaling"])
        for i, block in enumerate(_blocks(base, config["layers_path"])):
            for site in PLACEMENTS[config["placement"]]:
                target = _submodule(block, config["sites"][site], f"{config['layers_path']}.{i}")
                self._handles.append(target.register_forward_hook(self._hook(adapters.layers[i][site], scaling)))

    def _hook(self, adapter: Bottleneck, scaling: float):
        def hook(module, args, output):
            if not self.enabled:
                return None
            o = output[0] if isinstance(output, tuple) else output
            delta = adapter(o.to(adapter.down.weight.dtype) if not torch.is_autocast_enabled(o.device.type) else o)
            new = o + (scaling * delta).to(o.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Outputs equal the base's inside this context."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> nn.Module:
        """Take the hooks off and return the bare base."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.base


def _blocks(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        raise BadInputError(f"{type(model).__name__} has no module {path!r} holding its blocks; "
                            f"set layers_path (e.g. model.layers or encoder.layer)") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise BadInputError(f"{path!r} in {type(model).__name__} is not a list of blocks; "
                            f"set layers_path to the ModuleList of transformer blocks")
    return blocks


def _submodule(block: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in block.named_children())
        raise BadInputError(f"module {where}.{name} does not exist in this architecture (the block has: {children}); "
                            f"set sites to the block's attention/MLP module names") from None


def resolve_layout(model: nn.Module, settings: BottleneckSettings) -> tuple[str, dict[str, str]]:
    """The block list path and site module names to use on `model`."""
    if settings.layers_path is not None:
        sites = settings.sites or dict(ARCH_DEFAULTS).get(settings.layers_path, ARCH_DEFAULTS[0][1])
        return settings.layers_path, dict(sites)
    for path, sites in ARCH_DEFAULTS:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path, dict(settings.sites or sites)
    raise BadInputError(f"{type(model).__name__} has none of the known block lists "
                        f"({', '.join(p for p, _ in ARCH_DEFAULTS)}); set layers_path and sites")


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(hidden, int):
        raise BadInputError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size")
    return hidden


def adapter_config(model: nn.Module, settings: BottleneckSettings) -> dict:
    """The artifact's `adapter_config.json` for `settings` on `model`, checking the modules exist."""
    path, sites = resolve_layout(model, settings)
    placement_sites = {s: sites[s] for s in PLACEMENTS[settings.placement]}
    blocks = _blocks(model, path)
    for i, block in enumerate(blocks):
        for s, name in placement_sites.items():
            _submodule(block, name, f"{path}.{i}")
    hidden = _hidden_size(model)
    size = settings.bottleneck_size or hidden // settings.reduction_factor
    if size < 1:
        raise BadInputError(f"bottleneck reduction factor {settings.reduction_factor} leaves no units for hidden size "
                            f"{hidden}: use a factor <= {hidden}")
    return {"plait_adapter": "bottleneck", "placement": settings.placement,
            "reduction_factor": settings.reduction_factor, "bottleneck_size": size, "hidden_size": hidden,
            "non_linearity": settings.non_linearity, "layers_path": path, "sites": placement_sites,
            "num_layers": len(blocks), "scaling": float(settings.scaling)}


def _build(model: nn.Module, config: dict) -> BottleneckModel:
    sites = PLACEMENTS[config["placement"]]
    adapters = BottleneckAdapters(config["num_layers"], sites, config["hidden_size"], config["bottleneck_size"],
                                  config["non_linearity"])
    device = next(model.parameters()).device
    return BottleneckModel(model, config, adapters.to(device))


def attach(model: nn.Module, settings: BottleneckSettings) -> BottleneckModel:
    """Hook fresh bottleneck adapters onto `model`; only the adapters train."""
    config = adapter_config(model, settings)
    model.requires_grad_(False)
    wrapped = _build(model, config)
    wrapped.adapters.requires_grad_(True)
    return wrapped


def save(model: BottleneckModel, out_dir: Path) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(model.adapter_config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.adapters.state_dict().items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _read_json(folder: Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path} is not a readable adapter config ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("plait_adapter") != "bottleneck":
        raise BadInputError(f"{path} is not a plait bottleneck adapter config (no \"plait_adapter\": \"bottleneck\")")
    return cfg


def read_config(folder: Path) -> BottleneckSettings:
    cfg = _read_json(folder)
    return BottleneckSettings(placement=cfg["placement"], reduction_factor=int(cfg["reduction_factor"]),
                              bottleneck_size=int(cfg["bottleneck_size"]), non_linearity=cfg["non_linearity"],
                              scaling=float(cfg["scaling"]), layers_path=cfg["layers_path"], sites=dict(cfg["sites"]))


def load(model: nn.Module, folder: Path, trainable: bool = False) -> BottleneckModel:
    """Hook the adapters stored in `folder` onto the base `model`.

    Raises:
        IncompatibleBaseError / BadInputError: the architecture lacks the named modules or sizes differ.
        IntegrityError: the weights file lacks a tensor or has an extra or misshapen one.
    """
    from safetensors.torch import load_file

    cfg = _read_json(folder)
    expected = adapter_config(model, read_config(folder))
    for key in ("hidden_size", "num_layers"):
        if expected[key] != cfg[key]:
            raise BadInputError(f"{folder} was made for {key} {cfg[key]}, but this base has {expected[key]}; "
                                f"load it on the base it was trained on")
    model.requires_grad_(False)
    wrapped = _build(model, cfg)
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    own = wrapped.adapters.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        wrapped.remove()
        raise IntegrityError(f"{folder} does not match its config: "
                             + (f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}")
                             + f" ({len(missing)} missing, {len(extra)} unexpected); re-save the adapter")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            wrapped.remove()
            raise IntegrityError(f"{folder}: tensor {k} has shape {list(v.shape)}, expected {list(own[k].shape)}")
    wrapped.adapters.load_state_dict(tensors, strict=True)
    wrapped.adapters.requires_grad_(trainable)
    return wrapped


def disabled(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def unwrap(model):
    """The base under a `BottleneckModel`, or None when `model` is not one."""
    return model.base if isinstance(model, BottleneckModel) else None


def make_stacker(sites):
    """The composition engine's stack of bottleneck adapters (`BottleneckStacker`)."""
    from training.methods._bottleneck_stack import BottleneckStacker

    return BottleneckStacker(sites)


register_kind("bottleneck", BottleneckSettings, sys.modules[__name__])
