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
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, IntegrityError

_CHUNK = 1 << 20
# Config keys that say nothing about the function the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                         "quantization_config", "use_cache", "output_attentions", "output_hidden_states"}


def sha256_file(path: Path, st: os.stat_result | None = None) -> str:
    """The hex sha256 of one file, read in 1 MiB chunks; an unchanged file is read once.

    The digest is kept (in memory and in `hash_cache_path()`) under the file's path, size,
    mtime_ns, ctime_ns and inode: any write changes its ctime, which user code cannot set
    back, so a changed file is always read again. A file changed less than `RACY_NS` ago is
    not kept (timestamps tick coarsely: a write in the same tick as the hash would keep the
    old stamp), as git does with its racily clean index entries.
    """
    key = _stat_key(Path(path), st)
    digest = _MEMO.get(key) or _cache_get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        HASH_STATS["hashed"] += 1
        if time.time_ns() - max(key[2], key[3]) > RACY_NS:  # mtime, ctime
            _cache_put(key, digest)
    else:
        HASH_STATS["cached"] += 1
    if time.time_ns() - max(key[2], key[3]) > RACY_NS:  # mtime, ctime
        _MEMO[key] = digest
    return digest


# ----------------------------------------------------------------------------- the hash cache
#: files changed this recently (ns) are hashed every time (see sha256_file)
RACY_NS = 2_000_000_000
#: files read and digests reused, in this process (for tests and the scale bench)
HASH_STATS = {"hashed": 0, "cached": 0}
_MEMO: dict[tuple, str] = {}
_PRELOADED: set[str] = set()  # folders whose kept digests `preload_cache` has read into _MEMO
_DB: list = []  # [sqlite3.Connection] once opened; [None] when the cache cannot be used
_DB_LOCK = threading.Lock()


def hash_cache_path() -> Path:
    """Where digests are kept across processes: `$PLAIT_CACHE/file-hashes.db` (default ~/.cache/plait)."""
    return Path(os.environ.get("PLAIT_CACHE", Path.home() / ".cache" / "plait")) / "file-hashes.db"


def clear_memory_cache() -> None:
    """Forget the in-process digests and connection (as a new process would start)."""
    with _DB_LOCK:
        _MEMO.clear()
        _PRELOADED.clear()
        if _DB and _DB[0] is not None:
            _DB[0].close()
        _DB.clear()


def _stat_key(path: Path, st: os.stat_result | None = None) -> tuple:
    """(absolute path, size, mtime_ns, ctime_ns, inode): a digest is reused only under the same key;
    `st` is the file's stat when the caller already has it."""
    st = st if st is not None else os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _db():
    import sqlite3

    if not _DB:
        try:
            where = hash_cache_path()
            where.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(where), timeout=1.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # a cache: a lost row costs one re-hash
            conn.execute("CREATE TABLE IF NOT EXISTS file_hash (path TEXT PRIMARY KEY, size INTEGER, "
                         "mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER, sha256 TEXT)")
            _DB.append(conn)
        except (OSError, sqlite3.Error):
            _DB.append(None)
    return _DB[0]


def _cache_get(key: tuple) -> str | None:
    import sqlite3

    with _DB_LOCK:
        try:
            conn = _db()
            row = conn.execute("SELECT size, mtime_ns, ctime_ns, ino, sha256 FROM file_hash WHERE path = ?",
                               (key[0],)).fetchone() if conn else None
        except sqlite3.Error:
            return None
    return row[4] if row and tuple(row[:4]) == key[1:] else None


def _cache_put(key: tuple, digest: str) -> None:
    import sqlite3

    with _DB_LOCK:
        try:
            conn = _db()
            if conn:
                conn.execute("INSERT OR REPLACE INTO file_hash VALUES (?, ?, ?, ?, ?, ?)", (*key, digest))
        except sqlite3.Error:
            pass


def preload_cache(folder: Path) -> None:
    """Read the kept digests of every file under `folder` with one query, for a check about to
    ask for thousands (one query a file otherwise; files hashed later are looked up one by one). Only entries whose stat key still matches
    are ever used (`sha256_file`), so a stale row costs nothing but memory."""
    import sqlite3

    prefix = os.path.join(os.path.abspath(folder), "")
    with _DB_LOCK:
        if prefix in _PRELOADED:  # once until the memory cache is cleared
            return
        _PRELOADED.add(prefix)
        try:
            conn = _db()
            rows = conn.execute("SELECT path, size, mtime_ns, ctime_ns, ino, sha256 FROM file_hash "
                                "WHERE path >= ? AND path < ?", (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
                                ).fetchall() if conn else []
        except sqlite3.Error:
            return
    now = time.time_ns()
    for path, size, mtime_ns, ctime_ns, ino, digest in rows:
        if now - max(mtime_ns, ctime_ns) > RACY_NS:
            _MEMO[(path, size, mtime_ns, ctime_ns, ino)] = digest


def list_tree(root: Path) -> list[Path]:
    """Every regular file under `root`, sorted; refuses links and other special files."""
    return [Path(p) for p, _ in _walk(str(root))]


def _walk(root: str) -> list[tuple[str, os.stat_result]]:
    """(path, stat) of every regular file under `root`, sorted by path; one directory read per
    folder (the entry types come with it) and one stat per file, for audits that check
    thousands of folders (plain strings: pathlib objects cost more than the syscalls here).
    Refuses links and other special files."""
    files: list[tuple[str, os.stat_result]] = []
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):  # (vanished while listing: a concurrent gc)
            continue
        for e in entries:
            if e.is_symlink():
                raise BadInputError(f"{e.path} is a symbolic link: artifacts may hold regular files only")
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file(follow_symlinks=False):
                try:
                    files.append((e.path, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
            else:
                raise BadInputError(f"{e.path} is not a regular file: artifacts may hold regular files only")
    return sorted(files, key=lambda f: f[0].split(os.sep))  # = pathlib's order (by parts), which digests keep


def tree_digest(root: Path) -> tuple[str, int]:
    """The manifest digest and total byte size of the folder `root`."""
    manifest = hashlib.sha256()
    total = 0
    top = os.path.join(str(root), "")
    for p, st in _walk(str(root)):
        total += st.st_size
        rel = p[len(top):].replace(os.sep, "/")
        manifest.update(f"{rel}\0{st.st_size}\0{sha256_file(p, st)}\n".encode())
    return manifest.hexdigest(), total


#: bits per element of every dtype the safetensors format defines
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
                          "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                          "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
                          "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts.

    The whole header is checked against the file, so a file that passes can be loaded: a
    JSON object whose `__metadata__` (optional) maps strings to strings and whose every other
    entry is a tensor with a known `dtype`, a `shape` of whole numbers >= 0 and `data_offsets`
    [begin, end] whose length is the dtype's size times the shape's product; the tensors'
    byte ranges tile the data section exactly (no gap, no overlap, nothing past the end).

    Raises:
        IntegrityError: the file is not a well-formed safetensors file; names the first fault.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise IntegrityError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise IntegrityError(f"{path} is not a safetensors file (header length {n} is implausible)")
        text = f.read(n)
        file_size = os.fstat(f.fileno()).st_size
    if len(text) != n:
        raise IntegrityError(f"{path} is not a safetensors file (its header is cut short: {len(text)} of {n} bytes)")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not a safetensors file (header is not JSON: {e})") from None
    _check_safetensors_header(path, header, file_size - 8 - n)
    return header, 8 + n


def check_safetensors_folder(folder: Path, what: str) -> None:
    """Check every safetensors file in an artifact folder before its weights are loaded.

    Raises:
        IntegrityError: a malformed file, or one without tensors (it would load as an
            untrained adapter, silently); the message starts with `what`.
    """
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            header, _ = read_safetensors_header(f)
        except IntegrityError as e:
            raise IntegrityError(f"{what}: {e}") from None
        if not set(header) - {"__metadata__"}:
            raise IntegrityError(f"{what}: {f.name} holds no tensors; restore its files or archive it")


def _check_safetensors_header(path: Path, header: Any, data_size: int) -> None:
    """Refuse a parsed header that does not describe the `data_size` bytes after it."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{path} is not a valid safetensors file ({why}); re-save it with safetensors")

    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    ranges = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or set(t) - {"dtype", "shape", "data_offsets"} or len(t) != 3:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}; a shape is a list of whole numbers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}; give [begin, end] with 0 <= begin <= end")
        bits = SAFETENSORS_DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise bad(f"tensor {name!r} ({dtype} {shape}) needs {bits / 8:g} bytes but data_offsets "
                      f"{offsets} hold {offsets[1] - offsets[0]}")
        ranges.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(ranges):
        if begin != at:
            raise bad(f"tensor {name!r} starts at byte {begin} of the data, expected {at} "
                      f"(the tensors must cover the data without gaps or overlaps)")
        at = end
    if at != data_size:
        raise bad(f"the tensors cover {at} bytes of data but the file holds {data_size} "
                  f"({'truncated' if at > data_size else 'trailing bytes'})")


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
