"""Sentence embeddings of held-out texts, computed once and kept (keyed by content hash).

Every router update calibrates and evaluates the router on every domain's frozen validation
rows, and every audit routes every domain's frozen eval rows. Those texts never change, and
the encoder is a fixed function of the text, so its output is cached per text: the update
after domain N encodes only the new domain's rows, whatever N is (issue 16). What stays
per-update is arithmetic on cached vectors: one [rows x domains] product, bounded by
(held-out rows) x (domains) multiply-adds of 384 floats.

The cache is active only inside `cached_embeddings()` (queries being served are not kept:
they would grow the cache without bound). Keys are the sha256 of the text under one encoder
description (name, sequence length, precision); values live in memory for the process and in
`$PLAIT_CACHE/router-embeddings/<key>.safetensors` (default `~/.cache/plait`) across processes,
written atomically (temp file + rename). A lost write only costs a re-encode.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("plait_embedding_cache", default=False)
_MEMORY: dict[str, dict[str, Any]] = {}  # encoder key -> {text sha256: [dim] float32 vector}
_DIRTY: set[str] = set()
_TERMS: dict[tuple, dict[int, float]] = {}  # (text, buckets, bigrams) -> hashed terms, this process
_LOCK = threading.Lock()
#: how many encoder calls filled the cache (for tests and the scale bench)
STATS = {"encoded_texts": 0, "cached_texts": 0}


def clear_memory_cache() -> None:
    """Forget the in-process copy (the next use reads the files again, as a new process would)."""
    with _LOCK:
        _MEMORY.clear()
        _DIRTY.clear()
        _TERMS.clear()


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
    if key not in _MEMORY:
        from safetensors.torch import load_file

        path = cache_dir() / f"{key}.safetensors"
        try:
            _MEMORY[key] = dict(load_file(str(path))) if path.is_file() else {}
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            _MEMORY[key] = {}
    return _MEMORY[key]


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

    key = _key(spec)
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    with _LOCK:
        table = _table(key)
        todo = list(dict.fromkeys(h for h in hashes if h not in table))
    if todo:
        first = {h: t for h, t in zip(hashes, texts)}
        vectors = encode([first[h] for h in todo])
        with _LOCK:
            for h, v in zip(todo, vectors):
                table[h] = v.clone()
            _DIRTY.add(key)
    STATS["encoded_texts"] += len(todo)
    STATS["cached_texts"] += len(texts) - len(todo)
    return torch.stack([table[h] for h in hashes])


def cached_terms(text: str, buckets: int, bigrams: bool, terms: Callable[..., dict[int, float]]):
    """`terms(text, buckets, bigrams)` (the word model's hashed terms), kept in memory while
    `cached_embeddings()` is active: calibration and evaluation read the same held-out texts."""
    if not _ACTIVE.get():
        return terms(text, buckets, bigrams)
    key = (text, buckets, bigrams)
    if key not in _TERMS:
        _TERMS[key] = terms(text, buckets, bigrams)
    return _TERMS[key]


def flush() -> None:
    """Write the tables that gained rows (atomically); failures are ignored (it is a cache)."""
    from safetensors.torch import save_file

    with _LOCK:
        dirty = [(k, dict(_MEMORY[k])) for k in _DIRTY if k in _MEMORY]
        _DIRTY.clear()
    for key, table in dirty:
        folder = cache_dir()
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({h: v.contiguous() for h, v in table.items()}, str(tmp))
            os.replace(tmp, folder / f"{key}.safetensors")
        except OSError:
            tmp.unlink(missing_ok=True)
