"""Load a registered adapter version onto its base, and score models on domain data.

A helper for Python callers and the tests (the router, the composition engine and the audit
serve versions through `routing.engine` instead): a trained adapter back as a peft/hooked model
for inspection or further scoring. The artifact is read only through `Registry.artifact_path`
(its sha256 checked), and only onto a base with the fingerprint it was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.base import LoadedBase, check_compatible
from training.data import DEFAULT_MAX_LENGTH, Row, load_domain_data, read_rows, tokenize_rows
from training.methods import get_kind
from training.evaluation import evaluate, resolve_dtype


def load_version(registry, ref: str, base: str | os.PathLike | LoadedBase, *, trainable: bool = False
                 ) -> tuple[Any, Any, LoadedBase]:
    """A registered version loaded onto its base.

    Args:
        registry: a `registry.client.Registry`.
        ref: `NAME`, `NAME:3` or `NAME@alias`.
        base: a base spec (loaded the way the version's kind needs: 4-bit for qlora), or an
            already loaded base (used as it is; the adapter is attached to its model in place).
        trainable: leave the adapter's parameters trainable.

    Returns:
        (model with the adapter, VersionInfo, LoadedBase)

    Raises:
        IncompatibleBaseError: the base's fingerprint differs from the version's.
        IntegrityError: the artifact's files do not match the registry, or lack tensors.
    """
    info, path = registry.artifact_path(ref)
    adapter_kind = get_kind(info.kind)
    settings = adapter_kind.read_config(path)
    loaded = base if isinstance(base, LoadedBase) else adapter_kind.load_base(base, settings)
    check_compatible(info.base_fingerprint, loaded.fingerprint, f"adapter {info.ref}")
    model = adapter_kind.load(loaded.model, Path(path), trainable=trainable)
    model.eval()
    return model, info, loaded


def eval_loss(model, tokenizer, data: str | os.PathLike | list[Row], *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
              dtype: str = "auto", kind: str | None = None) -> dict[str, float]:
    """Mean next-token loss and perplexity of `model` on rows (a data file/folder or a list of rows).

    Pass `kind` when the model carries an adapter of that kind (qlora needs its CPU guard).

    Returns:
        {"loss", "perplexity", "tokens"}
    """
    rows = data if isinstance(data, list) else read_rows(data)
    examples = tokenize_rows(rows, tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return evaluate(model, examples, pad_id=pad, batch_size=batch_size, dtype=resolve_dtype(dtype),
                    adapter_kind=get_kind(kind) if kind else None)


def eval_split(data: str | os.PathLike, eval_data: str | os.PathLike | None = None,
               eval_fraction: float = 0.1) -> list[Row]:
    """The eval rows the trainer used for a domain (same deterministic hold-out)."""
    return load_domain_data(data, eval_data, eval_fraction).eval
