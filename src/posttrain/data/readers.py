"""Read a data file into located records: JSONL, JSON, CSV, Parquet and local `datasets` folders.

Every record keeps the 1-based line where it starts in the file (JSONL, JSON, CSV) or its 1-based row number
(Parquet, `datasets` folders), so that later checks can say ``FILE:LINE: field: what is wrong``.
Columnar formats (CSV, Parquet, `datasets`) give every row every column; an empty cell (CSV) or a null value
(Parquet, `datasets`: also inside nested objects, whose fields Arrow shares too) is treated as an absent field. CSV
cells of `messages` and `metadata` hold JSON, and a `prompt`/`completion`/`chosen`/`rejected` cell holding a JSON
list of messages is parsed as one.

This module does not check what the rows mean (see `schema.py`); it only turns bytes into dicts, and every
way that can fail (missing, empty or unreadable file, bad bytes, malformed JSON) into a `DataError`.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import io
import json
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, Problem, place

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet", "any of the first three gzipped (.jsonl.gz, ...)",
             "a `datasets` folder (save_to_disk)")
_JSON_CELLS = ("messages", "metadata")
_MESSAGE_CELLS = ("prompt", "completion", "chosen", "rejected")
_NUMBER_CELLS = ("margin",)  # a CSV cell is text; a column the schema wants as a number is read as one
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _noting_twice(twice: list[str], pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook` that parses on, as `json.loads` does (the last value wins), and appends each key
    written twice to `twice`, for the reader to refuse.

    >>> twice = []
    >>> json.loads('{"a": 1, "b": {"c": 2, "c": 3}}', object_pairs_hook=functools.partial(_noting_twice, twice))
    {'a': 1, 'b': {'c': 3}}
    >>> twice
    ['c']
    """
    out: dict = {}
    for key, value in pairs:
        if key in out:
            twice.append(key)
        out[key] = value
    return out


def _twice(key: str) -> str:
    return (f"`{key}` is written twice in this object; JSON would silently keep only the second value. Delete "
            "one of them")  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One row of a data file: `line` is its 1-based line (text formats) or row number (columnar formats); `row`
    is its 1-based position in the file, set only where several rows start on its line (a JSON array written on
    one line, as `json.dump` writes it), for messages to say which (`Problem.row`)."""

    line: int
    data: dict
    row: int | None = None

    def where(self, name: str) -> str:
        """``FILE:LINE``, with the row where the line holds several.

        >>> Record(1, {}, row=504).where("big.json"), Record(3, {}).where("d.jsonl")
        ('big.json:1 (row 504)', 'd.jsonl:3')
        """
        return place(name, self.line, self.row)


def read_records(path: str | Path) -> list[Record]:
    """Read every row of a data file, raising one `DataError` that lists every unreadable line."""
    records, problems = read_records_lenient(path)
    if problems:
        raise DataError(problems, header=f"{path}: {len(problems)} unreadable line(s)")
    return records


def read_records_lenient(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Read the rows that can be read and the problems of those that cannot (used to report all at once).

    File-level failures (missing, empty, unreadable, unsupported) still raise `DataError` at once.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        _fail(name, "file not found")
    if p.is_dir():
        return _read_datasets_dir(p, name), []
    suffix = p.suffix.lower()
    gzipped = suffix == ".gz"  # as the hub ships many files (HH-RLHF's train.jsonl.gz): read through gzip
    if gzipped:
        suffix = Path(p.stem).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv") + (() if gzipped else (".parquet",)):
        shown = f"{suffix}.gz" if gzipped else suffix
        _fail(
            name, f"unsupported file type {shown or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}"
        )
    try:
        raw = p.read_bytes()
        if gzipped:
            raw = gzip.decompress(raw)
    except OSError as err:  # gzip's BadGzipFile and EOFError too: a file named .gz that is not whole gzip
        _fail(name, f"cannot read the file: {err.strerror or err}")
    except EOFError:
        _fail(name, "cannot read the file: the gzip stream ends early (a download cut short?)")
    except zlib.error as err:  # bytes changed inside the stream
        _fail(name, f"cannot read the file: its gzip stream is damaged ({err}); download it again")
    if suffix == ".parquet":
        if not raw.strip():
            _fail(name, "file is empty")
        return _read_parquet(p, name), []
    raw = _as_utf8(raw, name)
    if not raw.strip():
        _fail(name, "file is empty")
    if suffix == ".jsonl":
        return _read_jsonl(raw, name)
    text = _decode(raw, name)
    if suffix == ".json":
        return _read_json(text, name)
    return _read_csv(text, name)


def _fail(name: str, message: str, line: int | None = None):
    raise DataError([Problem(name, line, None, message)])


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16's: FF FE starts both
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))  # fmt: skip


def _as_utf8(raw: bytes, name: str) -> bytes:
    """A text file's bytes as UTF-8. A UTF-16 (or UTF-32) file that starts with its byte-order mark, as Windows
    tools write it ("Unicode" in Notepad, PowerShell's `>`), is unambiguous: it is decoded as that. Other bytes are
    returned as they are, for the readers to check as UTF-8 line by line.

    >>> _as_utf8('{"a": "é"}\\n'.encode("utf-16"), "d.jsonl").decode("utf-8")
    '{"a": "é"}\\n'
    """
    for bom, encoding in _WIDE_BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding.lower()).encode("utf-8")  # the codec reads the mark's byte order
            except UnicodeDecodeError as err:
                line = raw[: err.start].decode(encoding.lower(), "replace").count("\n") + 1
                _fail(name, f"not valid {encoding} (byte 0x{raw[err.start]:02x} at byte {err.start + 1}), though "
                            f"it starts with a {encoding} byte-order mark; save the file as UTF-8", line)  # fmt: skip
    return raw


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        _fail(name, _utf8_message(raw, err), raw.count(b"\n", 0, err.start) + 1)


def _utf8_message(raw: bytes, err: UnicodeDecodeError) -> str:
    line_start = raw.rfind(b"\n", 0, err.start) + 1
    return (
        f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start - line_start + 1}); "
        "save the file as UTF-8"
    )


def _read_jsonl(raw: bytes, name: str) -> tuple[list[Record], list[Problem]]:
    records: list[Record] = []
    problems: list[Problem] = []
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        raw = raw[3:]
    for i, chunk in enumerate(raw.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(name, i, None, _utf8_message(chunk, err)))
            continue
        twice: list[str] = []
        try:
            obj = json.loads(line, object_pairs_hook=functools.partial(_noting_twice, twice))
        except json.JSONDecodeError as err:
            problems.append(Problem(name, i, None, f"malformed JSON: {err.msg} (column {err.colno})"))
            continue
        except RecursionError:  # json's parser recurses per level: ~100k nested brackets
            problems.append(Problem(name, i, None, "malformed JSON: nested too deeply to read"))
            continue
        if twice:
            problems.append(Problem(name, i, twice[0], _twice(twice[0])))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(name, i, None, f"expected a JSON object, got {_json_type(obj)}"))
            continue
        records.append(Record(i, obj))
    return records, problems


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type.

    >>> _json_type([1]), _json_type(None), _json_type(True), _json_type(2.5)
    ('array', 'null', 'boolean', 'number')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number" if isinstance(value, float) else "integer"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _read_json(text: str, name: str) -> tuple[list[Record], list[Problem]]:
    twice: list[str] = []  # keys written twice anywhere: located row by row below (this parse has no lines)
    try:
        top = json.loads(text, object_pairs_hook=functools.partial(_noting_twice, twice))
    except json.JSONDecodeError as err:
        hint = ("; the file holds one JSON object per line (JSON Lines): name it .jsonl"
                if err.msg == "Extra data" and _holds_json_lines(text) else "")  # fmt: skip
        _fail(name, f"malformed JSON: {err.msg} (column {err.colno}){hint}", err.lineno)
    except RecursionError:
        _fail(name, "malformed JSON: nested too deeply to read", None)
    duplicate = twice[0] if twice else None
    shape = 'a JSON list of objects, or an object {"data": [...]} or {"rows": [...]}'
    if isinstance(top, dict):
        key = next((k for k in ("data", "rows") if isinstance(top.get(k), list)), None)
        if key is None:
            _fail(name, f"expected {shape}; the top-level object has keys {sorted(top)[:8]}")
        rows = top[key]
    elif isinstance(top, list):
        key, rows = None, top
    else:
        _fail(name, f"expected {shape}, got {_json_type(top)}")
    offsets = _element_offsets(text, key)
    located = len(offsets) == len(rows)  # always, for text json.loads accepted; row numbers are a safe fallback
    starts = _lines_at(text, offsets) if located else list(range(1, len(rows) + 1))
    shared = {line for line, n in Counter(starts).items() if n > 1}  # lines that do not tell their rows apart
    records, problems = [], []
    for i, (line, row) in enumerate(zip(starts, rows)):
        number = i + 1 if line in shared else None
        if duplicate is not None and located:  # which rows write a key twice
            in_row: list[str] = []
            json.JSONDecoder(object_pairs_hook=functools.partial(_noting_twice, in_row)).raw_decode(text, offsets[i])
            if in_row:
                problems.append(Problem(name, line, in_row[0], _twice(in_row[0]), number))
                continue
        if isinstance(row, dict):
            records.append(Record(line, row, number))
        else:
            problems.append(Problem(name, line, None, f"expected a JSON object, got {_json_type(row)}", number))
    if duplicate is not None and not problems:  # in the top-level object, outside the rows
        _fail(name, _twice(duplicate))
    return records, problems


def _holds_json_lines(text: str) -> bool:
    """Whether each non-blank line of `text` is a JSON object of its own: JSON Lines, as `datasets`'
    `Dataset.to_json("x.json")` writes by default. The readers go by the extension, so it is named, not guessed.

    >>> _holds_json_lines('{"a": 1}\\n\\n{"a": 2}\\n'), _holds_json_lines('[{"a": 1},\\n {"a": 2}]')
    (True, False)
    """
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines)
    except (json.JSONDecodeError, RecursionError):
        return False


def _lines_at(text: str, offsets: list[int]) -> list[int]:
    """The 1-based line of each offset (ascending) in `text`, e.g. where each row of a JSON file starts.

    >>> text = '[\\n {"a": 1},\\n {"a": 2}\\n]'
    >>> _lines_at(text, _element_offsets(text, None))
    [2, 3]
    >>> text = '{"meta": [0],\\n "data": [{"a": 1},\\n  {"a": 2}]}'
    >>> _lines_at(text, _element_offsets(text, "data"))
    [2, 3]
    """
    lines, line, at = [], 1, 0
    for i in offsets:  # counted between consecutive offsets: linear in the file's length
        line, at = line + text.count("\n", at, i), i
        lines.append(line)
    return lines


def _element_offsets(text: str, key: str | None) -> list[int]:
    """The offset in `text` where each element of the top-level array (or of `top[key]`) starts."""
    dec = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n\ufeff":
            i += 1
        return i

    i = skip(0)
    if key is not None:  # walk the top-level object's members to the array under `key`
        i = skip(i + 1)
        while True:
            member, i = dec.raw_decode(text, i)
            i = skip(skip(i) + 1)  # past ':'
            if member == key:
                break
            _, i = dec.raw_decode(text, i)
            i = skip(skip(i) + 1)  # past ','
    i = skip(i + 1)  # past '['
    offsets = []
    while i < len(text) and text[i] != "]":
        offsets.append(i)
        _, i = dec.raw_decode(text, i)
        i = skip(i)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
    return offsets


def _read_csv(text: str, name: str) -> tuple[list[Record], list[Problem]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[Record] = []
    problems: list[Problem] = []
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        _fail(name, f"cannot read the CSV header: {err}", 1)
    header = [h.strip() for h in header]
    if not any(header):
        _fail(name, "the first line must be a header naming the columns", 1)
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        _fail(name, f"the header names {', '.join(map(repr, twice))} twice; each row would keep only the last "
                    "column's cell. Rename or delete one", 1)  # fmt: skip
    unnamed: dict[int, list[int]] = {i: [] for i, h in enumerate(header) if not h}  # lines with a value there
    empty: list[int] = []  # lines of bare commas
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append(Problem(name, start, None, f"malformed CSV: {err}"))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not cells:  # a blank line holds no row, as in JSON Lines
            continue
        if all(c == "" for c in cells):  # bare commas: a row with nothing in it (said below: where it stands)
            empty.append(line)
            continue  # (cells of spaces are a row: its fields are checked, and empty ones named)
        if len(cells) != len(header):
            problems.append(
                Problem(name, line, None, f"{len(cells)} cells, but the header has {len(header)}")
            )
            continue
        row: dict[str, Any] = {}
        for i, (col, cell) in enumerate(zip(header, cells)):
            if cell == "":
                continue  # an empty cell is an absent field
            if not col:  # said once for the file, below: the same on every row
                unnamed[i].append(line)
                continue
            row[col] = _csv_cell(col, cell, name, line, problems)
        records.append(Record(line, row))
    # Bare commas after the last row are a spreadsheet's trailing rows: skipped, and said; among the rows, a row
    # with nothing in it is named as a JSONL `{}` row is (a row lost from the middle of the data)
    last = max([r.line for r in records] + [p.line or 0 for p in problems], default=0)
    problems += [Problem(name, line, None, "every cell is empty: fill the row in or delete the line")
                 for line in empty if line < last]  # fmt: skip
    if trailing := [line for line in empty if line > last]:
        warnings.warn(f"{name}: {len(trailing)} row(s) after the last one have every cell empty ({_some_lines(trailing)}): "
                      "skipped, as a spreadsheet's trailing rows", stacklevel=2)  # fmt: skip
    if any(unnamed.values()):  # (an unnamed column left empty, as a trailing comma on every line makes, holds nothing)
        raise DataError([Problem(name, 1, f"(unnamed column {i + 1})", _unnamed(lines))
                         for i, lines in unnamed.items() if lines])  # fmt: skip
    carriage = [r.line for r in records if any(isinstance(v, str) and "\r" in v for v in r.data.values())]
    if carriage:  # a file whose line ends were all converted to Windows ones: its cells' line breaks too
        rows = f"{len(carriage)} rows hold" if len(carriage) > 1 else "1 row holds"
        warnings.warn(f"{name}: {rows} a carriage return (\\r, Windows line ends) inside a cell "
                      f"({_some_lines(carriage)}): kept as written, so the model reads it; save the file with \\n line "
                      "ends if the text is not meant to hold it", stacklevel=2)  # fmt: skip
    return records, problems


def _some_lines(lines: list[int]) -> str:
    """
    >>> _some_lines([4]), _some_lines([2, 3, 5, 7, 11, 13, 17])
    ('line 4', 'lines 2, 3, 5, 7, 11 and 2 more')
    """
    if len(lines) == 1:
        return f"line {lines[0]}"
    return f"lines {', '.join(map(str, lines[:5]))}" + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")


def _unnamed(lines: list[int]) -> str:
    rows = f"{len(lines)} rows hold" if len(lines) > 1 else "1 row holds"
    return (f"the header names no column here, yet {rows} a value in it ({_some_lines(lines)}): an unnamed column, "
            "such as the index pandas writes without to_csv(index=False); name the column in the header, or delete "
            "it")  # fmt: skip


def _csv_cell(col: str, cell: str, name: str, line: int, problems: list[Problem]) -> Any:
    """Parse JSON held in a CSV cell where the column expects it, and numbers in a number column (a cell that is
    not one stays text, for the schema to name); other cells stay strings."""
    stripped = cell.strip()
    if col in _NUMBER_CELLS:  # a JSON number only (float() would also take "1_000", "infinity", other digits)
        return float(stripped) if _JSON_NUMBER.fullmatch(stripped) else cell
    if col in _JSON_CELLS and stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            problems.append(Problem(name, line, col, f"cell is not valid JSON: {err.msg}"))
            return cell
    if col in _MESSAGE_CELLS and stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return value
    return cell


def _read_parquet(p: Path, name: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as err:
        _fail(name, f"not a readable Parquet file: {err}")
    return _columnar_records(rows)


def _read_datasets_dir(p: Path, name: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(name, f"a folder, but not a `datasets` folder written by save_to_disk ({err})")
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:  # no split is a safe guess: `train` given as data.eval would score the training rows
            _fail(name, _one_split(name, sorted(ds)))
        ds = next(iter(ds.values()))
    rows = ds.to_list()
    if not rows:
        _fail(name, "the dataset has no rows")
    return _columnar_records(rows)


def _one_split(name: str, splits: list[str]) -> str:
    """Which folders to give for a DatasetDict of several splits: `save_to_disk` writes each split as a folder of
    its own, which `datasets.load_from_disk` reads as a Dataset.

    >>> print(_one_split("ds", ["test", "train", "validation"]))
    a DatasetDict of splits test, train, validation: give one split's folder, ds/test, ds/train or ds/validation
    """
    folders = [str(Path(name) / split) for split in splits]
    return (f"a DatasetDict of splits {', '.join(splits)}: give one split's folder, "
            f"{', '.join(folders[:-1])} or {folders[-1]}")  # fmt: skip


def _columnar_records(rows: list[dict]) -> list[Record]:
    return [Record(i, _without_nulls(row)) for i, row in enumerate(rows, start=1)]


def _without_nulls(value: Any) -> Any:
    """`value` without the null-valued keys of its dicts, at any depth: in a columnar file a null is how an absent
    field looks. Columns are shared by all rows, and so are a struct's fields: Arrow gives every message a `name`
    of null once one message of the file has a `name`. A null list element stays (it is not a field).

    >>> _without_nulls({"a": None, "messages": [{"role": "user", "name": None}, None], "meta": {"k": {"x": None}}})
    {'messages': [{'role': 'user'}, None], 'meta': {'k': {}}}
    """
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def truncate_step_records(path: Path, step: int) -> None:
    """Keep the records of a JSONL file of step records (`metrics.jsonl`, `samples.jsonl`) up to `step`; drop
    the later ones and any line cut by a kill (a resumed run redoes the lost work and logs it again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9 mid-write
        if rec.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
