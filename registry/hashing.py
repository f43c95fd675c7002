"""Content hashes: of files, of artifact folders, and of base models.

An artifact folder's digest is the sha256 of a manifest listing every file's relative path,
size and sha256, so the digest changes when any byte, name or file count changes.

A base model's fingerprint hashes its architecture config and every tensor's name, dtype,
shape and raw bytes read straight from the safetensors files (no torch needed), in name
order, so it does not depend on how the weights are sharded or ordered on disk.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from registry.errors import BadInputError, IntegrityError

_CHUNK = 1 << 20
# Config keys that say nothing about the function the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                         "quantization_config", "use_cache", "output_attentions", "output_hidden_states"}


def sha256_file(path: Path) -> str:
    """The hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_tree(root: Path) -> list[Path]:
    """Every regular file under `root`, sorted; refuses links and other special files."""
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BadInputError(f"{p} is a symbolic link: artifacts may hold regular files only")
        if p.is_file():
            files.append(p)
        elif not p.is_dir() and p.exists():  # (one that vanished while listing: a concurrent gc)
            raise BadInputError(f"{p} is not a regular file: artifacts may hold regular files only")
    return files


def tree_digest(root: Path) -> tuple[str, int]:
    """The manifest digest and total byte size of the folder `root`."""
    manifest = hashlib.sha256()
    total = 0
    for p in list_tree(root):
        size = p.stat().st_size
        total += size
        manifest.update(f"{p.relative_to(root).as_posix()}\0{size}\0{sha256_file(p)}\n".encode())
    return manifest.hexdigest(), total


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise IntegrityError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise IntegrityError(f"{path} is not a safetensors file (header length {n} is implausible)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise IntegrityError(f"{path} is not a safetensors file (header is not JSON: {e})") from None
    return header, 8 + n


def base_fingerprint(model_dir: Path) -> str:
    """Fingerprint of a model folder holding `config.json` and `*.safetensors` weights.

    Returns:
        `sha256:<hex>` over the architecture config and every tensor.

    Raises:
        BadInputError: the folder has no config.json or no safetensors weights.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    weights = sorted(model_dir.glob("*.safetensors"))
    if not config_path.is_file() or not weights:
        raise BadInputError(f"{model_dir} is not a model folder with config.json and *.safetensors weights")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    index = []  # (tensor name, file, data start, meta)
    for w in weights:
        header, start = read_safetensors_header(w)
        index += [(name, w, start, meta) for name, meta in header.items() if name != "__metadata__"]
    for name, path, start, meta in sorted(index, key=lambda t: t[0]):
        begin, end = meta["data_offsets"]
        h.update(f"{name}\0{meta['dtype']}\0{meta['shape']}\0".encode())
        with open(path, "rb") as f:
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise IntegrityError(f"{path} is truncated: tensor {name} ends past the end of the file")
                h.update(chunk)
                left -= len(chunk)
    return "sha256:" + h.hexdigest()
