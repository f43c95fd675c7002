"""Sentence embeddings and word-model terms of held-out texts, computed once and kept (keyed by
content hash).

Every router update calibrates and evaluates the router on every domain's frozen validation
rows, and every audit routes every domain's frozen eval rows. Those texts never change, and
the encoder is a fixed function of the text, so its output is cached per text: the update
after domain N encodes only the new domain's rows, whatever N is (issue 16). What stays
per-update is arithmetic on cached vectors: one [rows x domains] product, bounded by
(held-out rows) x (domains) multiply-adds of 384 floats. The lexical router's hashed terms of
those texts are kept the same way (`cached_term_arrays`).

The cache is active only inside `cached_embeddings()` (queries being served are not kept:
they would grow the cache without bound). Keys are the sha256 of the text under one encoder
description (name, sequence length, precision); values live in memory for the process and in
`$PLAIT_CACHE/router-embeddings/<key>/<x>.safetensors` (default `~/.cache/plait`; 16 shards
by the first hex digit of the text hash, so a new domain's few texts rewrite a few sixteenths
of the cache, not all of it) across processes, written atomically (temp file + rename). A lost
write only costs a re-encode.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("plait_embedding_cache", default=False)
_MEMORY: dict[str, dict[str, Any]] = {}  # encoder key -> {text sha256: its embedding or packed terms}
_DIRTY: dict[str, set[str]] = {}  # encoder key -> shards (first hex digit of the text hash) to write
_LOCK = threading.Lock()
#: how many encoder calls filled the cache (for tests and the scale bench)
STATS = {"encoded_texts": 0, "cached_texts": 0}


def clear_memory_cache() -> None:
    """Forget the in-process copy (the next use reads the files again, as a new process would)."""
    with _LOCK:
        _MEMORY.clear()
        _DIRTY.clear()


def cache_dir() -> Path:
    return Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait")) / "router-embeddings"


@contextlib.contextmanager
def cached_embeddings():
    """Within this block, `encode_cached` keeps every embedding it computes (and reuses them)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        flush()


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _table(key: str) -> dict[str, Any]:
    """The cached rows of one encoder: every shard file of `<cache>/<key>/` read once a process."""
    if key not in _MEMORY:
        table: dict[str, Any] = {}
        folder = cache_dir() / key
        for path in sorted(folder.glob("?.safetensors")) if folder.is_dir() else []:
            try:
                table.update(_read_shard(path))
            except Exception:  # noqa: BLE001 - a damaged shard is rebuilt, never trusted
                continue
        _MEMORY[key] = table
    return _MEMORY[key]


_SHARD_FORMAT = "plait-feature-shard-1"


def _pack(rows: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A shard as three tensors (every row flattened end to end, each row's shape, padded with
    -1) and its row keys in the metadata: one tensor to read, not one per row."""
    import torch

    hashes = sorted(rows)
    shapes = torch.full((len(hashes), 2), -1, dtype=torch.int64)
    for i, h in enumerate(hashes):
        shapes[i, :rows[h].dim()] = torch.tensor(rows[h].shape)
    data = torch.cat([rows[h].reshape(-1) for h in hashes]) if hashes else torch.zeros(0)
    return {"data": data.contiguous(), "shapes": shapes}, {"format": _SHARD_FORMAT, "keys": json.dumps(hashes)}


def _read_shard(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _SHARD_FORMAT:
            return {}
        data, shapes = f.get_tensor("data"), f.get_tensor("shapes")
    hashes = json.loads(meta["keys"])
    dims = [[d for d in row if d >= 0] for row in shapes.tolist()]
    sizes = [math.prod(d) for d in dims]
    if len(hashes) != len(dims) or sum(sizes) != data.numel():
        return {}
    return {h: part.view(*d) for h, part, d in zip(hashes, data.split(sizes), dims)}


def _mark(key: str, hashes) -> None:
    """Note the shards that gained rows (under _LOCK): `flush` rewrites those only, so a new
    domain's few texts cost a few small files, not the whole cache."""
    _DIRTY.setdefault(key, set()).update(h[:1] for h in hashes)


def _cached(key: str, texts: list[str], compute: Callable[[list[str]], list[Any]]) -> tuple[list[Any], int]:
    """The kept value of each text under `key`, `compute` called once on the texts not kept yet
    (their values are kept, and their shards marked for `flush`); and how many it computed."""
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    with _LOCK:
        table = _table(key)
        todo = list(dict.fromkeys(h for h in hashes if h not in table))
    if todo:
        first = {h: t for h, t in zip(hashes, texts)}
        values = compute([first[h] for h in todo])
        with _LOCK:
            table.update(zip(todo, values))
            _mark(key, todo)
    return [table[h] for h in hashes], len(todo)


def encode_cached(spec: dict[str, Any], texts: list[str], encode: Callable[[list[str]], Any]):
    """`encode(texts)`, reusing and keeping cached rows while `cached_embeddings()` is active.

    Args:
        spec: what determines the encoder's output besides the text (name, length, precision).
        texts: the inputs.
        encode: the encoder, called once on the texts not cached yet.
    """
    if not _ACTIVE.get() or not texts:
        return encode(texts)
    import torch

    rows, computed = _cached(_key(spec), texts, lambda todo: [v.clone() for v in encode(todo)])
    STATS["encoded_texts"] += computed
    STATS["cached_texts"] += len(texts) - computed
    return torch.stack(rows)


def cached_term_arrays(texts: list[str], buckets: int, bigrams: bool, terms: Callable[..., dict[int, float]]):
    """[(bucket indices int64, weights float64)] of `terms(text, buckets, bigrams)` (the word
    model's hashed terms) per text; kept beside the embeddings (memory and file) while
    `cached_embeddings()` is active, so an update or audit hashes only texts it has not seen."""
    import numpy as np

    def arrays(feats: dict[int, float]):
        return np.fromiter(feats.keys(), np.int64, len(feats)), np.fromiter(feats.values(), np.float64, len(feats))

    if not _ACTIVE.get() or not texts:
        return [arrays(terms(t, buckets, bigrams)) for t in texts]
    import torch

    def packed(todo: list[str]):  # [2, terms] float64: bucket indices (< 2**24: exact) over weights
        return [torch.from_numpy(np.stack([i.astype(np.float64), v]))
                for i, v in (arrays(terms(t, buckets, bigrams)) for t in todo)]

    key = _key({"terms": "crc32 words and word pairs, log1p counts", "buckets": buckets, "bigrams": bigrams})
    rows, _ = _cached(key, texts, packed)
    return [(m[0].astype(np.int64), m[1]) for m in (r.numpy() for r in rows)]


def flush() -> None:
    """Write the shards that gained rows (atomically); failures are ignored (it is a cache)."""
    from safetensors.torch import save_file

    with _LOCK:
        dirty = [(k, shards, {h: v for h, v in _MEMORY[k].items() if h[:1] in shards})
                 for k, shards in _DIRTY.items() if k in _MEMORY]
        _DIRTY.clear()
    for key, shards, rows in dirty:
        folder = cache_dir() / key
        for shard in sorted(shards):
            tmp = folder / f".{shard}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tensors, meta = _pack({h: v for h, v in rows.items() if h[:1] == shard})
                save_file(tensors, str(tmp), metadata=meta)
                os.replace(tmp, folder / f"{shard}.safetensors")
            except OSError:
                tmp.unlink(missing_ok=True)
