"""The adapter kinds, one module each, registered by name.

A kind is a module in this package named after the kind (`lora.py` is the kind `lora`) that
calls `register_kind(name, config_cls, module)` on import. Everything else in plait (the
trainer's defaults, the CLI's `--method` choices, the composition engine, the registry
import, the merge baseline) asks this registry, so a new kind is one new file here and
nothing else. What a kind's module provides is the `AdapterKind` protocol below (torchtune's
`AdapterModule` and peft's `register_peft_method` are the models); `Kind` wraps a module
and fills in the optional parts.

The kinds' modules are imported on first use of `KINDS` / `get_kind`, not with this
package: their names (`kind_names()`) come from the file names, so the CLI can list the
choices without importing torch. A kind that owns a file format says which
adapter_config.json is its own with a literal `ARTIFACT_MATCH` (read from the module's source,
not by importing it), so `plait registry import` detects a folder's kind without torch.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import json
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from registry.errors import BadInputError, NotFoundError

if TYPE_CHECKING:
    from training.methods._stacking import SiteRegistry, Stacker


@runtime_checkable
class AdapterKind(Protocol):
    """What the module of an adapter kind provides (optional members are listed in `Kind`).

    Attributes:
        DEFAULT_LR: the learning rate the trainer uses when none is given.
        RANK_OPTION: the config field `--rank` sets (e.g. `r`, or `bottleneck_size`).
        ARTIFACT_MATCH: a literal dict saying which adapter_config.json is this kind's (see
            `artifact_matches`); required unless the kind writes another kind's files
            (`ARTIFACT_KIND` below).
    """

    DEFAULT_LR: float
    RANK_OPTION: str

    def attach(self, model, config):
        """A fresh adapter on `model`; only its parameters are trainable. Returns the wrapped model."""

    def save(self, model, out_dir: Path) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (nothing else) to `out_dir`."""

    def load(self, model, folder: Path, trainable: bool = False):
        """Put the adapter stored in `folder` onto `model`; refuses missing or extra tensors."""

    def read_config(self, folder: Path):
        """The config an artifact was saved with."""

    def disabled(self, model) -> contextlib.AbstractContextManager:
        """A context in which the model's outputs equal the base's."""

    def make_stacker(self, sites: SiteRegistry) -> Stacker:
        """The composition engine's holder of every loaded adapter of this kind's serving family."""


@dataclass(frozen=True)
class Kind:
    """A registered adapter kind: its name, config dataclass and implementing module.

    Optional module members, with the default used when a module lacks them:
        ARTIFACT_KIND (the kind's own name): the kind whose files this kind writes; qlora writes
            lora's files, so a folder alone is detected as lora and served by lora's family.
        SERVE_FAMILY (the kind's own name): kinds with one family share one engine stacker.
        MERGEABLE (False): whether `training.merge` can merge adapters of this kind.
        base_kwargs(config, compute_dtype) -> dict: extra `training.base.load_base` arguments.
        prepare_base(model): run right after loading the base, before any forward.
        prepare_for_training(model) / prepare_for_eval(model): called on every mode switch.
        make_optimizer(params, lr, weight_decay): default AdamW.
        unwrap(model) -> model | None: the wrapped model under this kind's wrapper, or None
            when `model` is not this kind's wrapper (used by `training.loss`).
    """

    name: str
    config_cls: type
    module: ModuleType

    @property
    def default_lr(self) -> float:
        return float(self.module.DEFAULT_LR)

    @property
    def rank_option(self) -> str:
        return self.module.RANK_OPTION

    @property
    def artifact_kind(self) -> str:
        return getattr(self.module, "ARTIFACT_KIND", self.name)

    @property
    def family(self) -> str:
        return getattr(self.module, "SERVE_FAMILY", self.name)

    @property
    def mergeable(self) -> bool:
        return bool(getattr(self.module, "MERGEABLE", False))

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

    def matches(self, config: dict) -> bool:
        """Whether an artifact's adapter_config.json (as a dict) is an artifact of this kind."""
        spec = getattr(self.module, "ARTIFACT_MATCH", None)
        return self.artifact_kind == self.name and spec is not None and artifact_matches(spec, config)

    def disabled(self, model):
        return self.module.disabled(model)

    def make_stacker(self, sites):
        return self.module.make_stacker(sites)

    def unwrap(self, model):
        fn = getattr(self.module, "unwrap", None)
        return fn(model) if fn else None

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


_KINDS: dict[str, Kind] = {}
_LOADED = False


def kind_names() -> tuple[str, ...]:
    """The names of the adapter kinds, sorted, read from this package's file names (no import)."""
    return tuple(sorted(i.name for i in pkgutil.iter_modules(__path__) if not i.name.startswith("_")))


def _load_all() -> dict[str, Kind]:
    global _LOADED
    if not _LOADED:
        for name in kind_names():
            importlib.import_module(f"{__name__}.{name}")
        missing = sorted(set(kind_names()) - set(_KINDS))
        if missing:
            raise ValueError(f"training/methods/{missing[0]}.py registers no kind named {missing[0]!r}")
        _LOADED = True
    return _KINDS


def __getattr__(name: str):
    # KINDS is loaded on first use so that `import training.methods` stays cheap (PEP 562)
    if name == "KINDS":
        return dict(sorted(_load_all().items()))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_kind(name: str, config_cls: type, module: ModuleType) -> Kind:
    """Register an adapter kind under `name` (called by each kind's module on import).

    Raises:
        TypeError: the module lacks a member of the `AdapterKind` protocol.
    """
    if name in _KINDS and _KINDS[name].module is not module:
        raise ValueError(f"adapter kind {name!r} is registered twice "
                         f"({_KINDS[name].module.__name__}, {module.__name__})")
    if not isinstance(module, AdapterKind):
        lacking = [m for m in ("DEFAULT_LR", "RANK_OPTION", "attach", "save", "load", "read_config",
                               "disabled", "make_stacker") if not hasattr(module, m)]
        raise TypeError(f"adapter kind {name!r} ({module.__name__}) lacks {', '.join(lacking)}")
    if getattr(module, "ARTIFACT_KIND", name) == name and not isinstance(getattr(module, "ARTIFACT_MATCH", None), dict):
        raise TypeError(f"adapter kind {name!r} ({module.__name__}) writes its own files but has no ARTIFACT_MATCH dict")
    _KINDS[name] = Kind(name, config_cls, module)
    return _KINDS[name]


def get_kind(name: str) -> Kind:
    """The registered kind called `name`.

    Raises:
        NotFoundError: no such kind; the message lists the known ones.
    """
    methods = _load_all()
    try:
        return methods[name]
    except KeyError:
        raise NotFoundError(f"unknown adapter kind {name!r}: use one of {', '.join(sorted(methods))}") from None


def mergeable_kinds() -> tuple[str, ...]:
    """The kinds whose adapters `training.merge` can merge."""
    return tuple(n for n, m in sorted(_load_all().items()) if m.mergeable)


def artifact_matches(spec: dict, config: dict) -> bool:
    """Whether an adapter_config.json (as a dict) meets a kind's `ARTIFACT_MATCH`.

    Each key of `spec` must hold in `config`: `True` means present and truthy, `False` absent
    or falsy, any other value equal (strings compared case-insensitively: PEFT writes
    `"LORA"`, older files `"lora"`).
    """
    for key, want in spec.items():
        have = config.get(key)
        if want is True or want is False:
            if bool(have) is not want:
                return False
        elif isinstance(want, str):
            if not isinstance(have, str) or have.casefold() != want.casefold():
                return False
        elif have != want:
            return False
    return True


@functools.cache
def _declared(name: str) -> dict[str, Any]:
    """A kind module's literal `ARTIFACT_KIND` and `ARTIFACT_MATCH`, read from its source
    without importing it (kinds' modules import torch, seconds that detection does not need).

    Raises:
        TypeError: the module assigns one of them something that is not a literal.
    """
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("ARTIFACT_KIND", "ARTIFACT_MATCH"):
                    try:
                        found[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        raise TypeError(f"training/methods/{name}.py: {target.id} must be a literal "
                                        f"(it is read without importing the module)") from None
    return found


def _owners() -> dict[str, dict]:
    """Kind name -> ARTIFACT_MATCH of the kinds that own their file format, without importing them."""
    owners = {}
    for name in kind_names():
        declared = _declared(name)
        if declared.get("ARTIFACT_KIND", name) == name and "ARTIFACT_MATCH" in declared:
            owners[name] = declared["ARTIFACT_MATCH"]
    return owners


def detect_kind(config: dict) -> str | None:
    """The kind whose artifact `config` (an adapter_config.json as a dict) is, or None.

    Only kinds that own their file format take part (`ARTIFACT_KIND` is their own name); a
    config that two kinds claim is refused rather than guessed. Imports no kind module.

    Raises:
        BadInputError: more than one kind claims the config.
    """
    found = [name for name, spec in _owners().items() if artifact_matches(spec, config)]
    if len(found) > 1:
        raise BadInputError(f"adapter config is claimed by the kinds {', '.join(found)}; it is ambiguous")
    return found[0] if found else None


def read_adapter_config(folder: str | Path) -> dict:
    """An artifact folder's adapter_config.json as a dict.

    Raises:
        NotFoundError: the file is missing.
        BadInputError: it is not a JSON object.
    """
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise NotFoundError(f"{path} is missing; an adapter folder needs adapter_config.json and "
                            f"adapter_model.safetensors")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON ({exc}); re-export the adapter") from exc
    if not isinstance(config, dict):
        raise BadInputError(f"{path} holds {type(config).__name__}, not a JSON object; re-export the adapter")
    return config


def detect_folder(folder: str | Path) -> str:
    """The kind of the artifact in `folder`, from its adapter_config.json.

    Raises:
        NotFoundError / BadInputError: no readable config, or no kind claims it (the message
            names the known kinds).
    """
    kind = detect_kind(read_adapter_config(folder))
    if kind is None:
        raise BadInputError(f"{Path(folder) / 'adapter_config.json'} is not an adapter of a known kind "
                            f"({', '.join(_owners())})")
    return kind


def count_trainable(model) -> int:
    """The number of parameters that will be trained (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
