"""`data.columns` / `data.ignore_columns` (and `--column` / `--ignore-column`): a file in another tool's column
names reads as the same rows as one in posttrain's; every problem names the file's own column; nothing is read or
left out silently."""

import json

import pytest

from posttrain.data import load_rows, row_shapes
from posttrain.data.columns import Columns, guess_columns
from posttrain.errors import DataError


def write(tmp_path, rows, name="d.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def refused(path, kind, columns):
    with pytest.raises(DataError) as info:
        load_rows(path, kind, columns)
    return info.value


OURS = [{"prompt": "2+2?", "completion": "4", "id": 1}, {"prompt": [{"role": "user", "content": "3+3?"}], "completion": "6", "id": 2}]  # fmt: skip
THEIRS = [{"question": r["prompt"], "response": r["completion"], "uid": r["id"], "source": "x"} for r in OURS]
RENAME = {"prompt": "question", "completion": "response", "id": "uid"}


def test_renamed_and_ignored_columns_give_the_rows_of_a_file_in_posttrains_names(tmp_path):
    ours, theirs = write(tmp_path, OURS, "ours.jsonl"), write(tmp_path, THEIRS, "theirs.jsonl")
    got = load_rows(theirs, "sft", Columns(RENAME, ("source",)))
    assert got == load_rows(ours, "sft")
    assert [r.line for r in got] == [1, 2]
    assert row_shapes(theirs, "sft", Columns(RENAME, ("source",))) == {"prompt/completion": 2}
    pairs = [{"q": "hi", "good": "hello", "bad": "go away", "score": 3}]
    assert load_rows(write(tmp_path, pairs, "p.jsonl"), "preference",
                     Columns({"prompt": "q", "chosen": "good", "rejected": "bad"}, ("score",))) == [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]}]  # fmt: skip


def test_prompts_rows_keep_their_other_columns_and_a_rename_can_name_what_a_reward_reads(tmp_path):
    f = write(tmp_path, [{"problem": "2+2?", "solution": "4", "level": 1}])
    (row,) = load_rows(f, "prompts", Columns({"prompt": "problem", "answer": "solution"}))
    assert row == {"level": 1, "prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    (row,) = load_rows(f, "prompts", Columns({"prompt": "problem"}, ("level",)))
    assert row == {"solution": "4", "prompt": [{"role": "user", "content": "2+2?"}]}


def test_problems_name_the_files_own_columns(tmp_path):
    f = write(tmp_path, [
        {"question": 3, "response": "4"},
        {"question": [{"role": "user", "content": 5}], "response": "6"},
        {"response": "8"},
        {"question": "ok", "response": "9", "notes": "n"},
    ])  # fmt: skip
    err = refused(f, "sft", Columns({"prompt": "question", "completion": "response"}))
    assert [str(p) for p in err.problems] == [
        f"{f}:1: question: must be a string or a list of messages, got integer",
        f"{f}:2: question[0].content: must be a string, got integer",
        f"{f}:3: question: missing required field",
        f"{f}:4: notes: unknown field (allowed here: prompt, completion, system, id, answer, metadata)",
    ]
    assert str(err).splitlines()[0] == f"{f}: 4 problem(s) in 4 of 4 rows; no sft data loaded"
    # the way out of the unknown column is said once, under the problems, copy-pasteable
    assert err.footer == ("Leave out the columns posttrain does not read: data.ignore_columns: [notes] in the run's "
                          "config, or --ignore-column notes on the command line (or rename one to a field with "
                          "data.columns); see docs/data.md.")  # fmt: skip


def test_a_row_with_both_the_renamed_column_and_the_field_itself_is_refused(tmp_path):
    f = write(tmp_path, [{"question": "a", "prompt": "b", "completion": "c"}, {"question": "d", "completion": "e"}])
    err = refused(f, "sft", Columns({"prompt": "question"}))
    assert [str(p) for p in err.problems] == [
        f"{f}:1: prompt: this row has both prompt and question, which data.columns reads as prompt: leave one out "
        "(data.ignore_columns: [prompt])"]  # fmt: skip
    assert "1 problem(s) in 1 of 2 rows" in str(err)
    err = refused(f, "sft", Columns({"prompt": "question"}, cli=True))
    assert err.problems[0].message.endswith("which --column reads as prompt: leave one out (--ignore-column prompt)")
    # swapping two columns is one rename each, applied together: no clash
    swapped = load_rows(write(tmp_path, [{"prompt": "A", "completion": "Q"}], "s.jsonl"), "sft",
                        Columns({"prompt": "completion", "completion": "prompt"}))  # fmt: skip
    assert swapped[0]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_a_column_no_row_has_is_refused_even_when_every_row_is_good(tmp_path):
    f = write(tmp_path, THEIRS)
    err = refused(f, "sft", Columns({**RENAME, "answer": "gold"}, ("source", "sorce")))
    assert [str(p) for p in err.problems] == [
        f"{f}: data.columns reads answer from column 'gold', which no row has",
        f"{f}: data.ignore_columns names column 'sorce', which no row has (its columns: question, response, source, "
        "uid)"]  # fmt: skip
    assert str(err).splitlines()[0] == f"{f}: 2 problem(s); no sft data loaded"


def test_the_error_for_a_file_in_another_tools_names_ends_with_the_settings_that_read_it(tmp_path):
    f = write(tmp_path, [{"instruction": "say hi", "output": "hi", "source": "alpaca"}])
    err = refused(f, "sft", None)
    assert err.footer == (
        "Rename the file's columns to the fields posttrain reads and leave the others out: data.columns: "
        "{prompt: instruction, completion: output} and data.ignore_columns: [source] in the run's config, or "
        "--column prompt=instruction --column completion=output --ignore-column source on the command line; see "
        "docs/data.md.")  # fmt: skip
    assert str(err).endswith(err.footer)
    # following it reads the file
    assert load_rows(f, "sft", Columns({"prompt": "instruction", "completion": "output"}, ("source",)))
    # names that suggest nothing: an example; a problem of another kind: no hint at all
    err = refused(write(tmp_path, [{"a": "x", "b": "y"}], "ab.jsonl"), "sft", None)
    assert err.footer.startswith("Rename the file's columns to the fields posttrain reads with data.columns: "
                                 "{FIELD: COLUMN}")  # fmt: skip
    assert refused(write(tmp_path, [{"prompt": "x", "completion": ""}], "e.jsonl"), "sft", None).footer is None


def test_guess_columns_needs_every_field_of_a_shape():
    assert guess_columns("preference", {"query", "response_chosen", "response_rejected"}) == {
        "prompt": "query", "chosen": "response_chosen", "rejected": "response_rejected"}  # fmt: skip
    assert guess_columns("preference", {"query", "response_chosen"}) == {}
    assert guess_columns("prompts", {"prompt", "gold"}) == {"answer": "gold"}
    assert guess_columns("sft", {"prompt", "output"}) == {"completion": "output"}
    # Alpaca: the input goes on the instruction's prompt (joined), not left out
    assert guess_columns("sft", {"input", "instruction", "output"}) == {"prompt": ["instruction", "input"],
                                                                        "completion": "output"}  # fmt: skip


def test_run_config_refuses_settings_that_cannot_apply_before_anything_is_read():
    from posttrain.algorithms import load_config
    from posttrain.errors import ConfigError

    def message(*overrides):
        with pytest.raises(ConfigError) as info:
            load_config(None, list(overrides))
        return str(info.value)

    assert "data.columns: 'response' is not a field of sft rows (they read: messages, prompt, completion, system, text, id, " \
           "answer, metadata)" in message("data.columns={prompt: q, response: a}")  # fmt: skip
    assert "'completion' is not a field of preference rows" in message(
        "algorithm.name=dpo", "data.columns={completion: a}")  # fmt: skip
    assert "data.columns: prompt and completion both read column 'q'" in message("data.columns={prompt: q, completion: q}")
    assert "column 'q' is both renamed (data.columns) and left out (data.ignore_columns)" in message(
        "data.columns={prompt: q}", "data.ignore_columns=[q]")  # fmt: skip
    assert "renames a column to itself" in message("data.columns={prompt: prompt}")
    # prompts rows pass every column to the rewards: any field name is a rename's target there
    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[numeric_answer]", "data.columns={gold: answer_text}"])
    assert cfg.data.columns == {"gold": "answer_text"}


def test_a_resume_that_changes_the_columns_is_refused():
    from posttrain.algorithms import load_config
    from posttrain.train import _config_changes

    before = load_config(None, ["data.columns={prompt: question}"])
    after = load_config(None, ["data.columns={prompt: question, completion: answer}"])
    assert _config_changes(before.model_dump(mode="json"), after) == [
        "data.columns: {prompt: question} -> {prompt: question, completion: answer}"]  # fmt: skip
    dropped = load_config(None, [])
    assert _config_changes(dropped.model_dump(mode="json"), load_config(None, ["data.ignore_columns=[source]"])) == [
        "data.ignore_columns: [] -> [source]"]  # fmt: skip


def test_a_problem_on_every_row_is_listed_on_five_and_counted(tmp_path):
    from posttrain.errors import problem_lines

    f = write(tmp_path, [{"prompt": "q"}] * 30 + [{"prompt": "q", "completion": ""}])
    err = refused(f, "sft", None)
    assert len(err.problems) == 31  # every problem is kept (data validate --json lists them)
    lines = str(err).splitlines()
    assert lines[0] == f"{f}: 31 problem(s) in 31 of 31 rows; no sft data loaded"
    assert lines[1:7] == [f"{f}:{i}: completion: missing required field" for i in range(1, 6)] + [
        f"{f}:31: completion: empty completion"]  # fmt: skip
    assert lines[7] == f"{f}: ... and 25 more rows with the same problem (completion: missing required field)"
    assert problem_lines(err.problems, same=40) == [str(p) for p in err.problems]


SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                               {"from": "gpt", "value": "4"}], "id": 1}]  # fmt: skip
SHAREGPT_READ = Columns({"messages": "conversations"}, message_keys={"role": "from", "content": "value"},
                        roles={"user": "human", "assistant": "gpt"})  # fmt: skip


def test_messages_in_another_layout_read_as_the_same_chat(tmp_path):
    """ShareGPT's conversations ({from: human|gpt|system, value}) through data.columns, data.message_keys and
    data.roles: the rows of the same chat written in posttrain's names; in prompt/completion and pair sides too."""
    ours = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}], "id": 1}]  # fmt: skip
    assert load_rows(write(tmp_path, SHAREGPT, "sg.jsonl"), "sft", SHAREGPT_READ) == load_rows(
        write(tmp_path, ours, "ours.jsonl"), "sft")  # fmt: skip
    # a prompts file of chats: the prompt before the last assistant turn, as for posttrain's own messages rows
    (row,) = load_rows(write(tmp_path, SHAREGPT, "sg.jsonl"), "prompts", SHAREGPT_READ)
    assert row == {"id": 1, "prompt": ours[0]["messages"][:2], "completion": "4"}
    pairs = [{"prompt": [{"from": "human", "value": "hi"}], "chosen": [{"from": "gpt", "value": "hello"}],
              "rejected": [{"from": "gpt", "value": "go"}]}]  # fmt: skip
    (pair,) = load_rows(write(tmp_path, pairs, "p.jsonl"), "preference", Columns(
        message_keys={"role": "from", "content": "value"}, roles={"user": "human", "assistant": "gpt"}))  # fmt: skip
    assert pair["chosen"] == [{"role": "assistant", "content": "hello"}] and pair["prompt"][0]["role"] == "user"


def test_message_problems_name_the_files_keys_and_unused_names_are_refused(tmp_path):
    f = write(tmp_path, [{"conversations": [{"from": "human", "value": 3}, {"from": "robot", "value": "4"}]}])
    err = refused(f, "sft", SHAREGPT_READ)
    assert [str(p) for p in err.problems] == [
        f"{f}: data.roles reads assistant from the role 'gpt', which no message has (their roles: human, robot)",
        f"{f}:1: conversations[0].value: must be a string, got integer",
        f"{f}:1: conversations[1].from: must be one of system, user, assistant; got 'robot'"]  # fmt: skip
    g = write(tmp_path, SHAREGPT, "g.jsonl")
    err = refused(g, "sft", Columns({"messages": "conversations"}, message_keys={"role": "from", "content": "text"}))
    assert str(err.problems[0]) == (f"{g}: data.message_keys reads content from the key 'text', which no message has "
                                    "(their keys: from, value)")  # fmt: skip


def test_the_error_for_a_sharegpt_file_names_every_setting_that_reads_it(tmp_path):
    f = write(tmp_path, SHAREGPT)
    for given, expected in (
        (None, "Read the file in its own names: data.columns: {messages: conversations} and data.message_keys: "
               "{role: from, content: value} and data.roles: {user: human, assistant: gpt} in the run's config, or "
               "--column messages=conversations --message-key role=from --message-key content=value --role "
               "user=human --role assistant=gpt on the command line; see docs/data.md."),
        (Columns({"messages": "conversations"}, cli=True),
         "Read the file in its own names: data.message_keys: {role: from, content: value} and data.roles: {user: "
         "human, assistant: gpt} in the run's config, or --message-key role=from --message-key content=value --role "
         "user=human --role assistant=gpt on the command line; see docs/data.md."),
    ):  # fmt: skip
        assert refused(f, "sft", given).footer == expected
    assert load_rows(f, "sft", SHAREGPT_READ)  # following it reads the file


def test_message_settings_are_checked_with_the_config():
    from posttrain.algorithms import load_config
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.message_keys: 'text' is not a key of a message \(they read: role, "
                                          r"content\)\n.*data.roles: 'bot' is not a role"):  # fmt: skip
        load_config(None, ["data.message_keys={role: from, text: value}", "data.roles={bot: gpt}"])
    cfg = load_config(None, ["data.message_keys={role: from, content: value}", "data.roles={user: human}"])
    from posttrain.data.columns import run_columns

    assert run_columns(cfg) == Columns(message_keys={"role": "from", "content": "value"}, roles={"user": "human"})


def test_a_field_can_read_several_text_columns_joined(tmp_path):
    """Alpaca's instruction + input (Dolly's instruction + context): joined in order by a blank line, an empty one
    left out; the file's columns are named as `instruction+input` in problems."""
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "hi"},
              {"instruction": "Name it.", "input": ["not", "text"], "output": "x"}]  # fmt: skip
    f = write(tmp_path, alpaca)
    read = Columns({"prompt": ["instruction", "input"], "completion": "output"})
    err = refused(f, "sft", read)
    assert [str(p) for p in err.problems] == [f"{f}:3: input: data.columns joins it into prompt, and it holds no text"]
    rows = load_rows(write(tmp_path, alpaca[:2], "a.jsonl"), "sft", read)
    assert [r["messages"][0]["content"] for r in rows] == ["Add the numbers.\n\n2 and 3", "Say hi."]
    err = refused(write(tmp_path, [{"instruction": 5, "input": "x", "output": "y"}], "b.jsonl"), "sft", read)
    assert str(err.problems[0]).endswith(":1: instruction: data.columns joins it into prompt, and it holds no text")
    err = refused(write(tmp_path, [{"instruction": " ", "input": "", "output": "y"}], "e.jsonl"), "sft", read)
    assert ":1: instruction+input: empty prompt;" in str(err.problems[0])  # the joined field names both
    err = refused(write(tmp_path, [{"instruction": "a", "output": "b"}], "c.jsonl"), "sft", read)
    assert [p.message for p in err.problems] == ["data.columns reads prompt from column 'input', which no row has "
                                                 "(its columns: instruction, output)"]  # fmt: skip
    # the error for an Alpaca file says the join, copy-pasteable in both forms
    assert refused(write(tmp_path, alpaca[:2], "d.jsonl"), "sft", None).footer == (
        "Rename the file's columns to the fields posttrain reads: data.columns: {prompt: [instruction, input], "
        "completion: output} in the run's config, or --column prompt=instruction+input --column completion=output on "
        "the command line; see docs/data.md.")  # fmt: skip


def test_joined_columns_through_the_config_and_the_command_line(tmp_path, capsys):
    from posttrain.algorithms import load_config
    from posttrain.cli import main
    from posttrain.data.columns import run_columns
    from posttrain.errors import ConfigError

    cfg = load_config(None, ["data.columns={prompt: [instruction, input], completion: output}"])
    assert run_columns(cfg).rename == {"prompt": ["instruction", "input"], "completion": "output"}
    with pytest.raises(ConfigError, match="data.columns: prompt and completion both read column 'input'"):
        load_config(None, ["data.columns={prompt: [instruction, input], completion: input}"])
    f = write(tmp_path, [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    assert main(["data", "validate", str(f), "--column", "prompt=instruction+input", "--column", "completion=output"]) == 0
    assert capsys.readouterr().out == f"{f}: 1 sft rows OK (prompt/completion: 1)\n"


def test_the_hint_leaves_out_what_the_renames_would_clash_with_and_warns_of_kto_labels(tmp_path):
    """The hub's Alpaca parquet has a `text` beside instruction/input/output: the hint said to rename those and
    also leave them out (which is refused); it now leaves out `text`. A KTO file's `label`, left out as the hint
    said, trained the undesirable completions too: said."""
    ahf = write(tmp_path, [{"instruction": "Add.", "input": "2 and 3", "output": "5", "text": "### ... 5"}])
    hint = refused(ahf, "sft", None).footer
    assert hint.startswith("Rename the file's columns to the fields posttrain reads and leave the others out: "
                           "data.columns: {prompt: [instruction, input], completion: output} and "
                           "data.ignore_columns: [text] in the run's config")  # fmt: skip
    assert load_rows(ahf, "sft", Columns({"prompt": ["instruction", "input"], "completion": "output"}, ("text",)))
    kto = write(tmp_path, [{"prompt": "hi", "completion": "yo", "label": True}], "kto.jsonl")
    assert refused(kto, "sft", None).footer.endswith(
        "A `label` column of true and false marks KTO's desirable rows, and posttrain has no KTO: left out, every row "
        "trains, the undesirable ones too; keep only the rows labelled true.")  # fmt: skip


def test_a_held_out_file_may_lack_a_column_only_the_training_file_has(tmp_path):
    """One data.ignore_columns reads data.train and data.eval: a column only the training file has made the eval
    file fail ('names column source, which no row has'). The training file is still checked."""
    from dataclasses import replace

    from posttrain.algorithms import load_config
    from posttrain.data.columns import run_columns

    train = write(tmp_path, [{"prompt": "q", "completion": "a", "source": "s"}], "train.jsonl")
    held = write(tmp_path, [{"prompt": "q", "completion": "a"}], "held.jsonl")
    cfg = load_config(None, [f"data.train={train}", f"data.eval={held}", "data.ignore_columns=[source]"])
    assert load_rows(held, "sft", run_columns(cfg, str(held))) and load_rows(train, "sft", run_columns(cfg, str(train)))
    assert run_columns(cfg).strict and not run_columns(cfg, str(held)).strict
    err = refused(held, "sft", replace(run_columns(cfg, str(held)), strict=True))
    assert "data.ignore_columns names column 'source', which no row has" in str(err)


def test_a_messages_own_key_is_left_out_as_column_dot_key_and_nulls_are_absent(tmp_path):
    """ShareGPT files with a per-message `weight` (OpenHermes, SlimOrca): no setting dropped a message key, and the
    hint went in a circle; `conversations.weight` in data.ignore_columns drops it from every message."""
    rows = [{"conversations": [{"from": "human", "value": "hi", "weight": None}, {"from": "gpt", "value": "yo", "weight": 1}]}]
    f = write(tmp_path, rows)
    err = refused(f, "sft", SHAREGPT_READ)
    assert err.footer.startswith("Leave out the columns posttrain does not read: data.ignore_columns: "
                                 "[conversations.weight] in the run's config")  # fmt: skip
    read = Columns(SHAREGPT_READ.rename, ("conversations.weight",), message_keys=SHAREGPT_READ.message_keys,
                   roles=SHAREGPT_READ.roles)  # fmt: skip
    assert load_rows(f, "sft", read)[0]["messages"][1] == {"role": "assistant", "content": "yo"}
    none = Columns(SHAREGPT_READ.rename, ("conversations.wieght",), message_keys=SHAREGPT_READ.message_keys,
                   roles=SHAREGPT_READ.roles)  # fmt: skip
    assert "data.ignore_columns names column 'conversations.wieght', which no row has" in str(refused(f, "sft", none))
    # JSONL nulls: a null column joined is an absent one; a null system is none
    g = write(tmp_path, [{"instruction": "Say hi.", "input": None, "output": "hi", "system": None}], "g.jsonl")
    (row,) = load_rows(g, "sft", Columns({"prompt": ["instruction", "input"], "completion": "output"}))
    assert row["messages"][:1] == [{"role": "user", "content": "Say hi."}]


def test_problem_lines_count_the_rows_not_yet_shown():
    from posttrain.errors import Problem, problem_lines

    ps = [Problem("d.jsonl", line, "prompt", "holds x") for line in (1, 1, 2, 2, 3, 3, 4)]
    assert problem_lines(ps, same=3) == [
        "d.jsonl:1: prompt: holds x", "d.jsonl:1: prompt: holds x", "d.jsonl:2: prompt: holds x",
        "d.jsonl: ... and 2 more rows with the same problem (prompt: holds x)"]  # fmt: skip


def test_column_options_with_an_empty_or_repeated_part_are_refused(tmp_path, capsys):
    from posttrain.cli import main

    f = write(tmp_path, [{"instruction": "a", "output": "b"}])
    assert main(["data", "validate", str(f), "--column", "prompt=instruction+"]) == 2
    assert "must be FIELD=COLUMN" in capsys.readouterr().err
    assert main(["data", "validate", str(f), "--column", "prompt=instruction+instruction"]) == 2
    assert "--column: prompt reads column 'instruction' twice" in capsys.readouterr().err


def test_orca_pairs_are_told_which_column_is_the_prompt(tmp_path):
    f = write(tmp_path, [{"system": "", "question": "2+2?", "chosen": "4", "rejected": "5"}])
    assert [p.message for p in refused(f, "preference", None).problems] == [
        "is a string and the row has no prompt: without a prompt column, chosen and rejected are whole "
        "conversations, lists of messages that begin alike; strings need the prompt in its own column: this row's "
        "question may be it (data.columns: {prompt: question}; --column prompt=question)"]  # fmt: skip
    (pair,) = load_rows(f, "preference", Columns({"prompt": "question"}))
    assert pair["prompt"] == [{"role": "user", "content": "2+2?"}]  # its blank system adds nothing


def test_render_time_problems_name_the_files_own_columns_and_rows(tmp_path, tiny_tokenizer):
    """A prompt too long for max_length, found while rendering, was named `prompt` in a file whose column is
    `question`, and `line 1` in a one-line JSON array: named as load-time problems are."""
    from posttrain.data import render_dataset, render_preference_dataset

    f = tmp_path / "one.json"  # one line, two rows
    f.write_text(json.dumps([{"q": "x", "a": "y"}, {"q": "word " * 80, "a": "y"}]), encoding="utf-8")
    rows = load_rows(f, "sft", Columns({"prompt": "q", "completion": "a"}))
    with pytest.raises(DataError) as info:
        render_dataset(tiny_tokenizer, rows, max_length=64, source=str(f))
    assert [str(p).split(": the prompt alone")[0] for p in info.value.problems] == [f"{f}:1 (row 2): max_length"]
    g = tmp_path / "pairs.jsonl"
    g.write_text(json.dumps({"q": "word " * 80, "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        render_preference_dataset(tiny_tokenizer, load_rows(g, "preference", Columns({"prompt": "q"})), max_length=64,
                                  source=str(g))  # fmt: skip
    assert str(info.value.problems[0]).startswith(f"{g}:1: q: prompt is ")


HH = {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"}


def test_hh_transcripts_read_as_the_conversations_they_are(tmp_path):
    """Anthropic HH's rows: chosen and rejected are whole transcripts as strings, with no prompt column. With
    data.turns they read as the same rows as the conversations written as messages: the turns both sides share are
    the prompt, a turn's text is stripped (its blank lines inside kept)."""
    convo = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And in words?\n\nAssistant: "
    hh = write(tmp_path, [{"chosen": convo + "Four.\n\nSo: four.", "rejected": convo + "Five."}], "hh.jsonl")
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And in words?"}]  # fmt: skip
    ours = write(tmp_path, [{"chosen": [*msgs, {"role": "assistant", "content": "Four.\n\nSo: four."}],
                             "rejected": [*msgs, {"role": "assistant", "content": "Five."}]}], "ours.jsonl")  # fmt: skip
    got = load_rows(hh, "preference", Columns(turns=HH))
    assert got == load_rows(ours, "preference")
    assert got[0]["prompt"] == msgs and got[0]["chosen"] == [{"role": "assistant", "content": "Four.\n\nSo: four."}]
    # without the setting, the row is refused with it
    (problem,) = refused(hh, "preference", None).problems
    assert problem.message.endswith("""read as their turns with data.turns: {user: "\\n\\nHuman:", assistant: """
                                    """"\\n\\nAssistant:"}; --turn 'user=\\n\\nHuman:' --turn 'assistant=\\n\\nAssistant:'""")  # fmt: skip


def test_a_transcript_prompt_loses_its_cue_and_is_refused_as_one_message(tmp_path):
    """HH-derived files with a prompt column ("...\\n\\nAssistant:") and plain-string sides; an RL prompts file of
    HH's prompts. Read as one user message, the whole transcript was wrapped in one turn of the chat template,
    silently: refused with the setting; with it, the prompt is its turns, the trailing cue dropped."""
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}]
    f = write(tmp_path, rows)
    (problem,) = refused(f, "preference", None).problems
    assert str(problem).startswith(f"{f}:1: prompt: is a transcript that ends with the assistant's cue; as one user "
                                   "message its turns would be wrapped in a single turn of the chat template. Read its "
                                   'turns with data.turns: {user: "\\n\\nHuman:"')  # fmt: skip
    (row,) = load_rows(f, "preference", Columns(turns=HH))
    assert row["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "2+2?"}]  # fmt: skip
    assert row["chosen"] == [{"role": "assistant", "content": " 4"}]  # a string without a marker is one message
    p = write(tmp_path, [{"prompt": "Human: 2+2?\n\nAssistant:", "answer": "4"}], "p.jsonl")
    assert refused(p, "prompts", None).problems[0].field == "prompt"
    (row,) = load_rows(p, "prompts", Columns(turns=HH))
    assert row["prompt"] == [{"role": "user", "content": "2+2?"}]  # the marker's blank lines optional at the start
    # a prompt that mentions the words, not a transcript, is left alone
    assert load_rows(write(tmp_path, [{"prompt": "Write a line for Human: and one for Assistant:", "answer": "x"}],
                           "w.jsonl"), "prompts", None)  # fmt: skip
    # nor one written as a list of messages: that is taken as written, the way to keep a transcript one message
    listed = [{"prompt": [{"role": "user", "content": rows[0]["prompt"]}], "chosen": "4", "rejected": "5"}]
    assert load_rows(write(tmp_path, listed, "l.jsonl"), "preference", None)[0]["prompt"] == listed[0]["prompt"]


def test_guanaco_text_reads_as_messages_and_transcript_problems_name_the_setting(tmp_path):
    """OpenAssistant Guanaco's `text` ("### Human: ...### Assistant: ...", no newline before a marker) read as
    messages; text before the first marker, and a marker no text of the training file holds, are refused."""
    turns = {"user": "### Human:", "assistant": "### Assistant:"}
    g = write(tmp_path, [{"text": "### Human: Name a colour.### Assistant: Blue.### Human: Another?### Assistant: Red."}])
    (row,) = load_rows(g, "sft", Columns({"messages": "text"}, turns=turns))
    assert row["messages"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                               {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]  # fmt: skip
    bad = write(tmp_path, [{"text": "Hi there.### Human: x### Assistant: y"}], "bad.jsonl")
    assert [str(p) for p in refused(bad, "sft", Columns({"messages": "text"}, turns=turns, cli=True)).problems] == [
        f"{bad}:1: text: text comes before the first turn's marker ('Hi there.') (--turn)"]  # fmt: skip
    system = {**turns, "system": "### System:"}
    err = refused(g, "sft", Columns({"messages": "text"}, turns=system))
    assert [str(p) for p in err.problems] == [
        f"{g}: data.turns opens system's turns with '### System:', which no text of the file holds"]
    assert load_rows(g, "sft", Columns({"messages": "text"}, turns=system, strict=False))  # a held-out file may lack one


def test_turn_settings_are_checked_with_the_config_and_the_command_line(tmp_path, capsys):
    from posttrain.algorithms import load_config
    from posttrain.cli import main
    from posttrain.data.columns import run_columns
    from posttrain.errors import ConfigError
    from posttrain.train import _config_changes

    with pytest.raises(ConfigError, match="a transcript needs the user's and the assistant's markers"):
        load_config(None, ['data.turns={user: "Human:"}'])
    cfg = load_config(None, ["algorithm.name=dpo", 'data.turns={user: "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}'])
    assert run_columns(cfg).turns == HH
    assert _config_changes(load_config(None, ["algorithm.name=dpo"]).model_dump(mode="json"), cfg) == [
        'data.turns: {} -> {user: "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}']  # fmt: skip
    hh = write(tmp_path, [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}])
    assert main(["data", "validate", str(hh), "--kind", "preference"]) == 2
    capsys.readouterr()
    assert main(["data", "validate", str(hh), "--kind", "preference",
                 "--turn", "user=\\n\\nHuman:", "--turn", "assistant=\\n\\nAssistant:"]) == 0  # fmt: skip
    assert capsys.readouterr().out == f"{hh}: 1 preference rows OK (chosen/rejected: 1)\n"
    assert main(["data", "validate", str(hh), "--kind", "preference", "--turn", "user=\\n\\nHuman:"]) == 2
    assert "--turn: a transcript needs the user's and the assistant's markers (assistant's is missing)" in \
        capsys.readouterr().err  # fmt: skip


def test_turn_markers_without_their_colon_are_named(tmp_path):
    """`{user: "\\n\\nHuman", ...}` read every turn as ': What is...' with no warning (a user-journey audit)."""
    hh = write(tmp_path, [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}])
    err = refused(hh, "preference", Columns(turns={"user": "\n\nHuman", "assistant": "\n\nAssistant"}))
    assert [p.field for p in err.problems] == ["chosen", "rejected"]
    assert "every turn's text begins with ':', so the markers lack their colon" in err.problems[0].message


def test_pairs_read_as_another_kind_are_told_what_they_are(tmp_path):
    """An HH file validated as SFT (the default kind) was told to rename its sides to a prompt and a completion."""
    hh = write(tmp_path, [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}])
    uf = write(tmp_path, [{"prompt": "hi", "chosen": "a", "rejected": "b"}], "uf.jsonl")
    for f, kind in ((hh, "sft"), (hh, "prompts"), (uf, "sft")):
        assert refused(f, kind, None).footer.startswith("The rows hold chosen and rejected: they are preference pairs")


def test_train_says_the_config_form_of_the_column_flags(capsys):
    """`posttrain train RUN.yaml --column prompt=question` was argparse's 'unrecognized arguments', with no word of
    data.columns (a user-journey audit)."""
    from posttrain.cli import main

    assert main(["train", "run.yaml", "--column", "prompt=question", "--ignore-column", "source"]) == 2
    assert ("give 'data.columns={prompt: question}' 'data.ignore_columns=[source]' on the command line"
            in capsys.readouterr().err)  # fmt: skip



def test_an_sft_or_prompts_file_with_a_chosen_column_is_not_told_it_holds_pairs(tmp_path):
    """The pairs hint fired on an SFT file that also holds chosen and rejected (their own hint is to leave them
    out), and on a prompts file where one row misnamed its prompt (a review)."""
    sft = write(tmp_path, [{"prompt": "q", "completion": "a", "chosen": "x", "rejected": "y"}])
    assert refused(sft, "sft", None).footer.startswith("Leave out the columns posttrain does not read")
    prompts = write(tmp_path, [{"prompt": "q", "answer": 1}, {"question": "q", "chosen": "x", "rejected": "y"}],
                    "p.jsonl")  # fmt: skip
    assert not (refused(prompts, "prompts", None).footer or "").startswith("The rows hold chosen and rejected")


def test_skip_bad_rows_leaves_out_the_rows_it_names_and_nothing_else(tmp_path):
    """Anthropic HH holds pairs with an empty response, which refused the whole file: data.skip_bad_rows leaves
    such rows out with a warning that names them; a problem of the settings, or a file with no usable row, still
    refuses."""
    import warnings

    hh = {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"}
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            {"chosen": "\n\nHuman: yo\n\nAssistant: c", "rejected": "\n\nHuman: yo\n\nAssistant: "},
            {"chosen": "\n\nHuman: ok\n\nAssistant: d", "rejected": "\n\nHuman: ok\n\nAssistant: e"}]  # fmt: skip
    f = write(tmp_path, rows)
    with pytest.raises(DataError):
        load_rows(f, "preference", Columns(turns=hh))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = load_rows(f, "preference", Columns(turns=hh), skip_bad=True)
    assert [r.line for r in kept] == [1, 3]
    assert [str(w.message) for w in caught] == [
        f"{f}: 1 of 3 rows left out (data.skip_bad_rows): {f}:2: rejected: empty response (no assistant content)"]
    with pytest.raises(DataError, match="names column 'source', which no row has"):
        load_rows(f, "preference", Columns(ignore=("source",), turns=hh), skip_bad=True)
    with pytest.raises(DataError):
        load_rows(write(tmp_path, rows[1:2], "bad.jsonl"), "preference", Columns(turns=hh), skip_bad=True)
