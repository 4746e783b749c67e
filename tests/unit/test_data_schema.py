"""Row checks: every bad-input case gives the exact `FILE:LINE: field: message` line; good rows normalise."""

import json

import pytest

from posttrain.data import load_rows, validate_file
from posttrain.errors import DataError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def write(tmp_path, rows, name="d.jsonl"):
    f = tmp_path / name
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return f


def problems(path, kind="sft") -> list[str]:
    with pytest.raises(DataError) as info:
        load_rows(path, kind)
    return [str(p) for p in info.value.problems]


def test_sft_shapes_normalise(tmp_path):
    f = write(tmp_path, [
        {"messages": [U, A], "id": 7},
        {"prompt": "2+2?", "completion": "4", "answer": 4, "metadata": {"k": 1}},
        {"prompt": [{"role": "system", "content": "be brief"}, U], "completion": [A]},
        {"text": "plain text"},
    ])  # fmt: skip
    rows = load_rows(f, "sft")
    assert rows[0] == {"messages": [U, A], "completion_only": True, "id": 7}
    assert rows[1] == {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "completion_only": True, "n_prompt": 1, "answer": 4, "metadata": {"k": 1},
    }  # fmt: skip
    assert rows[2]["messages"][0]["role"] == "system" and rows[2]["n_prompt"] == 2
    assert rows[3] == {"text": "plain text", "completion_only": False}
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert validate_file(f, "sft") == f"{f}: 4 sft rows OK (prompt/completion: 2, messages: 1, text: 1)"


def test_every_sft_problem_is_reported_with_file_line_field(tmp_path):
    f = write(tmp_path, [
        {"prompt": "q"},                                                    # 1 missing completion
        {"prompt": "q", "completion": "a", "score": 3},                     # 2 unknown field
        {"messages": [U, {"role": "assistant", "content": 5}]},             # 3 wrong type
        {"prompt": "q", "completion": "  "},                                # 4 empty completion
        {"messages": [U, {"role": "assistant", "content": ""}]},            # 5 empty assistant content
        {"messages": [U]},                                                  # 6 no assistant turn
        {"messages": [{"role": "bot", "content": "x"}, A]},                 # 7 bad role
        {"prompt": 3, "completion": "a"},                                   # 8 neither string nor messages
        {"messages": [U, A], "text": "x"},                                  # 9 mixed shapes
        {"foo": 1},                                                         # 10 nothing recognisable
        "{not json",                                                        # 11 malformed JSON
        {"messages": [U, {"role": "assistant"}], "metadata": "x"},          # 12 missing content + wrong type
        {"messages": [U, A]},                                               # 13 fine
    ])  # fmt: skip
    allowed = "prompt, completion, system, id, answer, metadata"
    assert problems(f) == [
        f"{f}:1: completion: missing required field",
        f"{f}:2: score: unknown field (allowed here: {allowed})",
        f"{f}:3: messages[1].content: must be a string, got integer",
        f"{f}:4: completion: empty completion",
        f"{f}:5: messages[1].content: assistant content is empty",
        f"{f}:6: messages: no assistant turn: nothing to train on",
        f"{f}:7: messages[0].role: must be one of system, user, assistant; got 'bot'",
        f"{f}:8: prompt: must be a string or a list of messages, got integer",
        f"{f}:9: mixes row shapes (messages and text): use exactly one of messages or prompt+completion or text",
        f"{f}:10: no sft fields: expected messages or prompt+completion or text (this row has: foo)",
        f"{f}:11: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{f}:12: messages[1].content: missing required field",
        f"{f}:12: metadata: must be an object, got string",
    ]


def test_error_header_counts_rows(tmp_path):
    f = write(tmp_path, [{"messages": [U, A]}, {"messages": [U]}, "[]"])
    with pytest.raises(DataError) as info:
        load_rows(f, "sft")
    assert str(info.value).splitlines()[0] == f"{f}: 2 problem(s) in 2 of 3 rows; no sft data loaded"


def test_zero_rows(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[]")
    assert problems(f) == [f"{f}: no rows: nothing to use as sft data"]


def test_csv_rows_get_file_lines(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,completion\nq1,a1\nq2,\n", encoding="utf-8")
    assert problems(f) == [f"{f}:3: completion: missing required field"]


def test_json_rows_report_the_line_their_object_starts(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"messages": [U, A]}, {"messages": [U]}], indent=2))
    assert problems(f) == [f"{f}:14: messages: no assistant turn: nothing to train on"]


def test_preference_rows(tmp_path):
    conv = lambda reply: [U, {"role": "assistant", "content": reply}]  # noqa: E731
    f = write(tmp_path, [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": conv("good"), "rejected": conv("bad"), "id": "x"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "good"},
        {"prompt": "q", "chosen": "", "rejected": "bad"},
    ])  # fmt: skip
    assert problems(f, "preference") == [
        f"{f}:3: rejected: identical to chosen: the pair carries no preference",
        f"{f}:4: rejected: missing required field",
        f"{f}:5: chosen: empty response (no assistant content)",
    ]
    g = write(tmp_path, [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": conv("good"), "rejected": conv("bad"), "id": "x"},
    ], "ok.jsonl")  # fmt: skip
    rows = load_rows(g, "preference")
    assert rows[0] == {"prompt": [{"role": "user", "content": "q"}],
                       "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]}  # fmt: skip
    assert rows[1] == {"prompt": [U], "chosen": conv("good")[1:], "rejected": conv("bad")[1:], "id": "x"}
    assert (
        validate_file(g, "preference")
        == f"{g}: 2 preference rows OK (prompt/chosen/rejected: 1, chosen/rejected: 1)"
    )


def test_whole_conversation_pairs_must_answer_one_prompt(tmp_path):
    """Conversations that differ before the assistant's reply are two prompts, not one pair: trained, their
    common part (nothing here) would be the prompt and each side's user message part of its response."""
    other = {"role": "user", "content": "something else"}
    f = write(tmp_path, [{"chosen": [U, A], "rejected": [other, {"role": "assistant", "content": "b"}]}])
    assert problems(f, "preference") == [
        f"{f}:1: chosen: message 1 is a 'user' message that differs from the other side's: a pair is two replies "
        "to one prompt, so every message before the assistant's reply must be the same on both sides"
    ]


def test_prompts_rows_keep_other_columns(tmp_path):
    f = write(tmp_path, [{"prompt": "q", "answer": 4, "schema": {"type": "object"}}, {"prompt": [U]}])
    rows = load_rows(f, "prompts")
    assert rows == [{"prompt": [{"role": "user", "content": "q"}], "answer": 4, "schema": {"type": "object"}},
                    {"prompt": [U]}]  # fmt: skip
    g = write(tmp_path, [{"question": "q"}, {"prompt": ""},
                         {"prompt": [{"role": "system", "content": " "}, {"role": "user", "content": "\n\t"}]}],
              "bad.jsonl")  # fmt: skip
    assert problems(g, "prompts") == [
        f"{g}:1: no prompts fields: expected prompt or messages (this row has: question)",
        f"{g}:2: prompt: empty prompt",
        f"{g}:3: prompt: empty prompt: every message's content is blank",
    ]
    # an SFT chat file read as prompts (evaluate --data, generate --prompts-file, an RL run's data.train): the
    # messages before the last assistant turn are the prompt, that turn's text the `completion` column
    S = {"role": "system", "content": "be brief"}
    chat = write(tmp_path, [{"messages": [U, {"role": "assistant", "content": "4"}], "id": 7},
                            {"messages": [S, U, A, U]},
                            {"messages": [A]},
                            {"messages": [U, A], "completion": "x"}], "chat.jsonl")  # fmt: skip
    assert problems(chat, "prompts") == [
        f"{chat}:3: messages: holds only an assistant turn: no prompt to sample from",
        f"{chat}:4: completion: a messages row read as a prompt keeps its last assistant turn as its completion "
        "column, and this row has one already; rename or leave one out"]  # fmt: skip
    good = write(tmp_path, [{"messages": [U, {"role": "assistant", "content": "4"}], "id": 7},
                            {"messages": [S, U, A, U]}], "good.jsonl")  # fmt: skip
    assert load_rows(good, "prompts") == [{"id": 7, "prompt": [U], "completion": "4"},
                                          {"prompt": [S, U, A, U]}]  # fmt: skip
    # a prompt beside a messages column: the prompt is read, the messages column kept for the rewards (as it was)
    both = write(tmp_path, [{"prompt": "hi", "messages": [U, A]}], "both.jsonl")
    assert load_rows(both, "prompts") == [{"prompt": [U], "messages": [U, A]}]


def test_unknown_kind_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        load_rows(write(tmp_path, [{"text": "x"}]), "dpo")


def test_prompts_rows_may_not_use_the_columns_the_rollout_adds(tmp_path):
    """`data validate --kind prompts` refuses them as training does (it said OK, then `train` refused the file)."""
    f = write(tmp_path, [{"prompt": "add 1 2", "answer": 3}, {"prompt": "add 2 2", "truncated": False}])
    assert problems(f, "prompts") == [
        f"{f}:2: truncated: this column name is reserved: the rollout passes its own to the reward functions "
        "(docs/rewards.md); rename it"
    ]


def test_sft_rows_given_as_preference_data_say_so_once_per_row(tmp_path):
    """They were five problems a row (chosen and rejected missing, each twice, and `completion` unknown)."""
    f = write(tmp_path, [{"prompt": "q", "completion": "a"}, {"messages": [U, A]}])
    assert problems(f, "preference") == [
        f"{f}:1: a prompt/completion row is SFT data, not a preference pair: a pair needs a prompt, a chosen and a "
        "rejected response (`posttrain data make TASK --kind preference` writes them)",
        f"{f}:2: a messages row is SFT data, not a preference pair: a pair needs a prompt, a chosen and a "
        "rejected response (`posttrain data make TASK --kind preference` writes them)",
    ]


def test_rows_that_would_render_wrongly_are_refused(tmp_path):
    """An empty prompt (SFT and preference), a preference side that repeats its prompt (UltraFeedback's layout:
    the prompt string and each side the whole conversation), and string sides without a prompt (an HH transcript)
    validated and then trained on malformed sequences; each is refused with the way to read the row."""
    f = write(tmp_path, [{"prompt": "", "completion": "x"},
                         {"prompt": [{"role": "user", "content": " "}], "completion": "x"}])  # fmt: skip
    way = "; text with no prompt trains as a `text` row (every token)"
    assert problems(f) == [f"{f}:1: prompt: empty prompt{way}",
                           f"{f}:2: prompt: empty prompt: every message's content is blank{way}"]  # fmt: skip
    side = lambda text: [U, {"role": "assistant", "content": text}]  # noqa: E731
    p = write(tmp_path, [{"prompt": "hi", "chosen": side("a"), "rejected": side("b")},
                         {"prompt": "hi", "chosen": "a", "rejected": side("b")},
                         {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
                         {"prompt": "", "chosen": "a", "rejected": "b"}], "p.jsonl")  # fmt: skip
    assert problems(p, "preference") == [
        f"{p}:1: chosen: begins with the prompt's 1 message(s), so the prompt would be rendered twice. Sides that are "
        "whole conversations need no prompt column: leave it out (data.ignore_columns: [prompt]; --ignore-column "
        "prompt) and the messages both sides begin with become the prompt",
        f"{p}:2: rejected: begins with the prompt's 1 message(s), so the prompt would be rendered twice. Sides that "
        "are whole conversations need no prompt column: leave it out (data.ignore_columns: [prompt]; --ignore-column "
        "prompt) and the messages both sides begin with become the prompt",
        f"{p}:3: chosen: is a string and the row has no prompt: without a prompt column, chosen and rejected are whole "
        "conversations, lists of messages that begin alike; this row's are transcripts, read as their turns with "
        'data.turns: {user: "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}; --turn \'user=\\n\\nHuman:\' '
        "--turn 'assistant=\\n\\nAssistant:'",
        f"{p}:4: prompt: empty prompt"]  # fmt: skip
    # following the advice reads row 1 as the pair it is: the user turn once, as the prompt
    from posttrain.data.columns import Columns

    (row,) = load_rows(write(tmp_path, [{"prompt": "hi", "chosen": side("a"), "rejected": side("b")}], "uf.jsonl"),
                       "preference", Columns(ignore=("prompt",)))  # fmt: skip
    assert row == {"prompt": [U], "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip


def test_a_system_column_leads_the_prompt(tmp_path):
    """orca_dpo_pairs' `system` (and an SFT or prompts file's): the prompt's first message, a blank one none; a
    prompt that has its own system message is refused with it. A prompts row keeps it as a column too (a reward
    may read it)."""
    S = {"role": "system", "content": "Be brief."}
    f = write(tmp_path, [{"system": "Be brief.", "prompt": "hi", "completion": "hello"},
                         {"system": " ", "prompt": "hi", "completion": "hello"},
                         {"system": "x", "prompt": [S, U], "completion": "hello"}])  # fmt: skip
    assert problems(f) == [f"{f}:3: system: the prompt begins with a system message already: give one of the two"]
    rows = load_rows(write(tmp_path, [{"system": "Be brief.", "prompt": "hi", "completion": "hello"},
                                      {"system": "", "prompt": "hi", "completion": "hello"}], "ok.jsonl"), "sft")  # fmt: skip
    assert [r["messages"][: r["n_prompt"]] for r in rows] == [[S, U], [U]] and "system" not in rows[0]
    pair = load_rows(write(tmp_path, [{"system": "Be brief.", "prompt": "hi", "chosen": "a", "rejected": "b"}], "p.jsonl"),
                     "preference")[0]  # fmt: skip
    assert pair["prompt"] == [S, U] and "system" not in pair
    prompt = load_rows(write(tmp_path, [{"system": "Be brief.", "prompt": "hi", "answer": 3}], "q.jsonl"), "prompts")[0]
    assert prompt == {"prompt": [S, U], "answer": 3, "system": "Be brief."}
