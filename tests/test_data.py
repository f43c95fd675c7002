"""Domain data: every accepted format, the exact refusals, the split and the fingerprint."""

from __future__ import annotations

import json

import pytest

from tests.train_helpers import byte_tokenizer, write_jsonl
from registry.errors import BadInputError, NotFoundError
from training.data import (IGNORE_INDEX, MAX_ROW_BYTES, Row, batch_at, collate, fingerprint_rows, load_domain_data,
                           read_rows, tokenize_rows)

ROWS = [{"text": f"row number {i}"} for i in range(20)]


def test_jsonl_csv_parquet_and_txt_folder_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "alpha, with a comma"}, {"text": "beta\nsecond line"}, {"text": "gamma \"quoted\""}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    csv_path = tmp_path / "d.csv"
    import csv

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "text"])
        w.writeheader()
        w.writerows({"id": i, **r} for i, r in enumerate(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, r in enumerate(rows):
        (folder / f"{i}.txt").write_text(r["text"])
    texts = [r["text"] for r in rows]
    for path in (jsonl, csv_path, tmp_path / "d.parquet", folder):
        assert [r.text for r in read_rows(path)] == texts, path
    assert fingerprint_rows(read_rows(jsonl)) == fingerprint_rows(read_rows(folder))
    assert read_rows(jsonl)[1].where == f"{jsonl}:2"


def test_prompt_completion_rows_put_loss_on_the_completion_only(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2? A:", "completion": " 4"}])
    (row,) = read_rows(path)
    tok = byte_tokenizer()
    (ex,) = tokenize_rows([row], tok, max_length=64)
    n_prompt = len(tok("Q: 2+2? A:")["input_ids"])
    assert ex.labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] == (*tok(" 4")["input_ids"], tok.eos_token_id)
    batch = collate([ex, ex], pad_id=tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_long_text_is_cut_into_windows_and_padding_has_no_loss():
    tok = byte_tokenizer()
    exs = tokenize_rows([Row(text="x" * 25)], tok, max_length=10)
    assert [len(e.input_ids) for e in exs] == [10, 10, 6]  # 25 bytes + eos, nothing dropped
    batch = collate(exs, pad_id=tok.pad_token_id)
    assert batch["labels"][2, 6:].tolist() == [IGNORE_INDEX] * 4
    assert batch["attention_mask"][2].tolist() == [1] * 6 + [0] * 4


def test_hold_out_is_deterministic_and_independent_of_row_order(tmp_path):
    a = load_domain_data(write_jsonl(tmp_path / "a.jsonl", ROWS))
    b = load_domain_data(write_jsonl(tmp_path / "b.jsonl", ROWS[::-1]))
    assert len(a.eval) == 2 and len(a.train) == 18 and a.eval_source == "held-out"
    assert sorted(r.text for r in a.eval) == sorted(r.text for r in b.eval)
    assert load_domain_data(tmp_path / "a.jsonl").fingerprint == a.fingerprint
    c = load_domain_data(tmp_path / "a.jsonl", eval_data=write_jsonl(tmp_path / "e.jsonl", ROWS[:3]))
    # the eval file's 3 rows are also in the training file: they are never trained on
    assert c.eval_source == "file" and len(c.train) == 17 and c.fingerprint != a.fingerprint


def test_fingerprint_normalises_line_ends_and_unicode():
    assert fingerprint_rows([Row(text="a\r\nb")]) == fingerprint_rows([Row(text="a\nb")])
    assert fingerprint_rows([Row(text="caf\u00e9")]) == fingerprint_rows([Row(text="cafe\u0301")])
    assert fingerprint_rows([Row(text="a")]) != fingerprint_rows([Row(text="b")])


def test_batches_are_a_function_of_seed_and_step():
    tok = byte_tokenizer()
    exs = tokenize_rows([Row(text=f"row {i}") for i in range(10)], tok, 16)
    assert batch_at(exs, 7, 3, seed=1) == batch_at(exs, 7, 3, seed=1)
    assert [batch_at(exs, s, 5, seed=1) for s in range(2)] != [batch_at(exs, s, 5, seed=2) for s in range(2)]
    epoch = [e for s in range(2) for e in batch_at(exs, s, 5, seed=1)]
    assert sorted(map(id, epoch)) == sorted(map(id, exs))  # each example once per epoch


def _bad(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError) as e:
        read_rows(path)
    return str(e.value).replace(str(tmp_path), "T")


def test_malformed_input_is_refused_with_file_line_and_reason(tmp_path):
    ok = b'{"text": "fine"}\n'
    assert _bad(tmp_path, "a.jsonl", ok + b'{"text": "fine"\n') == (
        "T/a.jsonl:2: not valid JSON (Expecting ',' delimiter at column 17); write one JSON object per line")
    assert _bad(tmp_path, "b.jsonl", ok + b'["text"]\n') == (
        'T/b.jsonl:2: expected an object with "text" or "prompt" + "completion", got list')
    assert _bad(tmp_path, "c.jsonl", ok + ok + b'{"body": "x"}\n') == (
        'T/c.jsonl:3: the row has no "text" or "prompt" + "completion" field (fields: body)')
    assert _bad(tmp_path, "d.jsonl", b'{"prompt": "q"}\n') == (
        'T/d.jsonl:1: "completion" must be a string (missing); prompt rows need both "prompt" and "completion"')
    assert _bad(tmp_path, "e.jsonl", b'{"text": 5}\n') == 'T/e.jsonl:1: "text" must be a string, got int'
    assert _bad(tmp_path, "f.jsonl", b'{"text": "  "}\n') == 'T/f.jsonl:1: "text" is empty; remove the row or give it text'
    assert _bad(tmp_path, "g.jsonl", ok + b'{"text": "caf\xe9"}\n') == (
        "T/g.jsonl:2: not UTF-8 (byte 0xe9 at column 14); re-save the file as UTF-8")
    assert _bad(tmp_path, "h.jsonl", b"\n\n") == "T/h.jsonl holds no rows; a domain needs at least one row of text"
    big = json.dumps({"text": "x" * (MAX_ROW_BYTES + 1)}).encode()
    assert _bad(tmp_path, "i.jsonl", ok + big + b"\n") == (
        f"T/i.jsonl:2: the row is {len(big) + 1:,} bytes, over the 1,000,000-byte limit; split it into smaller rows")
    assert _bad(tmp_path, "j.csv", b"body\nx\n") == (
        'T/j.csv:1: the CSV header (body) has no "text" column and no "prompt" + "completion" columns')
    assert _bad(tmp_path, "k.csv", b"text\nfine\n\xff\n") == (
        "T/k.csv:3: not UTF-8 (byte 0xff); re-save the file as UTF-8")
    assert _bad(tmp_path, "l.csv", b"text,label\nfine,1\nbad,1,extra\n") == (
        "T/l.csv:3: the row has more fields than the header (2)")
    assert _bad(tmp_path, "m.xml", b"<x/>") == (
        "T/m.xml: unknown data format '.xml'; use .jsonl, .json (one object per line), .csv, .parquet, "
        "or a folder of .txt files")
    assert _bad(tmp_path, "n.jsonl", b'{"text": "a", "prompt": "b", "completion": "c"}\n') == (
        'T/n.jsonl:1: the row has both "text" and "prompt"/"completion"; keep one form per row')


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no .txt files"):
        read_rows(tmp_path / "empty")
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(BadInputError, match=r"a.txt: the file is empty"):
        read_rows(tmp_path / "empty")
    with pytest.raises(BadInputError) as e:
        load_domain_data(write_jsonl(tmp_path / "one.jsonl", ROWS[:1]))
    assert "hold-out needs at least 2 rows, or give an eval file" in str(e.value)
    with pytest.raises(BadInputError, match="max length 1 is invalid"):
        tokenize_rows([Row(text="abc")], byte_tokenizer(), 1)
