"""Preference pairs: rendering agrees with `render_sft`, collation layout, length errors, and every bad row."""

import json

import pytest

from posttrain.data import (
    RenderedPair,
    collate_pairs,
    load_rows,
    render_pair,
    render_preference_dataset,
    render_prompt,
    render_sft,
)
from posttrain.data.schema import Row
from posttrain.errors import DataError

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 4+4?"}


def say(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, rows, name="pairs.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def problems(path) -> list[str]:
    with pytest.raises(DataError) as info:
        load_rows(path, "preference")
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    "prompt",
    ["What is 2+2?", [SYS, U1], [U1, A1, U2]],  # a string, a system prompt, a few-shot prompt with an answer
)
def test_prompt_plus_each_side_equals_render_sft(tiny_tokenizer, prompt):
    tok = tiny_tokenizer
    pair = render_pair(tok, {"prompt": prompt, "chosen": "It is 4.", "rejected": "five"}, max_length=512)
    for ids, mask, completion in (
        (pair.chosen_ids, pair.chosen_mask, "It is 4."),
        (pair.rejected_ids, pair.rejected_mask, "five"),
    ):
        sft = render_sft(tok, {"prompt": prompt, "completion": completion}, max_length=512)
        assert pair.prompt_ids + ids == sft.input_ids
        assert [0] * len(pair.prompt_ids) + mask == sft.loss_mask
    # The prompt is exactly what generation sees: the prompt turns and the assistant header.
    assert pair.prompt_ids == render_prompt(tok, {"prompt": prompt})
    assert not pair.truncated


def test_response_keeps_the_end_of_turn_tokens_as_rendered(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = render_pair(tok, {"prompt": "2+2?", "chosen": "4", "rejected": "5!"}, max_length=512)
    assert tok.decode(pair.prompt_ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(pair.chosen_ids) == "4<|im_end|>\n"
    # Scored: the content and <|im_end|> (the model must learn to stop); not the template's newline after it.
    assert pair.chosen_mask == [1, 1, 0]
    assert pair.rejected_mask == [1, 1, 1, 0]


def test_conversational_rows_share_the_prompt_prefix(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    f = write(tmp_path, [{"chosen": [SYS, U1, A1, U2, say("It is 8.")],
                          "rejected": [SYS, U1, A1, U2, say("It is 9.")], "id": "c1"}])  # fmt: skip
    (row,) = load_rows(f, "preference")
    pair = render_pair(tok, row, max_length=512, source=str(f))
    assert pair.line == 1 and pair.source == str(f)
    assert tok.decode(pair.chosen_ids) == "It is 8.<|im_end|>\n"
    assert tok.decode(pair.rejected_ids) == "It is 9.<|im_end|>\n"
    assert tok.decode(pair.prompt_ids).endswith("And 4+4?<|im_end|>\n<|im_start|>assistant\n")
    # The earlier assistant turn belongs to the prompt: never scored.
    assert sum(pair.chosen().loss_mask) == sum(pair.chosen_mask) == len("It is 8.") + 1
    # A raw conversational row renders the same as the loaded one.
    raw = {k: v for k, v in json.loads(f.read_text()).items()}
    assert render_pair(tok, raw, max_length=512).chosen_ids == pair.chosen_ids


def test_multi_turn_response_scores_only_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": [U1], "chosen": [A1, U2, say("8")], "rejected": [say("5")]}
    pair = render_pair(tok, row, max_length=512)
    scored = tok.decode([t for t, m in zip(pair.chosen_ids, pair.chosen_mask) if m])
    assert scored == "4<|im_end|>8<|im_end|>"


def test_collate_pairs_layout_masks_and_padding():
    a = RenderedPair([7, 8], [5, 2, 9], [6, 2, 9], chosen_mask=[1, 1, 0], rejected_mask=[1, 1, 0])
    b = RenderedPair([7], [4, 4, 4, 2], [3, 2])  # masks default to all ones
    out = collate_pairs([a, b], pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "loss_mask", "margin"}
    assert out["input_ids"].shape == (4, 5) and out["input_ids"].shape[0] // 2 == 2  # (2B, T), B = 2 pairs
    # Rows 0..B-1 are chosen, rows B..2B-1 rejected, in pair order; right-padded to the longest of all 2B.
    assert out["input_ids"].tolist() == [
        [7, 8, 5, 2, 9],
        [7, 4, 4, 4, 2],
        [7, 8, 6, 2, 9],
        [7, 3, 2, 0, 0],
    ]
    assert out["attention_mask"].tolist() == [[1] * 5, [1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    assert out["loss_mask"].tolist() == [
        [0, 0, 1, 1, 0],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0],
    ]
    with pytest.raises(ValueError, match="at least one pair"):
        collate_pairs([], pad_id=0)


def test_collate_pairs_of_rendered_rows_matches_render_sft(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "22"}, {"prompt": "Name a colour.", "chosen": "Blue",
            "rejected": "Blue is a colour, and so is red, and so is green."}]  # fmt: skip
    batch = collate_pairs(render_preference_dataset(tok, rows, max_length=512), tok.pad_token_id)
    B = batch["input_ids"].shape[0] // 2
    for b, row in enumerate(rows):
        for offset, side in ((0, "chosen"), (B, "rejected")):
            sft = render_sft(tok, {"prompt": row["prompt"], "completion": row[side]}, max_length=512)
            n = len(sft.input_ids)
            assert batch["input_ids"][offset + b, :n].tolist() == sft.input_ids
            assert batch["loss_mask"][offset + b].tolist() == sft.loss_mask + [0] * (
                batch["loss_mask"].shape[1] - n
            )
            assert batch["attention_mask"][offset + b].sum().item() == n


def test_a_prompt_that_fills_max_length_is_an_error_naming_file_line_field(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    f = write(tmp_path, [
        {"prompt": "short", "chosen": "a", "rejected": "b"},
        {"prompt": "x" * 60, "chosen": "a", "rejected": "b"},
        {"prompt": "y" * 80, "chosen": "a", "rejected": "b"},
    ])  # fmt: skip
    rows = load_rows(f, "preference")
    n2, n3 = (len(render_prompt(tok, r)) for r in rows[1:])
    with pytest.raises(DataError) as info:
        render_preference_dataset(tok, rows, max_length=n2, source=str(f))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{f}: 2 pair(s) do not fit max_length={n2}"  # every bad row at once
    assert lines[1].startswith(f"{f}:2: prompt: prompt is {n2} tokens, max_length is {n2}")
    assert lines[2].startswith(f"{f}:3: prompt: prompt is {n3} tokens, max_length is {n2}")
    # One token of room is enough (the first response token is scored).
    assert render_pair(tok, rows[1], max_length=n2 + 1).chosen_ids == tok.encode("a")


def test_rows_without_a_file_line_are_numbered_by_position(tiny_tokenizer):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q" * 50, "chosen": "a", "rejected": "b"},
    ]
    with pytest.raises(DataError, match=r"data: prompt: row 2: prompt is \d+ tokens, max_length is 30"):
        render_preference_dataset(tiny_tokenizer, rows, max_length=30)


def test_long_responses_are_truncated_with_one_counted_warning(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        Row({"prompt": [U1], "chosen": [say("4" * 40)], "rejected": [say("5")]}, line=1),
        Row({"prompt": [U1], "chosen": [say("4")], "rejected": [say("5")]}, line=2),
        Row({"prompt": [U1], "chosen": [say("4")], "rejected": [say("5" * 40)]}, line=3),
    ]
    n_prompt = len(render_prompt(tok, rows[0]))
    with pytest.warns(UserWarning, match=r"2 of 3 pairs .* max_length=40 .*\(their ends are not scored: lines 1 "
                                         r"and 3\)") as caught:  # fmt: skip
        pairs = render_preference_dataset(tok, rows, max_length=40)
    assert len(caught) == 1
    assert [p.truncated for p in pairs] == [True, False, True]
    long_side = (pairs[0].chosen_ids, pairs[0].chosen_mask)
    assert len(pairs[0].prompt_ids) == n_prompt and len(long_side[0]) == len(long_side[1]) == 40 - n_prompt
    assert all(long_side[1])  # the cut falls inside the content: every kept token is scored
    assert pairs[0].rejected_ids == pairs[1].rejected_ids


def test_a_cut_that_takes_only_the_templates_newline_after_the_end_of_turn_is_not_a_truncation(tiny_tokenizer):
    """ChatML writes "<|im_end|>\n": a max_length that keeps the scored <|im_end|> and loses only the newline after
    it changes no log-prob, yet the pair was counted and warned about as truncated ("their ends are not scored")."""
    import warnings

    row = Row({"prompt": [U1], "chosen": [say("good")], "rejected": [say("bad")]}, line=1)
    whole = render_preference_dataset(tiny_tokenizer, [row], max_length=512)[0]
    full = len(whole.prompt_ids) + len(whole.chosen_ids)
    assert whole.chosen_mask[-1] == 0 and whole.chosen_mask[-2] == 1  # the newline, after the scored <|im_end|>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [pair] = render_preference_dataset(tiny_tokenizer, [row], max_length=full - 1)
    assert not pair.truncated and pair.chosen_ids == whole.chosen_ids[:-1]
    with pytest.warns(UserWarning, match=r"1 of 1 pairs .* truncated"):
        [pair] = render_preference_dataset(tiny_tokenizer, [row], max_length=full - 2)  # the <|im_end|> goes
    assert pair.truncated


def test_every_bad_row_is_reported_with_file_line_field(tmp_path):
    conv = lambda reply: [U1, say(reply)]  # noqa: E731
    f = write(tmp_path, [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "rejected": "bad"},  # missing chosen
        {"prompt": "q", "chosen": "good"},  # missing rejected
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"chosen": conv("same"), "rejected": conv("same")},  # identical whole conversations
        {"prompt": "q", "chosen": "good", "rejected": "   "},  # an empty response
        {"chosen": conv(""), "rejected": conv("bad")},
        {"prompt": "q", "chosen": [U1], "rejected": "bad"},  # a response with no assistant turn
        {"chosen": conv("good")},  # a conversation with its other side missing
    ])  # fmt: skip
    assert problems(f) == [
        f"{f}:2: chosen: missing required field",
        f"{f}:3: rejected: missing required field",
        f"{f}:4: rejected: identical to chosen: the pair carries no preference",
        f"{f}:5: rejected: identical to chosen: the pair carries no preference",
        f"{f}:6: rejected: empty response (no assistant content)",
        f"{f}:7: chosen: empty response (no assistant content)",
        f"{f}:8: chosen: empty response (no assistant content)",
        f"{f}:9: rejected: missing required field",
    ]


def test_built_in_rejected_kind_is_an_allowed_field(tmp_path):
    f = write(tmp_path, [{"prompt": "q", "chosen": "4", "rejected": "5", "rejected_kind": "wrong", "id": 1}])
    assert load_rows(f, "preference")[0]["rejected_kind"] == "wrong"
    g = write(tmp_path, [{"prompt": "q", "chosen": "4", "rejected": "5", "score": 1}], "bad.jsonl")
    assert problems(g) == [
        f"{g}:1: score: unknown field (allowed here: prompt, chosen, rejected, system, rejected_kind, margin, id, answer, metadata)"
    ]


def test_margin_is_an_optional_non_negative_number(tmp_path):
    """A `margin` column feeds the Bradley-Terry margin (algorithm.margin); it must be a number >= 0."""
    f = write(tmp_path, [{"prompt": "q", "chosen": "4", "rejected": "5", "margin": 1.5}])
    assert load_rows(f, "preference")[0]["margin"] == 1.5
    g = write(tmp_path, [{"prompt": "q", "chosen": "4", "rejected": "5", "margin": -1},
                         {"prompt": "q", "chosen": "4", "rejected": "5", "margin": "big"}], "bad.jsonl")  # fmt: skip
    assert problems(g) == [
        f"{g}:1: margin: must be at least 0, got -1",
        f"{g}:2: margin: must be a number, got string",
    ]
    # JSON's NaN and Infinity (and 1e999) pass a schema's `minimum`: the loss became NaN at step 1, after the model
    # loaded, and left a run folder that refused the corrected command (an audit, eighteenth session)
    h = tmp_path / "nan.jsonl"
    h.write_text('{"prompt": "q", "chosen": "4", "rejected": "5", "margin": NaN}\n'
                 '{"prompt": "q", "chosen": "4", "rejected": "5", "margin": 1e999}\n'
                 '{"prompt": "q", "chosen": "4", "rejected": "5", "margin": 2}\n')  # fmt: skip
    assert problems(h) == [f"{h}:1: margin: must be a finite number, got nan",
                           f"{h}:2: margin: must be a finite number, got inf"]  # fmt: skip


def test_a_pair_whose_sides_are_cut_to_the_same_tokens_is_an_error(tiny_tokenizer):
    """Two responses that differ only past max_length trained as a pair with no preference (a zero gradient)."""
    rows = [Row({"prompt": [U1], "chosen": [say("4" * 60 + " yes")], "rejected": [say("4" * 60 + " no")]}, line=7),
            Row({"prompt": [U1], "chosen": [say("4" * 60)], "rejected": [say("5")]}, line=8)]  # fmt: skip
    with pytest.raises(DataError) as err:
        render_preference_dataset(tiny_tokenizer, rows, max_length=40, source="p.jsonl")
    (problem,) = err.value.problems
    assert str(problem).startswith("p.jsonl:7: rejected: identical to chosen once cut to max_length 40: the two "
                                   "sides first differ at token ")  # fmt: skip
    full = render_pair(tiny_tokenizer, rows[0], max_length=512)
    differ = next(t for t, (a, b) in enumerate(zip(full.chosen().input_ids, full.rejected().input_ids)) if a != b)
    assert f"differ at token {differ + 1} (the prompt's included)" in str(problem)
    with pytest.warns(UserWarning, match="truncated"):
        render_preference_dataset(tiny_tokenizer, rows, max_length=differ + 1)  # one differing token kept: a pair
    # evaluation (`evaluate --pairs`, a run's data.eval) keeps such a pair: it scores a tie, and the note says so
    with pytest.warns(UserWarning, match=r"2 of 2 pairs .*lines 7 and 8; 1 of them identical once cut, a tie\)"):
        kept = render_preference_dataset(tiny_tokenizer, rows, max_length=40, source="p.jsonl", allow_identical=True)
    assert [p.identical for p in kept] == [True, False] and kept[0].chosen_ids == kept[0].rejected_ids


def test_a_response_that_ends_after_its_reply_or_holds_an_empty_turn_is_named_with_its_line(tmp_path):
    """A rejected side [yes, user: "wrong"] scored "yes" like the chosen one: a pair with no preference that
    trained silently. An empty assistant turn before a filled one failed later, blaming the chat template and
    naming no file or line (an audit)."""
    f = write(tmp_path, [
        {"prompt": "Is 7 prime?", "chosen": "yes", "rejected": [say("yes"), {"role": "user", "content": "wrong"}]},
        {"prompt": "q", "chosen": [say(""), U2, say("Rome")], "rejected": "Paris"},
        {"chosen": [U1, say(""), U2, say("Rome")], "rejected": [U1, say("Paris")]},  # a whole conversation
    ])  # fmt: skip
    assert problems(f) == [
        f"{f}:1: rejected: ends with a 'user' message after the reply: a response is scored through its last "
        "assistant turn, so nothing after it is compared; end the response with the assistant's turn",
        f"{f}:2: chosen[0].content: assistant content is empty",
        f"{f}:3: chosen[1].content: assistant content is empty",
    ]


def test_a_pair_that_scores_the_same_tokens_is_an_error_cut_or_not():
    """A template that trims content renders "yes" and "yes\\n" alike: the sides differ as written, not as scored."""
    from posttrain.testing import byte_tokenizer

    trims = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip
    tok = byte_tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|pad|>",
                         chat_template=trims)  # fmt: skip
    rows = [Row({"prompt": [U1], "chosen": [say("yes")], "rejected": [say("yes\n")]}, line=4)]
    with pytest.raises(DataError, match=r"p.jsonl:4: rejected: scores the same tokens as chosen \(the sides differ "
                                        r"only in what the chat template renders alike\)"):  # fmt: skip
        render_preference_dataset(tok, rows, max_length=99, source="p.jsonl")
    (kept,) = render_preference_dataset(tok, rows, max_length=99, allow_identical=True)  # evaluation: a tie
    assert kept.identical and not kept.truncated
