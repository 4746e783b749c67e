"""`generate` on the tiny model: greedy equals a hand-written argmax loop, batching and left padding change
nothing, EOS and stop strings cut the completion, seeds make sampling repeatable."""

import os

import pytest
import torch

from posttrain.models import generate, render_prompt
from posttrain.testing import tiny_model as make_tiny_model

PROMPTS = ["hi", "a much longer prompt than the first", [{"role": "user", "content": "mid length"}]]


@pytest.fixture()
def peaked_model(tiny_tokenizer):
    """The tiny random model with a sharpened LM head: large gaps between logits, so greedy choices cannot flip
    on float rounding differences between padded and unpadded batches."""
    model = make_tiny_model(len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(200)
    return model


def _manual_greedy(model, tokenizer, prompt, n):
    """Argmax decoding without a KV cache: re-run the whole sequence for each new token."""
    ids = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).input_ids
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_equals_manual_loop_and_batching_is_invisible(peaked_model, tiny_tokenizer):
    batched = generate(peaked_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    single = [generate(peaked_model, tiny_tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    manual = [_manual_greedy(peaked_model, tiny_tokenizer, p, 12) for p in PROMPTS]
    assert batched == single == manual
    assert any(batched)


def test_string_prompt_is_one_user_message(peaked_model, tiny_tokenizer):
    a = generate(peaked_model, tiny_tokenizer, ["hello"], max_new_tokens=6)
    b = generate(peaked_model, tiny_tokenizer, [[{"role": "user", "content": "hello"}]], max_new_tokens=6)
    assert a == b
    assert (
        render_prompt(tiny_tokenizer, "hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_prompt_in_chat_template_form_is_refused(peaked_model, tiny_tokenizer):
    """`generate --prompt "<|im_start|>user ..."` decoded from the template wrapped around itself; refused."""
    from posttrain.errors import UserError

    with pytest.raises(UserError, match=r"^prompt 2 of 2: holds '<\|im_start\|>', a token that opens or ends a turn"):
        generate(peaked_model, tiny_tokenizer, ["hello", "<|im_start|>user\nhello"], max_new_tokens=2)


def test_eos_and_stop_strings_cut_the_completion(peaked_model, tiny_tokenizer):
    ids = tiny_tokenizer(
        render_prompt(tiny_tokenizer, "hi"), return_tensors="pt", add_special_tokens=False
    ).input_ids
    with torch.no_grad():
        out = peaked_model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[
            0, ids.shape[1] :
        ].tolist()
    assert len(set(out)) > 3
    # Declare the model's 4th greedy token an EOS: the completion ends just before its first occurrence.
    peaked_model.generation_config.eos_token_id = out[3]
    cut = out[: out.index(out[3])]
    got = generate(peaked_model, tiny_tokenizer, ["hi"], max_new_tokens=8)[0]
    assert got == tiny_tokenizer.decode(cut, skip_special_tokens=True)

    peaked_model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    full = generate(peaked_model, tiny_tokenizer, ["hi"], max_new_tokens=8)[0]
    stop = full[2:4]
    assert (
        generate(peaked_model, tiny_tokenizer, ["hi"], max_new_tokens=8, stop=["zzz", stop])[0]
        == full[: full.find(stop)]
    )


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_model, tiny_tokenizer):
    state = torch.get_rng_state()
    a = generate(tiny_model, tiny_tokenizer, ["hi", "yo"], max_new_tokens=10, temperature=1.0, seed=1)
    b = generate(tiny_model, tiny_tokenizer, ["hi", "yo"], max_new_tokens=10, temperature=1.0, seed=1)
    c = generate(tiny_model, tiny_tokenizer, ["hi", "yo"], max_new_tokens=10, temperature=1.0, seed=2)
    assert a == b and a != c
    assert torch.equal(torch.get_rng_state(), state)


def test_a_prompts_sample_does_not_depend_on_the_batch_size_or_the_prompts_after_it(tiny_model, tiny_tokenizer):
    """One random stream for a batch made a prompt's seeded sample depend on the batch size and on the other
    prompts: `evaluate --n 3` and `--n 6` sampled the same first three prompts differently (an audit). Each prompt
    draws from its own stream now, seeded from the seed and its index."""
    prompts = ["hello there", "a much longer prompt than the first", "x", "another one", "and a fifth"]
    kwargs = {"max_new_tokens": 10, "temperature": 1.0, "seed": 5}
    whole = generate(tiny_model, tiny_tokenizer, prompts, batch_size=16, **kwargs)
    assert generate(tiny_model, tiny_tokenizer, prompts, batch_size=1, **kwargs) == whole
    assert generate(tiny_model, tiny_tokenizer, prompts, batch_size=2, **kwargs) == whole
    assert generate(tiny_model, tiny_tokenizer, prompts[:3], batch_size=16, **kwargs) == whole[:3]
    assert len(set(whole)) > 1


def test_training_mode_is_restored(tiny_model, tiny_tokenizer):
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, ["hi"], max_new_tokens=2)
    assert tiny_model.training


def test_no_special_tokens_in_output(tiny_model, tiny_tokenizer):
    outs = generate(tiny_model, tiny_tokenizer, ["hi"] * 3, max_new_tokens=20, temperature=1.0, seed=0)
    assert not any(tok in o for o in outs for tok in ("<|im_end|>", "<|im_start|>", "<|pad|>"))


def _skew(model):
    """Every generation_config field that switches on a logits processor, set hard enough to change samples."""
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.typical_p, gc.min_p, gc.no_repeat_ngram_size = 3.0, 2, 0.3, 0.5, 1
    gc.min_new_tokens, gc.suppress_tokens = 5, list(range(3, 100))
    gc.begin_suppress_tokens = list(range(100, 200))
    gc.bad_words_ids, gc.sequence_bias = [[t] for t in range(200, 230)], {(230,): 20.0}
    gc.forced_eos_token_id, gc.renormalize_logits = 2, True


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (1.3, 1.0)])
def test_the_models_generation_config_does_not_change_what_is_generated(
    tiny_tokenizer, monkeypatch, temperature, top_p
):
    """Evaluation at temperature T samples top-p(softmax(logits / T)) and greedy stays the argmax, whatever a
    model's generation_config.json sets: the same seed gives the same text with or without those fields, and the
    only logits processors transformers builds are the temperature and top-p warpers, then each prompt's own
    random stream (`RowStreams`) that draws from them."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from posttrain.models.generation import RowStreams

    plain, skewed = make_tiny_model(len(tiny_tokenizer)), make_tiny_model(len(tiny_tokenizer))
    _skew(skewed)
    kwargs = {"max_new_tokens": 12, "temperature": temperature, "top_p": top_p, "seed": 3}
    built = []
    real = type(skewed)._get_logits_processor
    record = lambda self, *a, **k: built.append(real(self, *a, **k)) or built[-1]  # noqa: E731
    monkeypatch.setattr(type(skewed), "_get_logits_processor", record)
    got = generate(skewed, tiny_tokenizer, PROMPTS, **kwargs)
    assert got == generate(plain, tiny_tokenizer, PROMPTS, **kwargs)
    expected = [TemperatureLogitsWarper] * (0 < temperature != 1.0) + [TopPLogitsWarper] * (top_p < 1.0)
    expected += [RowStreams] * (temperature > 0)
    # one list per `generate` call (greedy decoding makes several per batch: `greedy_decode`)
    assert len(built) >= 2 and all([type(p) for p in ps] == expected for ps in built)
    assert skewed.generation_config.top_k == 2  # the model's own config is back afterwards


@pytest.mark.parametrize(
    "family, window",
    [("llama", None), ("gemma2", 512), ("gemma2", 16), ("cohere", None), ("granite", None), ("gpt2", None)],
)
def test_finished_rows_leave_the_decode_batch(tiny_tokenizer, family, window):
    """Greedy: the prompts' shared prefix is encoded once, a row that has produced an EOS leaves the batch
    between `generate` segments, and every completion is the one a single `generate` call over the whole
    left-padded batch gives, in every tiny family. A sliding window shorter than the sequence (Gemma 2 with 16
    slots here) counts padding slots, so there the rows keep left padding and no prefix is shared."""
    from posttrain.models.generation import (
        SEGMENT_TOKENS,
        eos_token_ids,
        model_generation_defaults_off,
        plain_generation_config,
    )

    model = make_tiny_model(len(tiny_tokenizer), family=family, hidden_size=64,
                            **({"sliding_window": window} if window else {})).eval()  # fmt: skip
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200)  # as `peaked_model`: no near-ties for rounding to flip
    prompts = [f"prompt {i} " + "x" * (3 * i) for i in range(10)]
    texts = [render_prompt(tiny_tokenizer, p) for p in prompts]
    n = 3 * SEGMENT_TOKENS
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    def one_call(eos):
        cfg = plain_generation_config(max_new_tokens=n, sample=False, eos=eos, pad_id=tiny_tokenizer.pad_token_id)
        with torch.no_grad(), model_generation_defaults_off(model):
            return model.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1] :].tolist()

    def first(row, tokens):
        return next((k for k, t in enumerate(row) if t in tokens), len(row))

    free = one_call([])
    # an end-of-sequence token that ends one row in the first segment and leaves another going into the third
    ends_at = {t: [first(r, {t}) for r in free] for t in sorted({t for row in free for t in row})}
    eos = next(t for t, at in ends_at.items() if min(at) < SEGMENT_TOKENS and max(at) >= 2 * SEGMENT_TOKENS)
    model.generation_config.eos_token_id = eos
    ends = eos_token_ids(model, tiny_tokenizer)  # that one, the tokenizer's EOS, the end-of-turn token
    rows = one_call(ends)
    lengths = [first(row, ends) for row in rows]  # tokens before each row's EOS
    assert min(lengths) < SEGMENT_TOKENS and max(lengths) >= 2 * SEGMENT_TOKENS  # rows end in different segments
    expected = [tiny_tokenizer.decode(row[:k], skip_special_tokens=True) for row, k in zip(rows, lengths)]

    shapes = []  # (rows, tokens) of every forward
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)  # fmt: skip
    try:
        got = generate(model, tiny_tokenizer, prompts, max_new_tokens=n, batch_size=len(prompts))
    finally:
        hook.remove()
    assert got == expected
    ids = [tiny_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    if window == 16:  # left padding: the whole prompts in one forward
        assert shapes[0] == (10, max(map(len, ids)))
        shapes.insert(0, None)
    else:  # the prompts' shared start ("<|im_start|>user\nprompt ": 13 tokens) once, then each row's own
        shared = len(os.path.commonprefix(ids))
        assert shared == 13 and shapes[:2] == [(1, shared), (10, max(map(len, ids)) - shared)]
    # the first segment decodes all 10 rows; the last one only the rows still going
    decoded = [r for r, t in shapes[2:]]
    assert decoded[SEGMENT_TOKENS - 2] == 10 and decoded[-1] == sum(k >= 2 * SEGMENT_TOKENS for k in lengths)
    assert sum(decoded) < 10 * (n - 1)
    # prompts that are all the same share every token but the last, which each row still feeds itself
    one = generate(model, tiny_tokenizer, ["same prompt"], max_new_tokens=10)
    assert generate(model, tiny_tokenizer, ["same prompt"] * 3, max_new_tokens=10) == one * 3


@pytest.mark.parametrize("merge_adapters, merged", [(None, True), (True, True), (False, False)])
def test_a_lora_model_decodes_from_merged_weights_on_a_cpu(tiny_tokenizer, merge_adapters, merged):
    """A LoRA model (a sharpened head, adapters that change its answers): by default on a CPU, or when asked, no
    adapter runs while decoding (peft's lora_A layers are never called) and the completions are the adapted
    model's, the manual argmax loop's through the adapters; the base weights are the same tensors after, the model
    back in training mode. `merge_adapters=False` decodes through the adapters, to the same completions."""
    from posttrain.testing import with_random_lora

    base = make_tiny_model(len(tiny_tokenizer))
    with torch.no_grad():
        base.lm_head.weight.mul_(200)
    plain = [_manual_greedy(base, tiny_tokenizer, p, 12) for p in PROMPTS]
    model = with_random_lora(base, std=2.0).train()
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "lora" not in n}
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in model.named_modules()
             if n.endswith("lora_A.default")]  # fmt: skip
    out = generate(model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, merge_adapters=merge_adapters)
    for h in hooks:
        h.remove()
    assert (calls == []) is merged
    assert model.training
    assert all(p is dict(model.named_parameters())[n] and torch.equal(p, v) for n, (p, v) in weights.items())
    adapted = [_manual_greedy(model.eval(), tiny_tokenizer, p, 12) for p in PROMPTS]
    assert out == adapted
    assert out != plain  # the adapters change the answers: merging them in is not the base model


def test_adapters_folded_in_place_decode_what_the_merged_copies_decode(tiny_tokenizer):
    """The quickstart's adapter scoring folds the adapters into the base in place (`merge_and_unload`: no copies
    held beside the base): the same completions as `generate`'s merged copies and as the adapters themselves."""
    from posttrain.testing import with_random_lora

    def lora():
        base = make_tiny_model(len(tiny_tokenizer))
        with torch.no_grad():
            base.lm_head.weight.mul_(200)
        return with_random_lora(base, std=2.0).eval()

    copies = generate(lora(), tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    through = generate(lora(), tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, merge_adapters=False)
    folded = generate(lora().merge_and_unload(), tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert folded == copies == through and any(folded)


def test_new_tokens_past_the_models_context_are_refused_before_decoding(peaked_model, tiny_tokenizer):
    """The tiny model places 512 positions: the longest prompt's tokens plus max_new_tokens may fill them, one
    more is refused naming the prompt and the room left (GPT-2's learned positions fail with an index error past
    them, rotary ones decode silently at positions never trained)."""
    from posttrain.errors import UserError

    lengths = [len(tiny_tokenizer(render_prompt(tiny_tokenizer, p), add_special_tokens=False).input_ids)
               for p in PROMPTS]  # fmt: skip
    room = 512 - max(lengths)
    assert max(lengths) == lengths[1] and 0 < room < 512
    with pytest.raises(UserError, match=rf"{room + 1} new tokens .* after prompt 2 of 3, {lengths[1]} tokens .* "
                                        rf"context of 512 positions: ask for at most {room} new tokens"):  # fmt: skip
        generate(peaked_model, tiny_tokenizer, PROMPTS, max_new_tokens=room + 1)
    assert len(generate(peaked_model, tiny_tokenizer, PROMPTS, max_new_tokens=room)) == 3
    with pytest.raises(UserError, match="after the prompt, .* shorten that prompt: it fills the context alone"):
        generate(peaked_model, tiny_tokenizer, ["x" * 600], max_new_tokens=1)


def test_an_alibi_model_decodes_each_row_as_it_decodes_alone(tiny_tokenizer):
    """The batch's shared prompt start is encoded once with padding after it, which ALiBi (distances in slots: MPT)
    would count (an audit: 5 of 8 rows decoded other tokens); such a batch is left-padded as a whole instead."""
    from posttrain.models.generation import greedy_decode, plain_generation_config

    model = make_tiny_model(len(tiny_tokenizer), family="mpt").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # wide gaps between logits: no tie flips between layouts
    rows = [tiny_tokenizer(render_prompt(tiny_tokenizer, p), add_special_tokens=False).input_ids
            for p in ["hi", "a much longer prompt than the first", "mid length"]]  # fmt: skip
    cfg = plain_generation_config(max_new_tokens=12, sample=False, eos=[2], pad_id=0)
    with torch.no_grad():
        batched = greedy_decode(model, rows, cfg, [2], 0)
        alone = [greedy_decode(model, [r], cfg, [2], 0)[0] for r in rows]
    assert batched == alone
