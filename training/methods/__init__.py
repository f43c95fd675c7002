"""The adapter kinds, one module each, registered by name.

Every module in this package registers itself on import with
`register_method(name, config_cls, module)`; the package imports all of its modules, so a
fourth kind is one new file here and nothing else. A kind's module provides:

    attach(model, config) -> model    a fresh adapter; only its parameters are trainable
    save(model, out_dir) -> Path      adapter_config.json + adapter_model.safetensors
    load(model, folder, trainable=False) -> model   refuses missing or extra tensors
    read_config(folder) -> config     the config an artifact was saved with
    disabled(model)                   a context manager in which outputs equal the base's

and may provide `base_kwargs(config)` (extra `training.base.load_base` arguments, e.g. 4-bit),
`prepare_base(model)` (run right after loading the base, before any forward),
`prepare_for_training(model)` / `prepare_for_eval(model)` (called by the trainer whenever it
switches mode) and `make_optimizer(params, lr, weight_decay)`. `Method` fills in defaults.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from registry.errors import BadInputError, NotFoundError


@dataclass(frozen=True)
class Method:
    """A registered adapter kind: its name, config dataclass and implementing module."""

    name: str
    config_cls: type
    module: ModuleType

    def make_config(self, **options: Any):
        """Build the kind's config from options, refusing ones the kind does not have."""
        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BadInputError(f"{self.name} adapters have no option {unknown[0]!r}; "
                                f"their options are: {', '.join(sorted(known))}")
        return self.config_cls(**options)

    @property
    def seeds_from(self) -> tuple[str, ...]:
        """The kinds whose stored weights can initialise this kind (its module's SEEDS_FROM; default itself)."""
        return tuple(getattr(self.module, "SEEDS_FROM", (self.name,)))

    def attach(self, model, config):
        return self.module.attach(model, config)

    def save(self, model, out_dir):
        return self.module.save(model, out_dir)

    def load(self, model, folder, trainable: bool = False):
        return self.module.load(model, folder, trainable=trainable)

    def read_config(self, folder):
        return self.module.read_config(folder)

    def disabled(self, model):
        return self.module.disabled(model)

    def base_kwargs(self, config, compute_dtype=None) -> dict[str, Any]:
        fn = getattr(self.module, "base_kwargs", None)
        return fn(config, compute_dtype) if fn else {}

    def load_base(self, spec, config=None, compute_dtype=None):
        """Load the base this kind trains on (e.g. 4-bit for qlora), ready for an adapter.

        Args:
            spec: anything `training.base.resolve_base` accepts.
            config: the kind's config (default: its defaults).
            compute_dtype: torch dtype the base computes in (default fp32).
        """
        from training.base import load_base

        config = config if config is not None else self.config_cls()
        base = load_base(spec, **self.base_kwargs(config, compute_dtype))
        import torch

        if torch.cuda.is_available() and not base.quantized:  # 4-bit bases are placed by their loader
            base.model.to("cuda")
        fn = getattr(self.module, "prepare_base", None)
        if fn:
            fn(base.model)
        return base

    def prepare_for_training(self, model) -> None:
        fn = getattr(self.module, "prepare_for_training", None)
        if fn:
            fn(model)

    def prepare_for_eval(self, model) -> None:
        fn = getattr(self.module, "prepare_for_eval", None)
        if fn:
            fn(model)

    def make_optimizer(self, params, lr: float, weight_decay: float = 0.0):
        fn = getattr(self.module, "make_optimizer", None)
        if fn:
            return fn(params, lr, weight_decay)
        import torch

        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, module: ModuleType) -> Method:
    """Register an adapter kind under `name` (called by each kind's module on import)."""
    if name in METHODS and METHODS[name].module is not module:
        raise ValueError(f"adapter kind {name!r} is registered twice ({METHODS[name].module.__name__}, {module.__name__})")
    METHODS[name] = Method(name, config_cls, module)
    return METHODS[name]


def get_method(name: str) -> Method:
    """The registered kind called `name`.

    Raises:
        NotFoundError: no such kind; the message lists the known ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise NotFoundError(f"unknown adapter kind {name!r}: use one of {', '.join(sorted(METHODS))}") from None


def count_trainable(model) -> int:
    """The number of parameters that will be trained (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
