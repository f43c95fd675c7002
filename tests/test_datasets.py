"""The demo's python-code domain: pinned standard-library files, deterministic rows, disjoint splits."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from plait.datasets import (CODE_DOMAIN, CODE_FILES, CODE_PINNED_ON, StdlibMismatchError, code_pieces, code_splits,
                            read_pinned, stdlib_root, write_code_jsonl)
from training.data import load_domain_data

#: sha256 of json.dumps(code_splits(64, 12, 400)): the demo's rows, on every machine
DEMO_ROWS_SHA256 = "b32787a62b793bc4acb6815d234bb923d75c49f4778b9186b3ed94cdb4cc5c83"

SOURCE_A = '''"""A module."""
import functools


def top(x):
    """Add one, with a helper nested inside."""
    def inner(y):
        return y + 1
    return inner(x)


class Box:
    """A box."""

    size = 3

    @functools.cache
    def area(self, other):
        return self.size * other.size * 2


def same(a, b):
    return a + b if a is not None else b
'''
SOURCE_B = '''
def same(a, b):
    return a + b if a is not None else b


async def fetch(session, url):
    async with session.get(url) as response:
        return await response.text()
''' + "".join(f'''

def add_{i}(x):
    """Return x plus {i}: a function long enough to be a training row."""
    return x + {i}
''' for i in range(12))


def _pins(root, names):
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text(SOURCE_A)
    (root / "pkg" / "b.py").write_text(SOURCE_B)
    return root, _pins(root, ["a.py", "pkg/b.py"])


def test_pieces_are_functions_and_methods_with_decorators_and_no_overlap():
    pieces = code_pieces(SOURCE_A)
    assert [p.splitlines()[0] for p in pieces] == ["def top(x):", "@functools.cache", "def same(a, b):"]
    assert pieces[1] == "@functools.cache\ndef area(self, other):\n    return self.size * other.size * 2"  # dedented
    assert "def inner(y):" in pieces[0] and len(pieces) == 3  # the nested function stays inside its parent
    assert code_pieces(SOURCE_B)[1].startswith("async def fetch(session, url):")


def test_rows_are_deterministic_disjoint_and_deduplicated(fake_stdlib):
    root, pins = fake_stdlib
    first = code_splits(max_chars=400, root=root, files=pins)
    assert first == code_splits(max_chars=400, root=root, files=pins)
    rows = first["train"] + first["eval"]
    # `same` is in both files: one row; the one-line-body pieces under 80 characters are left out
    assert sorted(r.splitlines()[0] for r in rows) == sorted(["async def fetch(session, url):", "def top(x):",
                                                              *(f"def add_{i}(x):" for i in range(12))])
    assert first["train"] and first["eval"] and not set(first["train"]) & set(first["eval"])
    key = [hashlib.sha256(r.encode()).hexdigest() for r in first["train"]]
    assert key == sorted(key)  # ordered by content hash, which mixes the files
    assert all(len(r) <= 40 for r in code_splits(max_chars=40, root=root, files=pins)["train"])


def test_a_changed_or_missing_pinned_file_is_refused_and_nothing_is_written(fake_stdlib, tmp_path):
    root, pins = fake_stdlib
    (root / "pkg" / "b.py").write_text(SOURCE_B.replace("url", "uri"))
    with pytest.raises(StdlibMismatchError) as e:
        write_code_jsonl(tmp_path / "out", 8, 2, root=root, files=pins)
    here = ".".join(map(str, sys.version_info[:3]))
    assert str(e.value).startswith(f"{root / 'pkg' / 'b.py'} has sha256 ")
    assert f"pinned on Python {CODE_PINNED_ON} (this is Python {here})" in str(e.value)
    assert e.value.exit_code == 2 and not (tmp_path / "out").exists()
    (root / "pkg" / "b.py").unlink()
    with pytest.raises(StdlibMismatchError, match=r"b\.py is missing; the python-code domain is pinned"):
        read_pinned(root, pins)


def test_the_written_files_are_domain_data(fake_stdlib, tmp_path):
    root, pins = fake_stdlib
    train, ev = write_code_jsonl(tmp_path / "out", 8, 2, root=root, files=pins)
    assert (train.name, ev.name) == (f"{CODE_DOMAIN}.train.jsonl", f"{CODE_DOMAIN}.eval.jsonl")
    split = code_splits(8, 2, root=root, files=pins)
    assert (len(split["train"]), len(split["eval"])) == (8, 2)
    dd = load_domain_data(train, ev)
    assert [r.text for r in dd.train] == split["train"] and [r.text for r in dd.eval] == split["eval"]


def _pinned_here() -> bool:
    try:
        read_pinned()
        return True
    except StdlibMismatchError:
        return False


# the pins hold on Python 3.11; on another version the files differ by design (README: the demo
# leaves the domain out there). On 3.11 a mismatch fails, since every machine must share the rows.
needs_pinned_stdlib = pytest.mark.skipif(sys.version_info[:2] != (3, 11) and not _pinned_here(),
                                         reason=f"the python-code pins are for Python 3.11, this is {sys.version}")


@needs_pinned_stdlib
def test_the_demo_rows_are_the_pinned_ones():
    assert all((stdlib_root() / f).is_file() for f in CODE_FILES)
    rows = code_splits(64, 12, 400)
    assert (len(rows["train"]), len(rows["eval"])) == (64, 12)
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == DEMO_ROWS_SHA256
    every = code_splits(None, None, 400)
    assert len(every["train"]) > 300 and len(every["eval"]) > 60  # enough for --large too (most of it)
    assert not set(every["train"]) & set(every["eval"])
    assert rows["train"] == every["train"][:64] and rows["eval"] == every["eval"][:12]
