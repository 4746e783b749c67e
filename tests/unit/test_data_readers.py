"""Readers: every format gives located records; every unreadable input is a DataError naming file and line."""

import codecs
import json
import re

import pytest

from posttrain.data import load_rows, read_records
from posttrain.data.readers import read_records_lenient
from posttrain.errors import DataError, UserError

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def problems(path) -> list[str]:
    with pytest.raises(DataError) as info:
        read_records(path)
    return [str(p) for p in info.value.problems]


def test_jsonl_lines_skip_blanks(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    recs = read_records(f)
    assert [(r.line, r.data) for r in recs] == [(1, ROWS[0]), (4, ROWS[1])]


def test_json_list_gives_start_line_of_each_object(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a",\n   "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}\n]\n')
    assert [(r.line, r.data) for r in read_records(f)] == [(2, ROWS[0]), (5, ROWS[1])]


@pytest.mark.parametrize("key", ["data", "rows"])
def test_json_wrapped_list(tmp_path, key):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"version": [1, 2], key: ROWS}, indent=1))
    recs = read_records(f)
    assert [r.data for r in recs] == ROWS
    lines = f.read_text().splitlines()
    assert [lines[r.line - 1].strip() for r in recs] == ["{", "{"]  # each row's own opening brace


def test_csv_lines_and_json_cells(tmp_path):
    f = tmp_path / "d.csv"
    msgs = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    f.write_text(
        'prompt,completion,messages\n"multi\nline",b,\n,,"' + msgs.replace('"', '""') + '"\n',
        encoding="utf-8",
    )
    recs = read_records(f)
    assert [r.line for r in recs] == [2, 4]  # the quoted newline makes row 1 span lines 2-3
    assert recs[0].data == {"prompt": "multi\nline", "completion": "b"}  # empty cells are absent fields
    assert recs[1].data == {"messages": json.loads(msgs)}


def test_a_csv_row_of_blank_cells_is_a_row_and_a_line_of_bare_commas_is_a_problem(tmp_path):
    """`" "," "` is a row whose fields are blank: loading skipped it silently, where the same row in JSONL is named
    (empty prompt, empty completion). A line of bare commas (a spreadsheet's empty row) was skipped too: a file of 3 data lines,
    the middle one `,`, validated as 2 rows OK; it is a counted problem, as a JSONL `{}` row is. A blank line holds
    no row (as in JSONL)."""
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\nq0,a0\n" "," "\n,\n\nq2,a2\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert str(info.value).splitlines() == [
        f"{f}: 3 problem(s) in 2 of 4 rows; no sft data loaded",
        f"{f}:3: prompt: empty prompt; text with no prompt trains as a `text` row (every token)",
        f"{f}:3: completion: empty completion",
        f"{f}:4: every cell is empty: fill the row in or delete the line",
    ]
    g = tmp_path / "g.csv"
    g.write_text("prompt,completion\nq0,a0\n,\nq2,a2\n\n", encoding="utf-8")
    records, found = read_records_lenient(g)
    assert [r.line for r in records] == [2, 4]
    assert [str(p) for p in found] == [f"{g}:3: every cell is empty: fill the row in or delete the line"]
    # after the last row they are a spreadsheet's trailing rows: skipped, and said
    t = tmp_path / "t.csv"
    t.write_text("prompt,completion\nq0,a0\nq1,a1\n,\n,\n", encoding="utf-8")
    with pytest.warns(UserWarning) as said:
        records, found = read_records_lenient(t)
    assert ([r.line for r in records], found) == ([2, 3], [])
    assert [str(w.message) for w in said] == [f"{t}: 2 row(s) after the last one have every cell empty (lines 4, 5): "
                                              "skipped, as a spreadsheet's trailing rows"]  # fmt: skip


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"prompt": "e", "completion": None}]), f)
    recs = read_records(f)
    assert [(r.line, r.data) for r in recs] == [(1, ROWS[0]), (2, ROWS[1]), (3, {"prompt": "e"})]


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_a_null_inside_a_nested_object_of_a_columnar_file_is_an_absent_field(tmp_path, fmt):
    """Arrow gives a struct's fields to every row: one message with a `name` gave every message `name: None`, and
    `messages[0].name: unknown field` was reported on rows that never had one."""
    import datasets

    named = [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo"}]
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    table = datasets.Dataset.from_list([{"messages": named}, {"messages": plain}])
    f = tmp_path / ("d.parquet" if fmt == "parquet" else "ds")
    if fmt == "parquet":
        table.to_parquet(str(f))
    else:
        table.save_to_disk(str(f))
    assert [r.data for r in read_records(f)] == [{"messages": named}, {"messages": plain}]
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert [str(p) for p in info.value.problems] == [
        f"{f}:1: messages[0].name: unknown field (allowed here: role, content)"]


def test_a_null_inside_a_json_row_stays_an_error(tmp_path):
    """In JSON a null is written on purpose: it is not taken for an absent field."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a", "name": null}, '
                 '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert [str(p) for p in info.value.problems] == [
        f"{f}:1: messages[0].name: unknown field (allowed here: role, content)"]


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert [(r.line, r.data) for r in read_records(tmp_path / "ds")] == [(1, ROWS[0]), (2, ROWS[1])]
    assert [r.data for r in read_records(tmp_path / "dd")] == ROWS[:1]  # a DatasetDict of one split: that split


def test_a_datasets_folder_of_several_splits_is_refused_naming_each_split_folder(tmp_path):
    """A DatasetDict of train and test splits read its train split silently, also as data.eval (an eval loss on
    the training rows). Each split is a folder of its own that reads as a Dataset."""
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:])}).save_to_disk(str(dd))  # fmt: skip
    assert problems(dd) == [f"{dd}: a DatasetDict of splits test, train: give one split's folder, {dd}/test or "
                            f"{dd}/train"]  # fmt: skip
    assert [(r.line, r.data) for r in read_records(dd / "train")] == [(1, ROWS[0])]
    assert [(r.line, r.data) for r in read_records(dd / "test")] == [(1, ROWS[1])]


def test_malformed_json_lines_all_reported(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n[1, 2]\n')
    assert problems(f) == [
        f"{f}:2: malformed JSON: Expecting property name enclosed in double quotes (column 16)",
        f"{f}:3: expected a JSON object, got array",
    ]


def test_non_utf8_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert problems(f) == [f"{f}:2: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"]
    g = tmp_path / "latin1.csv"
    g.write_bytes(b"text\nok\ncaf\xe9\n")
    assert problems(g) == [f"{g}:3: not valid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path, encoding, suffix):
    """Windows tools write UTF-16 with a byte-order mark: it gave one `not valid UTF-8 (byte 0xff ...)` line and
    then a `malformed JSON` line for every other line. With the mark, the encoding is unambiguous."""
    rows = [{"prompt": "café", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    text = {".jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
            ".json": json.dumps(rows, indent=1, ensure_ascii=False),
            ".csv": "prompt,completion\r\ncafé,b\r\nc,d\r\n"}[suffix]  # fmt: skip
    f = tmp_path / f"d{suffix}"
    bom = codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b""  # utf-16 and utf-32 write their own
    f.write_bytes(bom + text.encode(encoding))
    assert [r.data for r in read_records(f)] == rows


def test_a_utf16_file_that_breaks_off_is_one_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes('{"text": "a"}\n{"text": "b"}\n'.encode("utf-16") + b"\x00")  # an odd byte at the end
    # the 2-byte mark and 28 characters of 2 bytes each: the odd byte is byte 59, on line 3
    assert problems(f) == [f"{f}:3: not valid UTF-16 (byte 0x00 at byte 59), though it starts with a UTF-16 "
                           "byte-order mark; save the file as UTF-8"]  # fmt: skip
    g = tmp_path / "bom.jsonl"
    g.write_bytes(" \n ".encode("utf-16"))  # the mark and spaces
    assert problems(g) == [f"{g}: file is empty"]


def test_malformed_json_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    assert problems(f) == [
        f"{f}:3: malformed JSON: Expecting property name enclosed in double quotes (column 10)"
    ]


def test_json_lines_named_json_are_told_to_be_named_jsonl(tmp_path):
    """`datasets.Dataset.to_json("x.json")` writes JSON Lines: it failed with `malformed JSON: Extra data` alone."""
    import datasets

    f = tmp_path / "hf_export.json"
    datasets.Dataset.from_list(ROWS).to_json(str(f))
    assert problems(f) == [f"{f}:2: malformed JSON: Extra data (column 1); the file holds one JSON object per line "
                           "(JSON Lines): name it .jsonl"]  # fmt: skip
    g = tmp_path / "two.json"  # two arrays: not JSON Lines of objects, so no such hint
    g.write_text("[1]\n[2]\n")
    assert problems(g) == [f"{g}:2: malformed JSON: Extra data (column 1)"]


def test_rows_of_a_json_array_on_one_line_are_told_apart_by_their_row(tmp_path):
    """`json.dump` writes an array on one line: every problem said line 1 (`big_compact.json:1: completion: empty
    completion` for rows 504 and 908). The line stays the line; the row is added where the line holds several."""
    rows = [{"prompt": f"q{i}", "completion": "" if i in (503, 907) else "a"} for i in range(1000)]
    f = tmp_path / "big_compact.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert str(info.value).splitlines() == [
        f"{f}: 2 problem(s) in 2 of 1000 rows; no sft data loaded",
        f"{f}:1 (row 504): completion: empty completion",
        f"{f}:1 (row 908): completion: empty completion",
    ]
    g = tmp_path / "mixed.json"  # rows alone on their line keep the plain FILE:LINE
    g.write_text('[{"prompt": "q", "completion": ""}, 3,\n {"prompt": "q", "completion": ""}]')
    with pytest.raises(DataError) as info:
        load_rows(g, "sft")
    assert [str(p) for p in info.value.problems] == [
        f"{g}:1 (row 1): completion: empty completion",
        f"{g}:1 (row 2): expected a JSON object, got integer",
        f"{g}:2: completion: empty completion",
    ]


def test_json_wrong_top_level(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"items": []}')
    assert problems(f) == [
        f'{f}: expected a JSON list of objects, or an object {{"data": [...]}} or {{"rows": [...]}}; '
        "the top-level object has keys ['items']"
    ]


def test_carriage_returns_inside_csv_cells_are_kept_and_said(tmp_path):
    """A CSV whose line ends were converted to Windows ones holds \\r\\n inside its quoted cells too: kept as
    written (the data is the user's), and said once, with the lines."""
    import warnings

    f = tmp_path / "crlf.csv"
    f.write_bytes(b'prompt,completion\r\n"line one\r\nline two",ok\r\nplain,fine\r\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = load_rows(f, "sft")
    assert rows[0]["messages"][0]["content"] == "line one\r\nline two" and rows[1]["messages"][0]["content"] == "plain"
    assert [str(w.message) for w in caught] == [
        f"{f}: 1 row holds a carriage return (\\r, Windows line ends) inside a cell (line 2): kept as written, so the "
        "model reads it; save the file with \\n line ends if the text is not meant to hold it"]


def test_an_unnamed_csv_column_holding_values_is_named_once(tmp_path):
    """pandas' `to_csv` writes its index under an empty header cell: every row said `unknown field (allowed here:
    ...)` with no field. It is said once, at the header, with what it likely is; an unnamed column left empty (a
    trailing comma on every line) holds nothing and is read as before."""
    import pandas as pd

    f = tmp_path / "pandas_index.csv"
    pd.DataFrame(ROWS * 4).to_csv(f)
    assert problems(f) == [
        f"{f}:1: (unnamed column 1): the header names no column here, yet 8 rows hold a value in it (lines 2, 3, 4, 5, "
        "6 and 3 more): an unnamed column, such as the index pandas writes without to_csv(index=False); name the "
        "column in the header, or delete it"]  # fmt: skip
    g = tmp_path / "trailing.csv"
    g.write_text("prompt,completion,\nq,a,\nq,b,x\n")
    assert problems(g) == [
        f"{g}:1: (unnamed column 3): the header names no column here, yet 1 row holds a value in it (line 3): an "
        "unnamed column, such as the index pandas writes without to_csv(index=False); name the column in the header, "
        "or delete it"]  # fmt: skip
    g.write_text("prompt,completion,\nq,a,\nq,b,\n")
    assert [r.data for r in read_records(g)] == [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "b"}]


def test_csv_wrong_cell_count(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,completion\na,b\na,b,c\n")
    assert problems(f) == [f"{f}:3: 3 cells, but the header has 2"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "file not found"),
        ("empty.jsonl", b"  \n\n", "file is empty"),
        ("d.txt", b"hello", "unsupported file type '.txt'; supported: .jsonl, .json, .csv, .parquet, "
         "any of the first three gzipped (.jsonl.gz, ...), a `datasets` folder (save_to_disk)"),
        ("d.parquet", b"not parquet", None),
    ],
)  # fmt: skip
def test_file_level_errors(tmp_path, name, content, message):
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_records(f)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{f}: ")
    if message:
        assert text == f"{f}: {message}"
    else:
        assert "not a readable Parquet file" in text


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="not a `datasets` folder"):
        read_records(tmp_path / "empty_dir")


def test_a_key_written_twice_in_a_row_is_named_not_silently_dropped(tmp_path):
    """`json.loads` keeps the last value of a key written twice: `"completion": "right", "completion": "wrong"`
    trained on "wrong" (an audit of silent data handling, eighteenth session). Also inside a message, and in a
    JSON file's rows."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "q", "completion": "right", "completion": "wrong"}\n'
                 '{"prompt": "q", "completion": "ok"}\n'
                 '{"messages": [{"role": "user", "content": "a", "content": "b"}]}\n')  # fmt: skip
    says = "is written twice in this object; JSON would silently keep only the second value. Delete one of them"
    assert problems(f) == [f"{f}:1: completion: `completion` {says}", f"{f}:3: content: `content` {says}"]
    g = tmp_path / "d.json"
    g.write_text('[\n {"prompt": "q", "completion": "a"},\n {"prompt": "q",\n  "prompt": "r", "completion": "b"}\n]')
    assert problems(g) == [f"{g}:3: prompt: `prompt` {says}"]
    h = tmp_path / "w.json"
    h.write_text(json.dumps({"data": ROWS})[:-1] + ', "data": []}')  # the wrapper's own key, twice
    assert problems(h) == [f"{h}: `data` {says}"]


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,completion,completion\nq,a,b\n")
    assert problems(f) == [f"{f}:1: the header names 'completion' twice; each row would keep only the last "
                           "column's cell. Rename or delete one"]  # fmt: skip


def test_a_csv_margin_cell_is_read_as_a_number(tmp_path):
    """CSV cells are text, so a CSV file could not carry a margin: every one was "must be a number, got string"."""
    f = tmp_path / "d.csv"
    f.write_text("prompt,chosen,rejected,margin\nq,a,b,1.5\nq,a,b,\nq,a,b,lots\nq,a,b, 2e1 \nq,a,b,1_000\nq,a,b,infinity\n")
    # a JSON number only: float() would also read "1_000" and "infinity"
    assert [r.data.get("margin") for r in read_records(f)] == [1.5, None, "lots", 20.0, "1_000", "infinity"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_too_deeply_is_a_data_error(tmp_path, suffix):
    """100k nested brackets raised RecursionError from json's parser (an audit, nineteenth session)."""
    f = tmp_path / f"deep{suffix}"
    f.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="nested too deeply to read"):
        read_records(f)


def test_gzipped_files_read_as_their_inner_format(tmp_path):
    """The hub ships many files gzipped (HH-RLHF's train.jsonl.gz): read through gzip, problems on the same lines."""
    import gzip

    f = tmp_path / "train.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n'))
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert [str(p) for p in info.value.problems] == [f"{f}:2: completion: missing required field"]
    c = tmp_path / "d.csv.gz"
    c.write_bytes(gzip.compress(b"prompt,completion\nq,a\n"))
    assert load_rows(c, "sft")[0]["messages"][1]["content"] == "a"
    for name, data, message in (("d.parquet.gz", b"x", "unsupported file type '.parquet.gz'"),
                                ("cut.jsonl.gz", gzip.compress(b'{"a": 1}\n')[:-6], "the gzip stream ends early"),
                                ("not.jsonl.gz", b"plain text", "cannot read the file: Not a gzipped file")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=re.escape(message)):
            read_records(tmp_path / name)
