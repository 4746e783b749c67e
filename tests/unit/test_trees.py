"""`posttrain data tree`: message trees, one message per row (oasst1's layout), into SFT rows and preference pairs;
every message left out is counted, every one that cannot be read is named."""

import json

import pytest

from posttrain.data import load_rows
from posttrain.data.trees import tree_rows
from posttrain.errors import DataError

TREE = [
    {"message_id": "r1", "parent_id": None, "role": "prompter", "text": "What is 2+2?", "lang": "en", "rank": None},
    {"message_id": "a1", "parent_id": "r1", "role": "assistant", "text": "4.", "lang": "en", "rank": 0},
    {"message_id": "a2", "parent_id": "r1", "role": "assistant", "text": "5.", "lang": "en", "rank": 1},
    {"message_id": "a3", "parent_id": "r1", "role": "assistant", "text": "Four, I think.", "lang": "en", "rank": 2},
    {"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "And 3+3?", "lang": "en", "rank": None},
    {"message_id": "a4", "parent_id": "p2", "role": "assistant", "text": "6.", "lang": "en", "rank": None},
    {"message_id": "p3", "parent_id": "a2", "role": "prompter", "text": "Sure?", "lang": "en", "rank": None},
    {"message_id": "a5", "parent_id": "p3", "role": "assistant", "text": "No: 4.", "lang": "en", "rank": None},
    {"message_id": "a6", "parent_id": "p3", "role": "assistant", "text": "Yes.", "lang": "en", "deleted": True},
    {"message_id": "r2", "parent_id": None, "role": "prompter", "text": "Hola", "lang": "es", "rank": None},
    {"message_id": "b1", "parent_id": "r2", "role": "assistant", "text": "Hola!", "lang": "es", "rank": 0},
    {"message_id": "x1", "parent_id": "gone", "role": "assistant", "text": "orphan", "lang": "en", "rank": 0},
]
U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731


def write(tmp_path, rows, name="tree.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def test_sft_rows_are_the_best_ranked_replies_each_in_its_own_conversation(tmp_path):
    made = tree_rows(write(tmp_path, TREE), "sft", lang="en")
    assert made.rows == [{"id": "a1", "prompt": [U("What is 2+2?")], "completion": "4."},
                         {"id": "a4", "prompt": [U("What is 2+2?"), A("4."), U("And 3+3?")], "completion": "6."}]  # fmt: skip
    assert (made.trees, made.messages) == (1, 12)
    assert dict(made.skipped) == {"another language than en": 2, "parent not in the file": 1,
                                  "deleted or failing review": 1}  # fmt: skip
    every = tree_rows(write(tmp_path, TREE), "sft", replies="all")  # every reply, both languages
    assert [r["id"] for r in every.rows] == ["a1", "a4", "a2", "a5", "a3", "b1"]
    assert every.rows[3]["prompt"] == [U("What is 2+2?"), A("5."), U("Sure?")]


def test_preference_pairs_are_the_best_reply_against_each_lower_ranked_sibling(tmp_path):
    f = write(tmp_path, TREE)
    made = tree_rows(f, "preference", lang="en")
    assert made.rows == [{"id": "a1>a2", "prompt": [U("What is 2+2?")], "chosen": "4.", "rejected": "5."},
                         {"id": "a1>a3", "prompt": [U("What is 2+2?")], "chosen": "4.", "rejected": "Four, I think."}]  # fmt: skip
    out = tmp_path / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in made.rows), encoding="utf-8")
    assert len(load_rows(out, "preference")) == 2  # posttrain's own layout: trains as it is


def test_messages_that_cannot_be_read_as_a_tree_are_named(tmp_path):
    bad = [{"message_id": "r", "parent_id": None, "role": "prompter", "text": "hi"},
           {"message_id": "q", "parent_id": "r", "role": "prompter", "text": "again"},
           {"message_id": "b", "parent_id": "r", "role": "bot", "text": "yo"},
           {"message_id": "r", "parent_id": None, "role": "prompter", "text": "dup"},
           {"parent_id": "r", "role": "assistant", "text": "no id"}]  # fmt: skip
    f = write(tmp_path, bad)
    with pytest.raises(DataError) as err:
        tree_rows(f, "sft")
    assert [str(p) for p in err.value.problems] == [
        f"{f}:3: role: 'bot' is neither role (assistant, prompter; --role user=NAME reads another)",
        f"{f}:4: message_id: 'r' is the id of an earlier message too",
        f"{f}:5: message_id: missing: each message needs its id, role and text"]  # fmt: skip
    with pytest.raises(DataError) as err:
        tree_rows(write(tmp_path, bad[:2], "two.jsonl"), "sft")
    assert "user replies to a user message (parent_id 'r'): turns alternate" in str(err.value.problems[0])


def test_another_layout_through_keys_and_roles_and_the_command(tmp_path, capsys):
    from posttrain.cli import main

    own = [{"id": 1, "up": None, "who": "human", "body": "Hi", "score": None},
           {"id": 2, "up": 1, "who": "gpt", "body": "Hello!", "score": 0},
           {"id": 3, "up": 1, "who": "gpt", "body": "Go away.", "score": 1}]  # fmt: skip
    f = write(tmp_path, own)
    made = tree_rows(f, "preference", keys={"id": "id", "parent": "up", "role": "who", "content": "body",
                                            "rank": "score"}, roles={"user": "human", "assistant": "gpt"})  # fmt: skip
    assert made.rows == [{"id": "2>3", "prompt": [U("Hi")], "chosen": "Hello!", "rejected": "Go away."}]
    out = tmp_path / "pairs.jsonl"
    argv = ["data", "tree", str(f), "--kind", "preference", "--out", str(out), "--key", "id=id", "--key", "parent=up",
            "--key", "role=who", "--key", "content=body", "--key", "rank=score", "--role", "user=human", "--role",
            "assistant=gpt"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote 1 preference pairs from 1 tree(s) of 3 message(s) to {out}")
    assert [json.loads(line) for line in out.read_text().splitlines()] == made.rows
    assert main(["data", "tree", str(f), "--kind", "sft", "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "message_id: missing" in capsys.readouterr().err


def test_a_loop_of_parent_links_is_counted_not_lost(tmp_path):
    looped = [*TREE[:2], {"message_id": "c1", "parent_id": "c2", "role": "prompter", "text": "x"},
              {"message_id": "c2", "parent_id": "c1", "role": "assistant", "text": "y"}]  # fmt: skip
    made = tree_rows(write(tmp_path, looped), "sft")
    assert [r["id"] for r in made.rows] == ["a1"] and dict(made.skipped) == {"in a loop of parent links": 2}


def test_csv_and_parquet_files_read_as_json_lines_do(tmp_path):
    """A CSV's cells are text ('False', '0.0'): deleted messages, failed reviews and ranks were not read; pandas
    writes the integer ids of a column with nulls as floats (1.0), which matched no id (a review)."""
    import pandas as pd

    rows = [{**r, "deleted": r.get("deleted", False), "review_result": True} for r in TREE]
    want = tree_rows(write(tmp_path, rows), "preference"), tree_rows(write(tmp_path, rows), "sft")
    csv = tmp_path / "tree.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert (tree_rows(csv, "preference").rows, tree_rows(csv, "sft").rows) == (want[0].rows, want[1].rows)
    numbered = [{"message_id": 1, "parent_id": None, "role": "prompter", "text": "Hi"},
                {"message_id": 2, "parent_id": 1, "role": "assistant", "text": "Hello!", "rank": 0},
                {"message_id": 3, "parent_id": 1, "role": "assistant", "text": "Go away.", "rank": 1}]  # fmt: skip
    parquet = tmp_path / "tree.parquet"
    pd.DataFrame(numbered).to_parquet(parquet)
    assert [r["id"] for r in tree_rows(parquet, "preference").rows] == ["2>3"]


def test_tied_ranks_are_no_pair_a_deleted_root_no_tree_and_deep_threads_read(tmp_path):
    tied = [TREE[0], {**TREE[1]}, {**TREE[2], "rank": 0}, TREE[3]]
    assert [r["id"] for r in tree_rows(write(tmp_path, tied), "preference").rows] == ["a1>a3"]
    gone = tree_rows(write(tmp_path, [{**TREE[0], "deleted": True}, *TREE[1:4]], "gone.jsonl"), "sft")
    assert (gone.rows, gone.trees, dict(gone.skipped)) == ([], 0, {"deleted or failing review": 4})
    deep = [{"message_id": f"m{i}", "parent_id": f"m{i - 1}" if i else None, "role": "prompter" if i % 2 == 0
             else "assistant", "text": f"turn {i}"} for i in range(3000)]  # fmt: skip
    made = tree_rows(write(tmp_path, deep, "deep.jsonl"), "sft")
    assert len(made.rows) == 1500 and len(made.rows[-1]["prompt"]) == 2999
    with pytest.raises(DataError, match="'s' is its own parent"):
        tree_rows(write(tmp_path, [{"message_id": "s", "parent_id": "s", "role": "prompter", "text": "x"}], "s.jsonl"),
                  "sft")  # fmt: skip
