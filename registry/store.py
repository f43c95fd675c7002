"""The content-addressed artifact store.

An artifact is a folder of regular files (`adapter_config.json` + `*.safetensors` for an
adapter). It is stored once under `sha256/<2 hex>/<digest>/`, where the digest is the
folder's manifest hash (`registry.hashing.tree_digest`). Writing is atomic: the files go
to a private temp folder, are fsynced, hashed, made read-only, and the folder is renamed
into place in one step, so a crash leaves either nothing or a complete artifact (plus, at
worst, a temp folder that `gc` removes). Nothing is read from the store before its digest
is checked against the one the caller expects.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from registry.errors import BadInputError, IntegrityError
from registry.hashing import list_tree, preload_cache, tree_digest

_TMP = ".tmp"
_OBJECTS = "sha256"
#: the locations `put` makes: sha256/<first two hex digits>/<hex digest>
_CANONICAL = re.compile(rf"{_OBJECTS}/([0-9a-f]{{2}})/\1[0-9a-f]{{62}}")
#: a hook the crash tests use to stop a writer at a named point; None in normal runs
_fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)
    elif os.environ.get("PLAIT_FAULT_POINT") == point:  # crash-safety tests kill the process here
        os.kill(os.getpid(), 9)


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size_bytes: int
    location: str  # relative to the store root


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(root: Path) -> None:
    for p in list_tree(root):
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _make_writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


class ArtifactStore:
    """Folder-valued, content-addressed, write-once storage under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._resolved_root: Path | None = None
        self._plain_dirs: set[str] = set()  # shard folders seen not to be links

    @property
    def resolved_root(self) -> Path:
        if self._resolved_root is None:  # resolved once: audits ask for thousands of paths
            self._resolved_root = self.root.resolve()
        return self._resolved_root

    def _no_link_above(self, shard: str) -> bool:
        """sha256/ and sha256/ab/ are not links (looked at once a process)."""
        if shard not in self._plain_dirs:
            if os.path.islink(shard) or os.path.islink(os.path.dirname(shard)):
                return False
            self._plain_dirs.add(shard)
        return True

    def path(self, location: str) -> Path:
        """The absolute path of a stored artifact; refuses locations outside the store."""
        root = self.resolved_root
        if _CANONICAL.fullmatch(location):  # sha256/ab/<digest>: nothing in it can climb out; only
            p = os.path.join(root, location)  # a link in its place could (checked), so no resolve()
            if self._no_link_above(os.path.dirname(p)) and not os.path.islink(p):
                return Path(p)
        p = (root / location).resolve()
        if not p.is_relative_to(root) or p == root:
            raise IntegrityError(f"artifact location {location!r} points outside the store {self.root}")
        return p

    def put(self, files: dict[str, Path | bytes]) -> StoredArtifact:
        """Store a new artifact made of `files` (relative name -> source path or bytes).

        Returns:
            the digest, size and location; storing identical content twice stores it once.
        """
        tmp = self.root / _TMP / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            for rel, src in sorted(files.items()):
                dest = tmp / rel
                if not dest.resolve().is_relative_to(tmp.resolve()) or rel.startswith("/"):
                    raise BadInputError(f"artifact file name {rel!r} escapes the artifact folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    if isinstance(src, bytes):
                        out.write(src)
                    else:
                        with open(src, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 20)
                    _fault("store.write")
                    out.flush()
                    os.fsync(out.fileno())
            digest, size = tree_digest(tmp)
            _make_read_only(tmp)
            _fsync_path(tmp)
            final = self.root / _OBJECTS / digest[:2] / digest
            final.parent.mkdir(parents=True, exist_ok=True)
            _fault("store.before_rename")
            location = f"{_OBJECTS}/{digest[:2]}/{digest}"
            try:
                os.rename(tmp, final)  # atomic; fails when the content is already stored
            except OSError:
                if not final.exists():
                    raise
                try:
                    self.verify(location, digest)
                    # the caller is about to reference this copy: restart gc's grace period,
                    # so an old unreferenced copy is not collected between here and the commit
                    os.utime(final)
                    _make_writable(tmp)
                    shutil.rmtree(tmp)
                except IntegrityError:
                    # a damaged copy (e.g. left by a crash in the middle of an older gc):
                    # swap in the complete one, so storing the same content again succeeds
                    self._discard(final)
                    os.rename(tmp, final)
            _fsync_path(final.parent)
            return StoredArtifact(digest, size, location)
        except BaseException:
            if tmp.exists():
                _make_writable(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def put_dir(self, src: Path, include: Callable[[Path], bool] = lambda p: True) -> StoredArtifact:
        """Store the regular files of folder `src` accepted by `include`."""
        src = Path(src)
        files = {p.relative_to(src).as_posix(): p for p in list_tree(src) if include(p)}
        if not files:
            raise BadInputError(f"{src} holds no files to store")
        return self.put(files)

    def preload_digests(self) -> None:
        """Before checking thousands of folders: read the kept digests of the store's files with
        one query (`hashing.preload_cache`)."""
        preload_cache(self.resolved_root)

    def verify(self, location: str, expected_sha256: str, *, what: str = "artifact") -> Path:
        """Check a stored artifact against its expected digest and return its path.

        Raises:
            IntegrityError: missing, changed, truncated or swapped files.
        """
        p = self.path(location)
        if not p.is_dir():
            raise IntegrityError(f"{what} is missing from the store (expected sha256 {expected_sha256} at {p})")
        actual, _ = tree_digest(p)
        if actual != expected_sha256:
            raise IntegrityError(
                f"{what} failed its hash check: expected sha256 {expected_sha256}, found {actual} at {p}; "
                f"the files were modified, truncated or swapped, restore them or archive the version")
        return p

    def locations(self) -> list[str]:
        """Every stored artifact's location."""
        objects = self.root / _OBJECTS
        if not objects.is_dir():
            return []
        return sorted(f"{_OBJECTS}/{d.parent.name}/{d.name}" for d in objects.glob("*/*") if d.is_dir())

    def remove(self, location: str) -> int:
        """Delete one stored artifact; returns the bytes freed."""
        p = self.path(location)
        size = sum(f.stat().st_size for f in list_tree(p))
        self._discard(p)
        return size

    def _discard(self, p: Path) -> None:
        """Delete a stored folder, crash-safely: it leaves its place in one atomic rename.

        A process killed inside `rmtree` would otherwise leave a half-deleted artifact at
        its content address; moved into the temp area first, the leftover is only a temp
        folder that `remove_stale_temp` deletes.
        """
        trash = self.root / _TMP / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(p, trash)
        _fault("store.remove")
        with contextlib.suppress(FileNotFoundError):  # a concurrent gc's temp sweep may get there first
            _make_writable(trash)
        shutil.rmtree(trash, ignore_errors=True)  # anything left is a temp folder the next gc removes

    def remove_stale_temp(self, older_than_s: float = 600.0) -> int:
        """Delete temp folders left by crashed writers; returns how many."""
        tmp_root = self.root / _TMP
        if not tmp_root.is_dir():
            return 0
        now, removed = time.time(), 0
        for d in tmp_root.iterdir():
            try:  # another gc may be deleting the same folders: what vanished is done
                if now - d.stat().st_mtime < older_than_s:
                    continue
                _make_writable(d)
            except FileNotFoundError:
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
        return removed
