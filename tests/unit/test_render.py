"""Rendering: the loss mask covers exactly the assistant content and its end-of-turn token, every turn."""

import json

import pytest

from posttrain.data import load_rows, render_dataset, render_prompt, render_sft
from posttrain.data.schema import Row
from posttrain.errors import DataError

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 4+4?"}
A2 = {"role": "assistant", "content": "It is 8."}


def chat(*messages) -> dict:
    return {"messages": list(messages), "completion_only": True}


def trained_runs(tok, r) -> list[str]:
    """Decode each maximal run of loss-mask-1 tokens separately."""
    runs, cur = [], []
    for i, m in zip(r.input_ids, r.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_single_turn_mask_positions(tiny_tokenizer):
    tok = tiny_tokenizer
    r = render_sft(tok, chat(SYS, U1, A1), max_length=512)
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"  # noqa: E501
    assert tok.decode(r.input_ids) == text
    # Byte-level: the trained tokens are "4" then <|im_end|>; exactly the two before the final "\n".
    n = len(r.input_ids)
    assert [t for t, m in enumerate(r.loss_mask) if m] == [n - 3, n - 2]
    assert r.input_ids[n - 3 : n - 1] == [*tok.encode("4", add_special_tokens=False), tok.eos_token_id]
    assert not r.truncated


def test_multi_turn_every_assistant_turn_counts(tiny_tokenizer):
    r = render_sft(tiny_tokenizer, chat(U1, A1, U2, A2), max_length=512)
    assert trained_runs(tiny_tokenizer, r) == ["4<|im_end|>", "It is 8.<|im_end|>"]


def test_prompt_words_equal_to_the_answer_are_not_trained(tiny_tokenizer):
    # The user says "4" too; only the assistant's "4" is trained (search starts after the generation prompt).
    r = render_sft(tiny_tokenizer, chat({"role": "user", "content": "4"}, A1), max_length=512)
    assert trained_runs(tiny_tokenizer, r) == ["4<|im_end|>"]
    assert sum(r.loss_mask) == 2


def test_prompt_completion_row_trains_only_the_completion(tiny_tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    row = {"prompt": [U1, A1, U2], "completion": "It is 8."}  # a few-shot prompt holding an assistant turn
    f.write_text(json.dumps(row) + "\n")
    (loaded,) = load_rows(f, "sft")
    r = render_sft(tiny_tokenizer, loaded, max_length=512)
    assert trained_runs(tiny_tokenizer, r) == ["It is 8.<|im_end|>"]
    # The prompt used for generation is exactly the ids before the completion.
    prompt = render_prompt(tiny_tokenizer, loaded)
    assert r.input_ids[: len(prompt)] == prompt
    assert tiny_tokenizer.decode(prompt).endswith("And 4+4?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tiny_tokenizer, {"prompt": "And 4+4?"}) == render_prompt(
        tiny_tokenizer, chat(U2, A2)
    )


def test_train_on_all_and_text_rows(tiny_tokenizer):
    r = render_sft(tiny_tokenizer, chat(U1, A1), max_length=512, train_on="all")
    assert r.loss_mask == [1] * len(r.input_ids)
    t = render_sft(tiny_tokenizer, {"text": "abc", "completion_only": False}, max_length=512)
    assert t.input_ids == [*tiny_tokenizer.encode("abc"), tiny_tokenizer.eos_token_id]
    assert t.loss_mask == [1, 1, 1, 1]


def test_no_chat_template_uses_the_fallback():
    from posttrain.testing import tiny_tokenizer as make

    plain = make()  # a fresh one: the session fixture must keep its template
    plain.chat_template = None
    r = render_sft(plain, chat(SYS, U1, A1, U2, A2), max_length=512)
    assert plain.decode(r.input_ids) == (
        "Be brief.\n\nUser: What is 2+2?\nAssistant: 4<|im_end|>\nUser: And 4+4?\nAssistant: It is 8.<|im_end|>\n"
    )
    assert trained_runs(plain, r) == [" 4<|im_end|>", " It is 8.<|im_end|>"]  # the space after `Assistant:` too
    assert plain.decode(render_prompt(plain, {"prompt": "hi"})) == "User: hi\nAssistant:"


def test_truncation_keeps_the_start_and_is_counted(tiny_tokenizer):
    full = render_sft(tiny_tokenizer, chat(U1, A2), max_length=512)
    r = render_sft(tiny_tokenizer, chat(U1, A2), max_length=len(full) - 4)
    assert r.truncated and r.input_ids == full.input_ids[: len(full) - 4]
    assert r.loss_mask == full.loss_mask[: len(full) - 4]
    rows = [chat(U1, A2), chat(U1, A1), chat(U1, A2)]
    with pytest.warns(UserWarning, match=r"train.jsonl: 2 of 3 rows are longer than max_length=.* \(their ends are "
                                         r"not trained: lines 1 and 3\)") as rec:  # fmt: skip
        out, n = render_dataset(tiny_tokenizer, rows, max_length=len(full) - 4, source="train.jsonl")
    assert n == 2 and [x.truncated for x in out] == [True, False, True] and len(rec) == 1


def test_prompt_longer_than_max_length_names_file_line_and_max_length(tiny_tokenizer):
    short = render_sft(tiny_tokenizer, chat(U1, A1), max_length=512)
    prompt_len = short.loss_mask.index(1)
    rows = [Row(chat(U1, A1), line=7), chat(U1, A1)]
    with pytest.raises(DataError) as info:
        render_dataset(tiny_tokenizer, rows, max_length=prompt_len, source="train.jsonl")
    msg = (f"the prompt alone is {prompt_len} tokens, >= max_length {prompt_len}: no completion token would be "
           "trained; raise data.max_length or shorten this row")  # fmt: skip
    assert [str(p) for p in info.value.problems] == [
        f"train.jsonl:7: max_length: {msg}",
        f"train.jsonl: max_length: row 2: {msg}",
    ]
    # One more token and the first completion token is trained: fine.
    assert render_sft(tiny_tokenizer, chat(U1, A1), max_length=prompt_len + 1).truncated


def test_raw_task_rows_render_like_loaded_rows(tiny_tokenizer, tmp_path):
    from posttrain.data import TASKS, write_jsonl

    raw = TASKS["structured"].make(3, seed=0)
    loaded = load_rows(write_jsonl(raw, tmp_path / "t.jsonl"), "sft")
    for r, row in zip(raw, loaded):
        a, b = render_sft(tiny_tokenizer, r, max_length=512), render_sft(tiny_tokenizer, row, max_length=512)
        assert a == b and trained_runs(tiny_tokenizer, a) == [r["completion"] + "<|im_end|>"]
    with pytest.raises(DataError, match=r"^d.jsonl: completion: empty completion$"):
        render_sft(tiny_tokenizer, {"prompt": "q", "completion": ""}, max_length=64, source="d.jsonl")


def test_text_in_chat_template_form_is_refused_where_it_would_be_wrapped_again(tiny_tokenizer, tmp_path):
    """A message holding the template's markers (a conversation rendered already, pasted into a row) validated and
    trained as `<|im_start|>user\\n<|im_start|>user ...` with the turn ended where the pasted text said; refused in
    SFT rows, preference pairs and prompts, naming the file, line and the file's own field, under a header of its
    own. A special token the template never writes (`<|pad|>` here; SmolLM2's `<filename>`) is text like any other,
    and a `text` row is taken as written."""
    from posttrain.data import render_preference_dataset
    from posttrain.data.columns import Columns
    from posttrain.data.render import MARKER_WHY, marker_problems

    f = tmp_path / "pre.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "<|im_start|>user\nwhat is 2+2?<|im_end|>\n", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4<|im_end|>"}]},
        {"prompt": "Usage: prog <|pad|>", "completion": "4"},
        {"text": "<|im_start|>user\nhi<|im_end|>\n"},
    ]) + "\n")  # fmt: skip
    rows = load_rows(f, "sft")  # the file's shape is fine: the check needs the model's tokenizer
    with pytest.raises(DataError) as info:
        render_dataset(tiny_tokenizer, rows, max_length=64, source=str(f))
    assert str(info.value).splitlines()[0] == f"{f}: 2 row(s) hold tokens that open or end a turn"
    assert [str(p) for p in info.value.problems] == [f"{f}:1: prompt: holds '<|im_start|>', {MARKER_WHY}",
                                                     f"{f}:2: messages[1].content: holds '<|im_end|>', {MARKER_WHY}"]  # fmt: skip
    rendered, _ = render_dataset(tiny_tokenizer, rows[2:], max_length=64, source=str(f))  # the others render,
    pad = tiny_tokenizer.convert_tokens_to_ids("<|pad|>")  # <|pad|> in a prompt as the tokenizer reads it
    assert len(rendered) == 2 and pad in rendered[0].input_ids and not rendered[0].loss_mask[rendered[0].input_ids.index(pad)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b<|im_end|>"}) + "\n"
                     + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b<|pad|>"}) + "\n")  # fmt: skip
    with pytest.raises(DataError) as info:
        render_preference_dataset(tiny_tokenizer, load_rows(pairs, "preference"), max_length=64, source=str(pairs))
    assert [str(p) for p in info.value.problems] == [f"{pairs}:1: rejected: holds '<|im_end|>', {MARKER_WHY}"]
    # a renamed file: its own column is named
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "<|im_start|>hi", "answer": "4"}) + "\n")
    renamed = load_rows(q, "sft", Columns({"prompt": "question", "completion": "answer"}))
    assert [str(p) for p in marker_problems(tiny_tokenizer, renamed, source=str(q))] == [
        f"{q}:1: question: holds '<|im_start|>', {MARKER_WHY}"]  # fmt: skip
    assert [str(p) for p in marker_problems(tiny_tokenizer, [Row({"prompt": [{"role": "user", "content": "<|im_end|>"}]},
                                                                 line=5)], source="d.jsonl")] == [
        f"d.jsonl:5: prompt: holds '<|im_end|>', {MARKER_WHY}"]  # fmt: skip


def test_notes_name_the_rows_of_a_one_line_json_array_by_row(tmp_path, tiny_tokenizer):
    """Every row of a one-line JSON array (pandas' `to_json(orient="records")`) is on line 1: the truncation note
    said "lines 1 and 1"; it names them by row, as their problems are. A file of one row per line keeps its lines."""
    import warnings

    from posttrain.data.order import plan_batches, skipped_note

    rows = [{"prompt": "hi", "completion": "yo"}, {"prompt": "hi", "completion": "yo " * 120},
            {"prompt": "hi", "completion": "yo " * 120}]  # fmt: skip
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    lines = tmp_path / "l.jsonl"
    lines.write_text("\n\n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # rows on lines 3-5
    for path, said in ((array, "rows 2 and 3"), (lines, "lines 4 and 5")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            render_dataset(tiny_tokenizer, load_rows(path, "sft"), max_length=64)
        (note,) = [str(w.message) for w in caught]
        assert f"truncated (their ends are not trained: {said})" in note
    plan = plan_batches(17, 4, 2, 1)  # one row per epoch not trained
    note = skipped_note(plan, source="a.json", lines=[(i + 1,) for i in range(17)], seed=0, shuffle=False,
                        total_steps=8, line_noun="row")  # fmt: skip
    assert note.endswith("processes): row 17 (the same in all 2 epochs)")
