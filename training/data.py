"""Domain data: read, check, split, fingerprint and tokenize the rows a domain trains on.

Accepted inputs (one domain per file or folder):

- JSONL (`.jsonl`, `.json` with one object per line), CSV (`.csv`, with a header row) or
  Parquet (`.parquet`) rows holding either `text` (loss on every token) or `prompt` +
  `completion` (loss on the completion tokens only; prompt tokens get label -100);
- a folder of `.txt` files, one row each.

Anything malformed is refused with a `BadInputError` naming the file, the line and the
reason: non-UTF-8 bytes, a line that is not a JSON object, a missing or non-string field,
an empty row, a row over `MAX_ROW_BYTES`, a file with no rows. The eval split comes from a
separate file or is held out deterministically (by content hash, so it does not depend on
row order or on the seed). The data fingerprint is the sha256 of the normalised rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import BadInputError, NotFoundError
from registry.names import whole_number

MAX_ROW_BYTES = 1_000_000
FORMATS = ".jsonl, .json (one object per line), .csv, .parquet, or a folder of .txt files"
IGNORE_INDEX = -100
#: tokens per example (training) and per eval text (audit) unless a run says otherwise: the one
#: default the CLI options, the trainer's settings and the audit share
DEFAULT_MAX_LENGTH = 256


@dataclass(frozen=True)
class Row:
    """One training row: `text`, or `prompt` + `completion`. `where` is `file:line`."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""

    def normalised(self) -> dict[str, str]:
        """The row's content as it is hashed: NFC Unicode, `\\n` line ends."""
        def norm(s: str) -> str:
            return unicodedata.normalize("NFC", s.replace("\r\n", "\n").replace("\r", "\n"))

        if self.text is not None:
            return {"text": norm(self.text)}
        return {"prompt": norm(self.prompt or ""), "completion": norm(self.completion or "")}


def _check_unicode(value: str, field: str, where: str) -> None:
    """Refuse text that cannot be written as UTF-8: a JSON escape of half a surrogate pair (`"\\ud800"`)
    decodes to a lone surrogate, which the tokenizer and the registry's JSON files cannot encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInputError(f"{where}: \"{field}\" holds a lone surrogate (\\u{ord(value[e.start]):04x} at character "
                            f"{e.start + 1}), which UTF-8 cannot encode; write the character itself or a full "
                            f"surrogate pair escape (e.g. \\ud83d\\ude00), or remove it") from None


def _row(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: expected an object with \"text\" or \"prompt\" + \"completion\", "
                            f"got {type(obj).__name__}")
    has_text = obj.get("text") is not None
    has_pair = obj.get("prompt") is not None or obj.get("completion") is not None
    if has_text and has_pair:
        raise BadInputError(f"{where}: the row has both \"text\" and \"prompt\"/\"completion\"; keep one form per row")
    if has_text:
        text = obj["text"]
        if not isinstance(text, str):
            raise BadInputError(f"{where}: \"text\" must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadInputError(f"{where}: \"text\" is empty; remove the row or give it text")
        _check_unicode(text, "text", where)
        return Row(text=text, where=where)
    if has_pair:
        for field in ("prompt", "completion"):
            if not isinstance(obj.get(field), str):
                got = "missing" if obj.get(field) is None else type(obj[field]).__name__
                raise BadInputError(f"{where}: \"{field}\" must be a string ({got}); prompt rows need both "
                                    f"\"prompt\" and \"completion\"")
        if not obj["completion"].strip():
            raise BadInputError(f"{where}: \"completion\" is empty; there would be nothing to learn from the row")
        for field in ("prompt", "completion"):
            _check_unicode(obj[field], field, where)
        return Row(prompt=obj["prompt"], completion=obj["completion"], where=where)
    fields = ", ".join(sorted(map(str, obj))) or "none"
    raise BadInputError(f"{where}: the row has no \"text\" or \"prompt\" + \"completion\" field (fields: {fields})")


def _input_row(obj: Any, where: str) -> Row:
    """A row to route or generate for: its "text", else its "prompt" (a completion is optional)."""
    if isinstance(obj, dict) and obj.get("text") is None:
        if obj.get("prompt") is None:
            raise BadInputError(f'{where}: the row needs a non-empty "text" or "prompt" string')
        if isinstance(obj["prompt"], str) and obj["prompt"].strip():
            _check_unicode(obj["prompt"], "prompt", where)
            return Row(prompt=obj["prompt"], where=where)
    return _row(obj, where)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BadInputError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None


def _check_size(size: int, where: str) -> None:
    if size > MAX_ROW_BYTES:
        raise BadInputError(f"{where}: the row is {size:,} bytes, over the {MAX_ROW_BYTES:,}-byte limit; "
                            f"split it into smaller rows")


def _bounded_lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of a binary file, never holding more than one row's limit.

    A line over `MAX_ROW_BYTES` is measured in 1 MiB pieces and refused with its full size,
    so a 200 MB line costs 1 MB of memory, not 200 MB.
    """
    n = 0
    while raw := f.readline(MAX_ROW_BYTES + 1):
        n += 1
        size = len(raw)
        if size > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            raw = b""  # let the piece go before reading on
            while piece := f.readline(1 << 20):
                size += len(piece)
                if piece.endswith(b"\n"):
                    break
        _check_size(size, f"{path}:{n}")
        yield n, raw


def _read_jsonl(path: Path, row=_row) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in _bounded_lines(f, path):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise BadInputError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    f"re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise BadInputError(f"{where}: not valid JSON ({e.msg} at column {e.pos + 1}); "
                                    f"write one JSON object per line") from None
            except RecursionError:  # e.g. 200,000 `[`: deeper than Python's parser can go
                raise BadInputError(f"{where}: the JSON nests too deeply to read (the line starts "
                                    f"{line[:20]!r}); write one flat JSON object per line") from None
            rows.append(row(obj, where))
    return rows


def _read_csv(path: Path, row=_row) -> list[Row]:
    text = _decode(path.read_bytes(), path)
    csv.field_size_limit(MAX_ROW_BYTES * 4)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise BadInputError(f"{path}: the CSV file has no header row; its first line must name the columns "
                            f"(text, or prompt,completion)")
    if "text" not in reader.fieldnames and not {"prompt", "completion"} <= set(reader.fieldnames):
        raise BadInputError(f"{path}:1: the CSV header ({', '.join(reader.fieldnames)}) has no \"text\" column "
                            f"and no \"prompt\" + \"completion\" columns")
    rows = []
    start = 2
    try:
        for rec in reader:
            where = f"{path}:{start}"
            if None in rec:
                raise BadInputError(f"{where}: the row has more fields than the header ({len(reader.fieldnames)})")
            _check_size(sum(len(v.encode()) for v in rec.values() if isinstance(v, str)), where)
            obj = {k: v for k, v in rec.items() if k in ("text", "prompt", "completion") and v not in (None, "")}
            if "completion" in rec and "prompt" in rec and "text" not in obj:
                obj = {"prompt": rec["prompt"] or "", "completion": rec["completion"] or ""}
            rows.append(row(obj, where))
            start = reader.line_num + 1
    except csv.Error as e:
        raise BadInputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_parquet(path: Path, row=_row) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise BadInputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    cols = set(table.column_names)
    if "text" not in cols and not {"prompt", "completion"} <= cols:
        raise BadInputError(f"{path}: the Parquet columns ({', '.join(table.column_names)}) have no \"text\" "
                            f"and no \"prompt\" + \"completion\"")
    keep = [c for c in ("text", "prompt", "completion") if c in cols]
    rows = []
    for n, rec in enumerate(table.select(keep).to_pylist(), start=1):
        where = f"{path}:row {n}"
        _check_size(sum(len(v.encode()) for v in rec.values() if isinstance(v, str)), where)
        rows.append(row({k: v for k, v in rec.items() if v is not None}, where))
    return rows


def _read_folder(path: Path) -> list[Row]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise BadInputError(f"{path} holds no .txt files; give a folder of .txt files or a data file ({FORMATS})")
    rows = []
    for p in files:
        _check_size(p.stat().st_size, str(p))
        text = _decode(p.read_bytes(), p)
        if not text.strip():
            raise BadInputError(f"{p}: the file is empty; remove it or give it text")
        rows.append(Row(text=text, where=str(p)))
    return rows


def read_rows(path: str | Path, *, inputs_only: bool = False) -> list[Row]:
    """Read and check every row of a data file or folder.

    With `inputs_only` (routing and generation inputs), a "prompt" row needs no "completion".

    Raises:
        NotFoundError: the path does not exist.
        BadInputError: the format is unknown, the data is empty, or a row is malformed
            (the message names the file, the line and the reason).
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data {path} does not exist; give a file ({FORMATS})")
    if path.is_dir():
        rows = _read_folder(path)
    else:
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".ndjson": _read_jsonl, ".csv": _read_csv,
                   ".parquet": _read_parquet, ".pq": _read_parquet}
        if suffix not in readers:
            raise BadInputError(f"{path}: unknown data format {suffix or '(no extension)'!r}; use {FORMATS}")
        rows = readers[suffix](path, _input_row) if inputs_only else readers[suffix](path)
    if not rows:
        raise BadInputError(f"{path} holds no rows; a domain needs at least one row of text")
    return rows


def fingerprint_rows(train: list[Row], eval_rows: list[Row] = ()) -> str:
    """`sha256:<hex>` of the normalised train rows, then the eval rows, in order."""
    h = hashlib.sha256()
    for part, rows in (("train", train), ("eval", eval_rows)):
        h.update(f"[{part}]\n".encode())
        for r in rows:
            h.update(json.dumps(r.normalised(), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def _content_key(row: Row) -> str:
    return hashlib.sha256(json.dumps(row.normalised(), sort_keys=True).encode()).hexdigest()


#: the validation split's size: this share of the rows, at least VALIDATION_MIN_ROWS and at most
#: VALIDATION_MAX_ROWS, so measuring every domain's validation set after each new version
#: (`plait.continual`) costs a bounded number of forward passes whatever the data size
VALIDATION_FRACTION = 0.1
VALIDATION_MIN_ROWS = 1
VALIDATION_MAX_ROWS = 64


@dataclass
class DomainData:
    """A domain's train, eval and validation rows with the data fingerprint recorded on the version.

    The three are disjoint by content (the sha256 of the normalised row): `eval` is for audits
    only, `validation` for router calibration and for choosing the version that serves the
    domain, `train` for training.
    """

    train: list[Row]
    eval: list[Row]
    fingerprint: str
    eval_source: str  # "file", "held-out" or "frozen" (the registry's, on a retrain)
    validation: list[Row] = field(default_factory=list)


def validation_size(n_rows: int, fraction: float) -> int:
    """How many rows of `n_rows` the validation split takes (0 when `fraction` is 0)."""
    if fraction == 0:
        return 0
    return min(VALIDATION_MAX_ROWS, max(VALIDATION_MIN_ROWS, round(n_rows * fraction)))


def _frozen_rows(rows: list[dict[str, Any]] | None, what: str) -> list[Row]:
    return [_row(r, f"{what} row {i + 1}") for i, r in enumerate(rows or [])]


def load_domain_data(data: str | Path, eval_data: str | Path | None = None, eval_fraction: float = 0.1,
                     validation_fraction: float = 0.0,
                     frozen: dict[str, list[dict[str, Any]]] | None = None) -> DomainData:
    """Read a domain's rows and split off its eval and validation sets.

    Every split is by content hash (the sha256 of the normalised row), so it does not depend on
    row order, and rows with the same content land in the same split. The rows are ordered by
    that hash: the first `eval_fraction` (at least one) are the eval set, the next
    `validation_size(...)` the validation set, the rest train. Rows matching a held-out row
    (an eval file's, or a frozen set's) are never trained on.

    Args:
        data: the training file or folder.
        eval_data: a separate eval file; the validation set then still comes from `data`.
        validation_fraction: share of the rows held out for validation (0 = none; see
            `validation_size` for the bounds).
        frozen: the domain's sets already frozen in the registry (`{"eval": rows,
            "validation": rows}`, as stored): on a retrain they are the domain's eval and
            validation sets again, and their rows are taken out of the new training rows.

    Raises:
        BadInputError: as `read_rows`, or too few rows to hold out the splits and keep one to train on.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise BadInputError(f"eval fraction {eval_fraction!r} is invalid: use a number between 0 and 1 (e.g. 0.1)")
    if not 0.0 <= validation_fraction < 1.0:
        raise BadInputError(f"validation fraction {validation_fraction!r} is invalid: use a number >= 0 and below 1 "
                            f"(e.g. {VALIDATION_FRACTION}; 0 = no validation split)")
    frozen = frozen or {}
    rows = read_rows(data)
    file_eval = read_rows(eval_data) if eval_data is not None else []
    eval_rows: list[Row] | None = _frozen_rows(frozen.get("eval"), f"{data}: frozen eval")
    source = "frozen"
    if not eval_rows:  # a retrain keeps the frozen set (an eval file's rows are then only kept out of train)
        eval_rows, source = (file_eval, "file") if eval_data is not None else (None, "held-out")
    if eval_rows is None and len(rows) < 2:
        raise BadInputError(f"{data} has {len(rows)} row; hold-out needs at least 2 rows, or give an eval file")
    validation = _frozen_rows(frozen.get("validation"), f"{data}: frozen validation")
    held = {_content_key(r) for r in [*(eval_rows or []), *file_eval, *validation]}
    keys = sorted({k for k in map(_content_key, rows) if k not in held})
    # sizes count distinct rows: copies of one row always share a split
    n_eval = 0 if eval_rows is not None else max(1, round(len(keys) * eval_fraction))
    n_val = 0 if validation else validation_size(len(keys), validation_fraction)
    if len(keys) < n_eval + n_val + 1:
        need = " + ".join(f"{n} {what}" for n, what in ((n_eval, "eval"), (n_val, "validation")) if n)
        raise BadInputError(f"{data} has {len(keys)} distinct row(s) left to split, too few to hold out {need} and "
                            f"keep one to train on; add rows, give an eval file, or lower the fractions"
                            if need else f"{data} has no row left to train on: every row is in the domain's frozen "
                            f"eval or validation set; give new rows")
    if eval_rows is None:
        eval_keys = set(keys[:n_eval])
        eval_rows = [r for r in rows if _content_key(r) in eval_keys]
    if not validation:
        val_keys = set(keys[n_eval:n_eval + n_val])
        validation = [r for r in rows if _content_key(r) in val_keys]
    taken = held | {_content_key(r) for r in eval_rows} | {_content_key(r) for r in validation}
    train = [r for r in rows if _content_key(r) not in taken]
    return DomainData(train, eval_rows, fingerprint_rows(train, eval_rows + validation), source, validation)


def frozen_splits(registry, domain: str) -> dict[str, list[dict[str, Any]]]:
    """The eval and validation sets `domain` already has in `registry` (a `registry.client.Registry`),
    as `load_domain_data(frozen=...)` takes them; empty for a new domain."""
    out = {}
    for split in ("eval", "validation"):
        try:
            out[split] = registry.get_domain_rows(domain, split)
        except NotFoundError:
            continue
    return out


@dataclass(frozen=True)
class Example:
    """A tokenized sequence; `labels` is -100 where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def tokenize_rows(rows: list[Row], tokenizer, max_length: int) -> list[Example]:
    """Tokenize rows into examples of at most `max_length` tokens.

    A `text` row longer than `max_length` is cut into consecutive windows (no text is
    dropped); a prompt row keeps its prompt and as much of the completion as fits. Rows left
    with no completion token are skipped.

    Raises:
        BadInputError: `max_length` < 2, or no row has a token to learn from.
    """
    whole_number(max_length, "max length", 2, example=DEFAULT_MAX_LENGTH)
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    for row in rows:
        r = row.normalised()
        if "text" in r:
            ids = tokenizer(r["text"], add_special_tokens=True)["input_ids"]
            ids = ids + ([eos] if eos is not None else [])
            for start in range(0, len(ids), max_length):
                chunk = tuple(ids[start:start + max_length])
                if len(chunk) >= 2:
                    out.append(Example(chunk, chunk))
        else:
            p = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids = (p + c)[:max_length]
            labels = ([IGNORE_INDEX] * len(p) + c)[:max_length]
            if any(t != IGNORE_INDEX for t in labels[1:]):  # the first label is never predicted
                out.append(Example(tuple(ids), tuple(labels)))
    if not out:
        raise BadInputError(f"no row has a token to learn from at max length {max_length}; "
                            f"raise the max length or shorten the prompts")
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding has attention 0 and label -100."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in one epoch: a function of (seed, epoch) only, so a
    resumed run visits exactly the batches the interrupted one would have."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def batch_at(examples: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of global training step `step` (0-based); epochs wrap around the data."""
    per_epoch = max(1, -(-len(examples) // batch_size))
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    return [examples[i] for i in order[k * batch_size:(k + 1) * batch_size]]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, -(-n_examples // batch_size))


def iter_eval_batches(examples: list[Example], batch_size: int) -> Iterator[list[Example]]:
    for i in range(0, len(examples), batch_size):
        yield examples[i:i + batch_size]
