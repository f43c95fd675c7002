"""Training data that used to escape "one line, exit 2" (issue 15, item 14).

Three files got past the readers' checks: 200,000 `[` on one line (a RecursionError inside
`json`), `{"text": "\\ud800"}` (a lone surrogate that fails later, when the text is encoded),
and one huge line, which was read whole before the 1 MB row limit was checked.
"""

from __future__ import annotations

import tracemalloc

import pytest

from registry.errors import BadInputError
from tests.test_bad_input import _track_engines, _train, bad_ws, check_refusals  # noqa: F401 (fixtures)
from training.data import MAX_ROW_BYTES, read_rows

DEEP = b'{"text": "fine"}\n' + b"[" * 200_000 + b"\n"
SURROGATE = b'{"text": "fine"}\n{"text": "caf\\ud800e"}\n'


def _refusal(path) -> str:
    with pytest.raises(BadInputError) as e:
        read_rows(path)
    return str(e.value)


def test_deeply_nested_json_is_refused_with_the_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(DEEP)
    assert _refusal(path) == (f"{path}:2: the JSON nests too deeply to read (the line starts '{'[' * 20}'); "
                              f"write one flat JSON object per line")


@pytest.mark.parametrize("row,field,char,at", [
    (b'{"text": "caf\\ud800e"}', "text", "ud800", 4),
    (b'{"prompt": "\\udc00?", "completion": "yes"}', "prompt", "udc00", 1),
    (b'{"prompt": "q?", "completion": "ye\\ud83ds"}', "completion", "ud83d", 3),
])
def test_a_lone_surrogate_is_refused_with_the_field(tmp_path, row, field, char, at):
    path = tmp_path / "s.jsonl"
    path.write_bytes(row + b"\n")
    assert _refusal(path) == (
        f'{path}:1: "{field}" holds a lone surrogate (\\{char} at character {at}), which UTF-8 cannot encode; write '
        f"the character itself or a full surrogate pair escape (e.g. \\ud83d\\ude00), or remove it")


def test_a_full_surrogate_pair_and_routing_prompts_are_checked_the_same_way(tmp_path):
    ok = tmp_path / "pair.jsonl"
    ok.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n')
    assert read_rows(ok)[0].text == "smile \U0001F600"
    bad = tmp_path / "inputs.jsonl"
    bad.write_bytes(b'{"prompt": "\\ud800"}\n')  # a routing input: a prompt without completion
    with pytest.raises(BadInputError, match=r'inputs.jsonl:1: "prompt" holds a lone surrogate'):
        read_rows(bad, inputs_only=True)


def test_a_huge_line_is_measured_not_read_whole(tmp_path):
    """A 32 MiB line: refused with its exact size while at most about one row's limit is in memory."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "fine"}\n{"text": "')
        f.write(b"x" * (32 << 20))
        f.write(b'"}\n')
    size = 10 + (32 << 20) + 3
    tracemalloc.start()
    try:
        message = _refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"{path}:2: the row is {size:,} bytes, over the 1,000,000-byte limit; split it into smaller rows"
    assert peak < 4 * MAX_ROW_BYTES, f"peak {peak:,} bytes while reading"  # the old reader held all 32 MiB


def test_a_line_at_the_limit_still_loads_and_one_byte_more_is_refused(tmp_path):
    """The bounded read keeps the limit where it was: a line of MAX_ROW_BYTES bytes (newline included) loads."""
    head, tail = b'{"text": "', b'"}\n'
    fits = tmp_path / "fits.jsonl"
    fits.write_bytes(head + b"y" * (MAX_ROW_BYTES - len(head) - len(tail)) + tail)
    assert len(read_rows(fits)[0].text) == MAX_ROW_BYTES - len(head) - len(tail)
    over = tmp_path / "over.jsonl"
    over.write_bytes(head + b"y" * (MAX_ROW_BYTES - len(head) - len(tail) + 1) + tail)
    assert "the row is 1,000,001 bytes, over the 1,000,000-byte limit" in _refusal(over)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_plait_train_refuses_them_in_one_line(bad_ws, capsys, tmp_path):
    """Through the CLI: exit 2, one line naming file:line, nothing stored, no checkpoint left."""
    deep, surrogate, huge = tmp_path / "deep.jsonl", tmp_path / "sur.jsonl", tmp_path / "huge.jsonl"
    deep.write_bytes(DEEP)
    surrogate.write_bytes(SURROGATE)
    huge.write_bytes(b'{"text": "' + b"x" * (8 << 20) + b'"}\n')
    check_refusals(capsys, bad_ws, [
        (_train(deep), f"{deep}:2: the JSON nests too deeply to read"),
        (_train(surrogate), f'{surrogate}:2: "text" holds a lone surrogate (\\ud800 at character 4)'),
        (_train(huge), f"{huge}:1: the row is 8,388,621 bytes, over the 1,000,000-byte limit"),
    ])
    assert not (bad_ws / "checkpoints").exists() or list((bad_ws / "checkpoints").iterdir()) == []
