"""The composition engine: one base model, many adapters, a different routing per row.

`CompositionEngine` holds ONE copy of a causal LM (full precision, or 4-bit NF4 through
bitsandbytes, chosen at construction) and loads any number of adapters of every registered
kind (`training.methods.KINDS`) onto it at once. Every batch row carries its own `Routing`:
the base alone, one adapter, or a weighted top-k blend of adapters, and one forward pass
serves them all.

How it is organised
-------------------
The engine knows no adapter kind by name. Each kind's module in `training/methods/` tells it
how its folders are recognised (`detect_kind`), which serving family it belongs to, and gives
the family's `Stacker` (`make_stacker`): the object that parses the kind's files, keeps every
loaded adapter of the family stacked along a "slot" axis, and applies a per-row routing with
batched tensor ops. The engine keeps the names, slots and per-row routing; the stackers do the
maths (LoRA: `training/methods/lora.py`, bottleneck: `training/methods/bottleneck.py`, and
any kind added since, each documented in its own module). A linear layer adapted by several
families is wrapped once (`training.methods._stacking.LinearSite`) and runs its base matmul
once.

For LoRA (Hu et al. 2021, arXiv:2106.09685), row b routed to adapters idx[b, 0..k-1] with
weights w[b, 0..k-1] computes

    y_b = W x_b + sum_j w[b, j] * s_j * B_{idx[b,j]} A_{idx[b,j]} x_b

by gathering each row's A and B slices and running two `torch.bmm` calls (the "gather + batched
matmul" of Punica, arXiv:2310.18547, and S-LoRA, arXiv:2311.03285), so the cost does not grow
with the number of distinct adapters in the batch and there is no Python loop over rows or
groups. When every row uses the same adapter a plain matmul fast path is taken; when no row
uses a family its layers return the base output untouched. Bottleneck adapters (Houlsby et al.
2019; Pfeiffer et al. 2021) are forward hooks applying o + sum_j w[b, j] * s_j * up_j(act_j(down_j(o)))
the same way.

Kinds mix freely in one batch and even in one row: a row's entries of each family drive that
family's layers, and a row gets an exact zero delta from every layer of a family it does not
use. Weights are used as given (a router's normalised scores, or 1.0 for hard routing); they
are not renormalised. A top-k blend is the sum of the weighted per-layer deltas of its entries
(each entry's delta is what that adapter alone adds to the base output), which for LoRA equals
merging sum_j w_j s_j B_j A_j into W.

Residency: with `max_adapters=N` the engine holds at most N adapters. Adding one more
evicts the least recently used adapter that no running row holds and no pin keeps
(`routing.residency.Residency`, reachable as `engine.residency`; the `routed` context marks
its adapters as used), or refuses with `AdapterSlotsFullError` when every resident adapter is
held. Without a limit (the default) nothing is ever evicted.

Adapter weights are cast to the dtype of the model's hidden states (the compute dtype); a
4-bit base keeps its `Linear4bit` layers as the wrapped base layers. Padding is explicit:
texts are right-padded for scoring, left-padded for generation, and position ids always come
from the attention mask, so padding never changes a row's result.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from registry.errors import BadInputError, ConflictError, NotFoundError
from routing.residency import Residency
from training.evaluation import next_token_nll
from training.methods import detect_kind, get_kind, kind_names, read_adapter_config
from training.methods._stacking import KindRouting, SiteRegistry, Stacker

RoutingLike = Any  # Routing | str | None | Mapping[str, float] | Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Routing:
    """The routing of one row: a list of (adapter name, weight); empty means the base alone.

    Hard routing is one adapter with weight 1.0 (`Routing.one(name)`); a top-k blend lists k
    adapters with their weights (`Routing.blend({"a": 0.7, "b": 0.3})`). Weights are used as
    given. Entries with weight 0 are dropped.
    """

    adapters: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        clean: list[tuple[str, float]] = []
        seen: set[str] = set()
        for entry in self.adapters:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise BadInputError(f"routing entry {entry!r} is not a (adapter name, weight) pair")
            name, weight = entry
            if not isinstance(name, str) or not name:
                raise BadInputError(f"routing entry {entry!r}: the adapter name must be a non-empty string")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise BadInputError(f"routing weight {weight!r} for adapter {name!r} must be a finite number")
            if name in seen:
                raise BadInputError(f"adapter {name!r} appears twice in one routing; give each adapter once")
            seen.add(name)
            if weight != 0:
                clean.append((name, float(weight)))
        object.__setattr__(self, "adapters", tuple(clean))

    @classmethod
    def base(cls) -> Routing:
        """No adapter: the base model alone."""
        return cls(())

    @classmethod
    def one(cls, name: str, weight: float = 1.0) -> Routing:
        """Hard routing to one adapter."""
        return cls(((name, weight),))

    @classmethod
    def blend(cls, weights: Mapping[str, float] | Sequence[tuple[str, float]]) -> Routing:
        """A weighted blend, e.g. `Routing.blend({"news": 0.6, "law": 0.4})`."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        return cls(tuple((n, w) for n, w in items))

    @classmethod
    def merged(cls, pairs: Sequence[tuple[str, float]]) -> Routing:
        """A router's blend, where several domains may be served by one version (re-pointing moves
        a domain to another domain's version): the weights of a repeated adapter add up."""
        total: dict[str, float] = {}
        for name, weight in pairs:
            total[name] = total.get(name, 0.0) + weight
        return cls(tuple(total.items()))

    @classmethod
    def coerce(cls, value: RoutingLike) -> Routing:
        """Accept a Routing, None or "" (base), an adapter name, a {name: weight} mapping or
        a sequence of (name, weight) pairs."""
        if isinstance(value, Routing):
            return value
        if value is None or value == "":
            return cls.base()
        if isinstance(value, str):
            return cls.one(value)
        if isinstance(value, Mapping):
            return cls.blend(value)
        if isinstance(value, Sequence):
            return cls(tuple(tuple(e) if isinstance(e, list) else e for e in value))
        raise BadInputError(f"cannot use {value!r} as a routing: give None, an adapter name, "
                            f"a {{name: weight}} mapping or a list of (name, weight) pairs")

    @property
    def is_base(self) -> bool:
        return not self.adapters

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.adapters]


@dataclass
class AdapterInfo:
    """One adapter loaded on the engine."""

    name: str
    kind: str  # a registered adapter kind (training.methods.KINDS)
    path: Path
    slot: int  # index in the stacks of its serving family
    modules: list[str]  # module paths the adapter touches
    config: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def family(self) -> str:
        """The serving family whose stacker holds this adapter (e.g. lora for lora and qlora)."""
        return get_kind(self.kind).family


def _kinds() -> tuple[str, ...]:
    return kind_names()


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    """The dtype hidden states flow in (the input embedding's), also for a 4-bit model."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@dataclass
class DecodeState:
    """A batch being decoded step by step (`CompositionEngine.prefill` / `decode_step`).

    The KV cache holds, per layer, keys and values [B, heads, L, d] for L columns; `mask`
    [B, L] says which columns are a row's tokens (rows are left-padded, so every row's newest
    token is in the last column). `routes` is each row's routing.
    """

    cache: Any
    mask: torch.Tensor
    routes: list[Routing]

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        """Cache columns (the longest row's tokens, plus padding)."""
        return self.mask.shape[1]


class CompositionEngine:
    """One base model with many adapters, routed per row (see the module docstring).

    Args:
        model: a causal LM (e.g. `LoadedBase.model`); the engine wraps its targeted layers in place.
        tokenizer: its tokenizer, needed by the text methods (`encode`, `logits`, `loss`,
            `loss_matrix`, `generate`).
        fingerprint: the base fingerprint; when set, `add_adapter(..., fingerprint=)` refuses
            adapters trained on another base.
        quantized: whether the base is 4-bit (informational; see `AdapterInfo`).
        max_length: longest tokenised text accepted by the text methods (longer ones are cut).
        max_adapters: most adapters loaded at once (least recently used unheld ones are evicted
            to make room; see `routing.residency`); None = no limit.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, fingerprint: str | None = None,
                 quantized: bool = False, max_length: int = 2048, max_adapters: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.quantized = quantized
        self.max_length = max_length
        self.dtype = _hidden_dtype(model)
        self.device = next(model.parameters()).device
        self._lock = threading.RLock()
        self._adapters: dict[str, AdapterInfo] = {}
        self._sites = SiteRegistry(self.model, self.dtype, self.device)
        self._stackers: dict[str, Stacker] = {}  # serving family -> its stacker, made on first use
        self.residency = Residency(max_adapters, evict=self.remove_adapter)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_base(cls, spec: str = "smollm2", *, quantize_4bit: bool = False, dtype: torch.dtype | None = None,
                  compute_dtype: torch.dtype | None = None, max_length: int = 2048,
                  max_adapters: int | None = None) -> CompositionEngine:
        """Load a base with `training.base.load_base` and wrap it.

        Args:
            spec: the base (see `training.base.resolve_base`), default the shipped SmolLM2.
            quantize_4bit: load the base's linear layers as NF4 (bitsandbytes) instead of full precision.
            dtype: weight dtype (default fp32).
            compute_dtype: the 4-bit layers' compute dtype.
            max_adapters: most adapters loaded at once (None = no limit).
        """
        from training.base import load_base

        base = load_base(spec, dtype=dtype, quantize_4bit=quantize_4bit, compute_dtype=compute_dtype)
        return cls(base.model, base.tokenizer, fingerprint=base.fingerprint, quantized=base.quantized,
                   max_length=max_length, max_adapters=max_adapters)

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name (a copy)."""
        return dict(self._adapters)

    def add_adapter(self, name: str, folder: str | Path, kind: str | None = None, *,
                    fingerprint: str | None = None) -> AdapterInfo:
        """Load the adapter in `folder` under `name`.

        Args:
            name: the name rows use to route to it (any non-empty string, e.g. a ref "law:3").
            folder: a folder with adapter_config.json + adapter_model.safetensors.
            kind: a registered adapter kind (`training.methods.kind_names()`); None detects it
                from the config.
            fingerprint: the base fingerprint the adapter was trained on; checked against the
                engine's when both are known.

        Returns:
            The `AdapterInfo` of the loaded adapter.

        Raises:
            ConflictError: the name is taken.
            NotFoundError: the folder or one of its two files is missing.
            IncompatibleBaseError: the fingerprints differ.
            BadInputError: the files do not fit this base (unknown modules, shapes, options), or
                hold another kind than `kind`.
            AdapterSlotsFullError: `max_adapters` are loaded and every one is held (in flight or pinned).
        """
        with self.residency.loading(name):
            return self._add_adapter(name, folder, kind, fingerprint)

    def _add_adapter(self, name: str, folder: str | Path, kind: str | None, fingerprint: str | None) -> AdapterInfo:
        if not isinstance(name, str) or not name.strip():
            raise BadInputError(f"adapter name {name!r} must be a non-empty string")
        if name in self._adapters:
            raise ConflictError(f"an adapter named {name!r} is already loaded; remove_adapter({name!r}) first "
                                f"or pick another name")
        if fingerprint is not None and self.fingerprint is not None:
            from training.base import check_compatible

            check_compatible(fingerprint, self.fingerprint, f"adapter {name!r}")
        folder = Path(folder)
        config = read_adapter_config(folder)
        weights_path = folder / "adapter_model.safetensors"
        if not weights_path.is_file():
            raise NotFoundError(f"{weights_path} is missing; an adapter folder needs adapter_config.json and "
                                f"adapter_model.safetensors")
        adapter_kind = self._adapter_kind(name, folder, config, kind)
        from safetensors.torch import load_file

        tensors = load_file(str(weights_path), device="cpu")
        with self._lock:
            if name in self._adapters:  # loaded by another thread while the files were read
                raise ConflictError(f"an adapter named {name!r} is already loaded; remove_adapter({name!r}) first "
                                    f"or pick another name")
            stacker = self._stacker(adapter_kind)
            self.residency.make_room(name)  # evicts (or refuses) before the new adapter's slot exists
            slot = stacker.n_slots
            modules = stacker.add(name, config, tensors)
            info = AdapterInfo(name, adapter_kind.name, folder, slot, modules, config)
            self._adapters[name] = info
            self.residency.added(name)
        return info

    def _adapter_kind(self, name: str, folder: Path, config: dict, kind: str | None):
        """The kind to load `config` as: `kind` when its files are what the folder holds."""
        detected = detect_kind(config)
        if detected is None:
            raise BadInputError(f"{folder / 'adapter_config.json'} is not an adapter of a known kind; the engine "
                                f"serves {', '.join(_kinds())}")
        adapter_kind = get_kind(detected if kind is None else self._known_kind(kind))
        if adapter_kind.artifact_kind != detected:
            raise BadInputError(f"adapter {name!r} was given kind {kind!r} but {folder / 'adapter_config.json'} "
                                f"holds a {detected} adapter; pass kind={detected!r} or None")
        return adapter_kind

    @staticmethod
    def _known_kind(kind: str) -> str:
        if kind not in _kinds():
            raise BadInputError(f"unknown adapter kind {kind!r}; use one of {', '.join(_kinds())}")
        return kind

    def _stacker(self, adapter_kind) -> Stacker:
        """The stacker of `adapter_kind`'s serving family, made on first use."""
        stacker = self._stackers.get(adapter_kind.family)
        if stacker is None:
            stacker = self._stackers[adapter_kind.family] = adapter_kind.make_stacker(self._sites)
        return stacker

    @property
    def _lora_layers(self) -> dict[str, Any]:
        """The lora family's per-module stacks (a view kept for tests and debugging)."""
        return getattr(self._stackers.get("lora"), "layers", {})

    @property
    def _bn_sites(self) -> dict[str, Any]:
        """The bottleneck family's per-module stacks (a view kept for tests and debugging)."""
        return getattr(self._stackers.get("bottleneck"), "layers", {})

    def remove_adapter(self, name: str) -> None:
        """Unload adapter `name`; layers no adapter uses any more get their base module back.

        Raises:
            NotFoundError: no adapter of that name is loaded.
        """
        with self._lock:
            info = self._adapter(name)
            family = info.family
            del self._adapters[name]
            self.residency.forget(name)
            for other in self._adapters.values():
                if other.family == family and other.slot > info.slot:
                    other.slot -= 1
            self._stackers[family].remove(info.slot)

    def _adapter(self, name: str) -> AdapterInfo:
        info = self._adapters.get(name)
        if info is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise NotFoundError(f"adapter {name!r} is not loaded (loaded: {known}); add_adapter it first")
        return info

    # ------------------------------------------------------------------ routing

    def _kind_routing(self, rows: list[list[tuple[int, float]]], n_slots: int) -> KindRouting:
        k = max((len(r) for r in rows), default=0)
        if k == 0 or n_slots == 0:
            return KindRouting()
        first = rows[0]
        if k == 1 and len(first) == 1 and all(r == first for r in rows):
            return KindRouting(mode="single", slot=first[0][0], weight=first[0][1])
        idx = torch.zeros(len(rows), k, dtype=torch.long)
        w = torch.zeros(len(rows), k, dtype=torch.float32)
        for b, entries in enumerate(rows):
            for j, (slot, weight) in enumerate(entries):
                idx[b, j], w[b, j] = slot, weight
        return KindRouting(mode="mixed", idx=idx.to(self.device), w=w.to(device=self.device, dtype=self.dtype))

    def _resolve(self, routing: Sequence[RoutingLike] | RoutingLike, batch_size: int) -> list[Routing]:
        if isinstance(routing, (Routing, str, Mapping)) or routing is None:
            routes = [Routing.coerce(routing)] * batch_size  # one routing for the whole batch
        else:
            routes = [Routing.coerce(r) for r in routing]
        if len(routes) != batch_size:
            raise BadInputError(f"got {len(routes)} routings for a batch of {batch_size} rows; give one routing "
                                f"per row (or a single routing for all rows)")
        for r in routes:
            for n in r.names:
                self._adapter(n)
        return routes

    @contextmanager
    def routed(self, routing: Sequence[RoutingLike] | RoutingLike, batch_size: int) -> Iterator[list[Routing]]:
        """Within this context, forward passes of the wrapped model use `routing` per row.

        Args:
            routing: one routing per row, or one routing (name, mapping, Routing, None) for all rows.
            batch_size: the number of rows the model will be called with.
        """
        with self._lock:  # adapters cannot come or go between resolving names and the forward pass
            routes = self._resolve(routing, batch_size)
            rows: dict[str, list[list[tuple[int, float]]]] = {f: [[] for _ in routes] for f in self._stackers}
            for b, r in enumerate(routes):
                for n, w in r.adapters:
                    info = self._adapters[n]
                    rows[info.family][b].append((info.slot, w))
            for family, stacker in self._stackers.items():
                stacker.route(self._kind_routing(rows[family], stacker.n_slots))
            self.residency.touch(n for r in routes for n in r.names)
            try:
                yield routes
            finally:
                for stacker in self._stackers.values():
                    stacker.route(KindRouting())

    # ------------------------------------------------------------------ tensors in, tensors out

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over real tokens only, so left padding does not shift them."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                routing: Sequence[RoutingLike] | RoutingLike = None, **model_kwargs: Any) -> Any:
        """One forward pass of the base with per-row adapters.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T] (1 = token, 0 = padding); default all ones.
            routing: one routing per row, or one for all rows (None = base).
            **model_kwargs: passed to the model (e.g. past_key_values, use_cache).

        Returns:
            The model's output (with `.logits` [B, T, V]).

        Raises:
            BadInputError: unknown adapter names, or a routing count that differs from B.
        """
        if input_ids.dim() != 2:
            raise BadInputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        model_kwargs.setdefault("position_ids", self.position_ids(attention_mask))
        model_kwargs.setdefault("use_cache", False)
        with self.routed(routing, input_ids.shape[0]):
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                              **model_kwargs)

    # ------------------------------------------------------------------ text in

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise BadInputError("this engine has no tokenizer; build it with one (or from_base) to pass texts")
        return self.tokenizer

    def _texts(self, texts: Sequence[str] | str) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadInputError("texts must be a non-empty list of strings")
        return texts

    def _token_lists(self, texts: list[str]) -> list[list[int]]:
        ids = self._tok()(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise BadInputError(f"text {i} ({texts[i][:40]!r}) tokenises to nothing; give non-empty texts")
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        pad_id = self._tok().pad_token_id if self.tokenizer is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    def encode(self, texts: Sequence[str] | str, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and pad texts.

        Returns:
            (input_ids [B, T], attention_mask [B, T]).
        """
        if padding_side not in ("left", "right"):
            raise BadInputError(f"padding_side {padding_side!r} must be 'left' or 'right'")
        return self._pad(self._token_lists(self._texts(texts)), padding_side)

    def logits(self, texts: Sequence[str] | str, routing: Sequence[RoutingLike] | RoutingLike = None) -> torch.Tensor:
        """Logits [B, T, V] of right-padded texts (positions past a row's length are padding;
        `encode(texts)` gives the matching mask)."""
        ids, mask = self.encode(texts)
        return self.forward(ids, mask, routing).logits

    def _row_losses(self, ids: torch.Tensor, mask: torch.Tensor, label_mask: torch.Tensor,
                    routing: Sequence[RoutingLike] | RoutingLike) -> torch.Tensor:
        logits = self.forward(ids, mask, routing).logits
        tok = next_token_nll(logits, ids)
        lm = label_mask[:, 1:].to(logits.device).float()
        return ((tok * lm).sum(-1) / lm.sum(-1)).cpu()

    def _loss_inputs(self, texts: list[str], completions: Sequence[str] | None
                     ) -> tuple[list[list[int]], list[int]]:
        """Token lists and, per row, the index of the first token that counts in the loss."""
        if completions is None:
            rows = self._token_lists(texts)
            starts = [0] * len(rows)
        else:
            completions = list(completions)
            if len(completions) != len(texts):
                raise BadInputError(f"got {len(completions)} completions for {len(texts)} prompts; give one each")
            rows = self._token_lists([p + c for p, c in zip(texts, completions)])
            starts = [len(p) for p in self._token_lists(texts)]
        for i, (row, start) in enumerate(zip(rows, starts)):
            if len(row) - max(start, 1) < 1:
                raise BadInputError(f"text {i} ({texts[i][:40]!r}) has no token to score (it needs at least 2 "
                                    f"tokens, and a non-empty completion)")
        return rows, starts

    def loss(self, texts: Sequence[str] | str, routing: Sequence[RoutingLike] | RoutingLike = None, *,
             completions: Sequence[str] | None = None, batch_size: int = 8) -> torch.Tensor:
        """Per-row mean next-token cross-entropy (nats) under per-row routing.

        Args:
            texts: the texts; with `completions`, the prompts.
            routing: one routing per text, or one for all.
            completions: if given, the loss covers the completion tokens only (text = prompt + completion).
            batch_size: rows per forward pass.

        Returns:
            float32 tensor [len(texts)].
        """
        texts = self._texts(texts)
        routes = self._resolve(routing, len(texts))
        rows, starts = self._loss_inputs(texts, completions)
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            ids, mask = self._pad(chunk, "right")
            label_mask = mask.clone()
            for j, s in enumerate(starts[i:i + batch_size]):
                label_mask[j, :s] = 0
            out.append(self._row_losses(ids, mask, label_mask, routes[i:i + batch_size]))
        return torch.cat(out)

    def loss_matrix(self, texts: Sequence[str] | str, adapter_names: Sequence[str | None], *,
                    completions: Sequence[str] | None = None, batch_size: int = 16) -> torch.Tensor:
        """Loss of every text under every adapter, batched over adapters (AdapterCL scoring).

        Args:
            texts: the texts (or prompts, with `completions`).
            adapter_names: the adapters to score under; None scores under the base alone.
            batch_size: (text, adapter) rows per forward pass.

        Returns:
            float32 tensor [len(texts), len(adapter_names)].
        """
        texts = self._texts(texts)
        names = list(adapter_names)
        if not names:
            raise BadInputError("adapter_names is empty; give at least one adapter name (None = base)")
        for n in names:
            if n is not None:
                self._adapter(n)
        rows, starts = self._loss_inputs(texts, completions)
        pairs = [(t, a) for t in range(len(texts)) for a in range(len(names))]
        out = torch.empty(len(texts), len(names))
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            ids, mask = self._pad([rows[t] for t, _ in chunk], "right")
            label_mask = mask.clone()
            for j, (t, _) in enumerate(chunk):
                label_mask[j, :starts[t]] = 0
            losses = self._row_losses(ids, mask, label_mask, [names[a] for _, a in chunk])
            for (t, a), v in zip(chunk, losses):
                out[t, a] = v
        return out

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     routing: Sequence[RoutingLike] | RoutingLike = None, *, max_new_tokens: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                     on_step: Callable[[torch.Tensor, torch.Tensor], bool | None] | None = None) -> torch.Tensor:
        """Generate from left-padded token ids with a KV cache; each row keeps its routing.

        Args:
            input_ids: [B, T] left-padded prompts.
            attention_mask: [B, T]; default all ones.
            routing: one routing per row, or one for all.
            max_new_tokens: tokens to generate at most.
            do_sample: sample (with temperature and nucleus top_p) instead of greedy decoding.
            seed: seeds the sampling generator, making sampling reproducible.
            eos_token_id: stop token(s); default the tokenizer's / model's.
            on_step: called after every decoding step with the step's new token ids [B] and the
                rows that have emitted eos so far [B] (both on the CPU), e.g. to stream tokens
                while the batch is still running (`plait serve`). Returning True stops
                generation after this step (e.g. every row reached its own length limit).

        Returns:
            [B, n] new token ids; rows that stopped early are filled with the pad id after eos.
        """
        if max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens {max_new_tokens} must be at least 1")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise BadInputError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = self._eos_ids(eos_token_id)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
        gen = None
        if do_sample:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device).long()
        positions = self.position_ids(mask)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        eos_t = torch.tensor(eos, device=self.device) if eos else None
        new: list[torch.Tensor] = []
        cache_kw = self._cache_kwarg()
        cache = self._new_cache()
        step_ids, step_pos = ids, positions
        with self.routed(routing, ids.shape[0]):
            for _ in range(max_new_tokens):
                # the cache object is filled in place, so it needs no reading back from the output
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 use_cache=True, **{cache_kw: cache})
                logits = out.logits[:, -1].float()
                nxt = self._pick(logits, do_sample, temperature, top_p, gen)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                new.append(nxt)
                if eos_t is not None:
                    done |= torch.isin(nxt, eos_t)
                if on_step is not None and on_step(nxt.cpu(), done.cpu()):
                    break
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(new, dim=1).cpu()

    # ------------------------------------------------------------------ step by step (continuous batching)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Sequence[int]], routing: Sequence[RoutingLike] | RoutingLike = None
                ) -> tuple[DecodeState, torch.Tensor]:
        """Run prompts through the model once, keeping their KV cache for `decode_step`.

        Together, `prefill`, `decode_step`, `join_states` and `keep_rows` let a scheduler decode a
        batch whose rows come and go between steps (`plait serve --scheduler continuous`): a row
        decoded this way gets the same tokens as `generate_ids` gives it alone (the padding is
        masked and its positions count its own tokens only).

        Args:
            rows: the prompts' token ids (each non-empty); they are left-padded.
            routing: one routing per row, or one for all.

        Returns:
            (the batch's decoding state, the logits [B, V] (float32) of each row's next token).
        """
        rows = [list(r) for r in rows]
        if not rows or not all(rows):
            raise BadInputError("prefill needs at least one prompt, and every prompt needs a token")
        ids, mask = self._pad(rows, "left")
        ids, mask = ids.to(self.device), mask.to(self.device)
        routes = self._resolve(routing, len(rows))
        state = DecodeState(self._new_cache(), mask, routes)
        with self.routed(routes, len(rows)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=self.position_ids(mask),
                             use_cache=True, **{self._cache_kwarg(): state.cache})
        return state, out.logits[:, -1].float()

    @torch.inference_mode()
    def decode_step(self, state: DecodeState, next_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Feed one token per row (the one picked from the previous logits); returns the next logits.

        Args:
            state: from `prefill` (or `join_states` / `keep_rows`); updated in place.
            next_ids: [B] the token each row decodes next.

        Returns:
            float32 logits [B, V] of each row's following token.
        """
        next_ids = torch.as_tensor(next_ids, dtype=torch.long, device=self.device).reshape(-1)
        if next_ids.shape[0] != state.size:
            raise BadInputError(f"got {next_ids.shape[0]} tokens for a decoding state of {state.size} rows")
        # the new token's position is the count of the row's real tokens so far (padding does not count)
        positions = state.mask.sum(-1, keepdim=True)
        mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        with self.routed(state.routes, state.size):
            out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_kwarg(): state.cache})
        state.mask = mask
        return out.logits[:, -1].float()

    @staticmethod
    def _layers(state: DecodeState) -> list[Any]:
        from transformers.cache_utils import DynamicLayer

        layers = list(getattr(state.cache, "layers", []))
        if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            raise BadInputError("step-by-step decoding needs a model whose KV cache is a plain DynamicCache "
                                "(no sliding-window or static layers); use generate_ids for this model")
        return layers

    @torch.inference_mode()
    def join_states(self, a: DecodeState, b: DecodeState) -> DecodeState:
        """One state with the rows of `a` then those of `b` (the shorter is left-padded with masked zeros).

        Both states must be at a step boundary (every row has been fed the same steps since it
        joined). `a` and `b` must not be used afterwards.
        """
        width = max(a.width, b.width)
        parts = []
        for s in (a, b):
            pad = width - s.width
            mask = torch.cat([torch.zeros_like(s.mask[:, :1]).expand(-1, pad), s.mask], 1) if pad else s.mask
            parts.append((s, pad, mask))
        for la, lb in zip(self._layers(a), self._layers(b)):
            for name in ("keys", "values"):
                tensors = []
                for layer, (_, pad, _) in zip((la, lb), parts):
                    t = getattr(layer, name)
                    if pad:  # zeros under a masked position never reach the softmax
                        t = torch.cat([t.new_zeros(*t.shape[:-2], pad, t.shape[-1]), t], dim=-2)
                    tensors.append(t)
                setattr(la, name, torch.cat(tensors, dim=0))
        return DecodeState(a.cache, torch.cat([parts[0][2], parts[1][2]], 0), a.routes + b.routes)

    @torch.inference_mode()
    def keep_rows(self, state: DecodeState, rows: Sequence[int]) -> DecodeState | None:
        """The state with only `rows` (indices into the batch, in the order given); None when empty.

        Columns that are padding in every row kept are dropped, so a long row that leaves
        takes its cache length with it.
        """
        rows = list(rows)
        if not rows:
            return None
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = state.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).long().argmax())  # the first column some kept row uses
        for layer in self._layers(state):
            layer.keys = layer.keys.index_select(0, idx)[..., start:, :]
            layer.values = layer.values.index_select(0, idx)[..., start:, :]
        return DecodeState(state.cache, mask[:, start:], [state.routes[i] for i in rows])

    def _cache_kwarg(self) -> str:
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            gc = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              gen: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def generate(self, texts: Sequence[str] | str, routing: Sequence[RoutingLike] | RoutingLike = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False) -> list[str]:
        """Generate a continuation for each text (batched, left-padded, KV cache).

        Args:
            texts: the prompts.
            routing: one routing per prompt, or one for all.
            max_new_tokens, do_sample, temperature, top_p, seed: as in `generate_ids`.
            chat: wrap each prompt as a user message with the tokenizer's chat template.

        Returns:
            The generated texts (special tokens removed), in input order.
        """
        texts = self._texts(texts)
        tok = self._tok()
        if chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
            rows = tok(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        else:
            rows = self._token_lists(texts)
        ids, mask = self._pad(rows, "left")
        out = self.generate_ids(ids, mask, routing, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, seed=seed)
        return tok.batch_decode(out, skip_special_tokens=True)
