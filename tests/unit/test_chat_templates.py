"""Golden loss masks over the chat templates of the model families users bring.

Each family's template is written here from its model card's documented format (ChatML as Qwen2.5 and SmolLM2
ship it, Llama 2 chat, Llama 3, Mistral v0.1 and v0.3, Gemma 3, Phi-3.5), with a byte-level tokenizer that
has the family's special tokens, EOS and BOS (`posttrain.testing.byte_tokenizer`): one token per byte, so a
golden string says exactly which tokens get loss. In a golden, ``⟦...⟧`` marks the trained tokens: every
assistant turn's content, what the template writes between it and the end-of-turn token (Llama 2: a space),
and that token itself; never a system or user token, never what follows the end-of-turn token.

Every test runs twice per family: with the pad token equal to EOS (SmolLM2 ships that; Llama and Mistral users
set it) and with a pad token of its own. The trained end-of-turn token must keep its loss in a padded batch even
when it is also the pad id, and padding must carry none.
"""

import warnings
from dataclasses import dataclass

import pytest

from posttrain.data import collate, collate_pairs, render_pair, render_prompt, render_sft
from posttrain.testing import byte_tokenizer

SYS = {"role": "system", "content": "Answer in words, like four."}
U1 = {"role": "user", "content": "Is 2+2 four or five?"}  # holds the first answer: it must not be trained
A1 = {"role": "assistant", "content": "four"}
U2 = {"role": "user", "content": "And 4+4?"}
A2 = {"role": "assistant", "content": "It is 8.\n"}  # a trailing newline: the trimming templates drop it

# --- templates, written from each model card's documented prompt format -------------------------------------

QWEN25 = (  # ChatML; a default system prompt when the conversation has none
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% set rest = messages[1:] %}"
    "{% else %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% set rest = messages %}"
    "{% endif %}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2 = (  # ChatML; its own default system prompt
    "{% for m in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (  # [INST] turns; the system prompt inside the first one; each answer is ' ' + answer + ' ' + EOS
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3 = (  # header tokens; every turn, trimmed, closed by <|eot_id|>
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MIXTRAL = (  # Mistral v0.1 / Mixtral: no system role; the answer right after ' [/INST]', then EOS
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_V03 = (  # the system prompt goes into the LAST user turn; each answer is ' ' + trimmed answer + EOS
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message == user_messages[-1] and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA3 = (  # the assistant is 'model'; the system prompt opens the first user turn; <end_of_turn> closes turns
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI35 = (  # role tokens, <|end|> closes turns; EOS (<|endoftext|>) at the very end unless generating
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family as a test sees it: its template and special tokens, the token that closes an assistant
    turn (`end`), and the golden renderings. `golden` is the conversation `messages`; `golden_pc` is the
    prompt/completion row ``{"prompt": U1's text, "completion": X}`` with ``{}`` where X goes."""

    template: str
    specials: tuple[str, ...]
    eos: str
    pad: str  # its own pad token, used when the test does not set pad = eos
    bos: str | None
    end: str
    messages: tuple[dict, ...]
    golden: str
    golden_pc: str


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")  # fmt: skip
LLAMA3_GOLDEN = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in words, like four.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nIs 2+2 four or five?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n⟦four<|eot_id|>⟧"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n⟦It is 8.<|eot_id|>⟧"
)
LLAMA3_GOLDEN_PC = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIs 2+2 four or five?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n⟦{}<|eot_id|>⟧"
)

FAMILIES = {
    "qwen2.5": Family(
        QWEN25, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>",
        bos=None, end="<|im_end|>", messages=(SYS, U1, A1, U2, A2),
        golden=(
            "<|im_start|>system\nAnswer in words, like four.<|im_end|>\n"
            "<|im_start|>user\nIs 2+2 four or five?<|im_end|>\n"
            "<|im_start|>assistant\n⟦four<|im_end|>⟧\n"
            "<|im_start|>user\nAnd 4+4?<|im_end|>\n"
            "<|im_start|>assistant\n⟦It is 8.\n<|im_end|>⟧\n"
        ),
        golden_pc=(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nIs 2+2 four or five?<|im_end|>\n"
            "<|im_start|>assistant\n⟦{}<|im_end|>⟧\n"
        ),
    ),
    "smollm2": Family(  # no system message: the template's default one is written, and never trained
        SMOLLM2, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>",
        bos="<|im_start|>", end="<|im_end|>", messages=(U1, A1, U2, A2),
        golden=(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nIs 2+2 four or five?<|im_end|>\n"
            "<|im_start|>assistant\n⟦four<|im_end|>⟧\n"
            "<|im_start|>user\nAnd 4+4?<|im_end|>\n"
            "<|im_start|>assistant\n⟦It is 8.\n<|im_end|>⟧\n"
        ),
        golden_pc=(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nIs 2+2 four or five?<|im_end|>\n"
            "<|im_start|>assistant\n⟦{}<|im_end|>⟧\n"
        ),
    ),
    "llama-2": Family(  # the space after [/INST] and the one before </s> are generated: trained
        LLAMA2, ("<unk>", "<s>", "</s>"), eos="</s>", pad="<unk>", bos="<s>", end="</s>",
        messages=(SYS, U1, A1, U2, A2),
        golden=(
            "<s>[INST] <<SYS>>\nAnswer in words, like four.\n<</SYS>>\n\nIs 2+2 four or five? [/INST]⟦ four </s>⟧"
            "<s>[INST] And 4+4? [/INST]⟦ It is 8. </s>⟧"
        ),
        golden_pc="<s>[INST] Is 2+2 four or five? [/INST]⟦ {} </s>⟧",
    ),
    "llama-3.1": Family(  # EOS is the end-of-turn token. (3.1's template adds a dated preamble to the system
        # turn and tool blocks; its user and assistant turns are Llama 3's, written here.)
        LLAMA3, LLAMA3_SPECIALS, eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", bos="<|begin_of_text|>",
        end="<|eot_id|>", messages=(SYS, U1, A1, U2, A2), golden=LLAMA3_GOLDEN, golden_pc=LLAMA3_GOLDEN_PC,
    ),
    "llama-3": Family(  # EOS <|end_of_text|> (base models, and Llama 3 instruct's first release) is not
        LLAMA3, LLAMA3_SPECIALS, eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>",
        bos="<|begin_of_text|>", end="<|eot_id|>", messages=(SYS, U1, A1, U2, A2), golden=LLAMA3_GOLDEN,
        golden_pc=LLAMA3_GOLDEN_PC,
    ),
    "mixtral": Family(
        MIXTRAL, ("<unk>", "<s>", "</s>"), eos="</s>", pad="<unk>", bos="<s>", end="</s>",
        messages=(U1, A1, U2, A2),
        golden="<s>[INST] Is 2+2 four or five? [/INST]⟦four</s>⟧[INST] And 4+4? [/INST]⟦It is 8.\n</s>⟧",
        golden_pc="<s>[INST] Is 2+2 four or five? [/INST]⟦{}</s>⟧",
    ),
    "mistral-v0.3": Family(  # the system prompt moves to the last user turn: no prefix property for turn 1
        MISTRAL_V03, ("<unk>", "<s>", "</s>"), eos="</s>", pad="<unk>", bos="<s>", end="</s>",
        messages=(SYS, U1, A1, U2, A2),
        golden=(
            "<s>[INST] Is 2+2 four or five?[/INST]⟦ four</s>⟧"
            "[INST] Answer in words, like four.\n\nAnd 4+4?[/INST]⟦ It is 8.</s>⟧"
        ),
        golden_pc="<s>[INST] Is 2+2 four or five?[/INST]⟦ {}</s>⟧",
    ),
    "gemma-3": Family(  # EOS <eos> is not the end-of-turn token <end_of_turn>
        GEMMA3, ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>"),
        eos="<eos>", pad="<pad>", bos="<bos>", end="<end_of_turn>", messages=(SYS, U1, A1, U2, A2),
        golden=(
            "<bos><start_of_turn>user\nAnswer in words, like four.\n\nIs 2+2 four or five?<end_of_turn>\n"
            "<start_of_turn>model\n⟦four<end_of_turn>⟧\n"
            "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n"
            "<start_of_turn>model\n⟦It is 8.<end_of_turn>⟧\n"
        ),
        golden_pc=(
            "<bos><start_of_turn>user\nIs 2+2 four or five?<end_of_turn>\n<start_of_turn>model\n⟦{}<end_of_turn>⟧\n"
        ),
    ),
    "phi-3.5": Family(  # EOS <|endoftext|> ends the text after the last turn; <|end|> ends each turn
        PHI35, ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        eos="<|endoftext|>", pad="<unk>", bos="<s>", end="<|end|>", messages=(SYS, U1, A1, U2, A2),
        golden=(
            "<|system|>\nAnswer in words, like four.<|end|>\n"
            "<|user|>\nIs 2+2 four or five?<|end|>\n"
            "<|assistant|>\n⟦four<|end|>⟧\n"
            "<|user|>\nAnd 4+4?<|end|>\n"
            "<|assistant|>\n⟦It is 8.\n<|end|>⟧\n<|endoftext|>"
        ),
        golden_pc="<|user|>\nIs 2+2 four or five?<|end|>\n<|assistant|>\n⟦{}<|end|>⟧\n<|endoftext|>",
    ),
}

CASES = [pytest.param(name, pad, id=f"{name}-{pad}") for name in FAMILIES for pad in ("pad=eos", "own-pad")]


def tokenizer(name: str, pad: str):
    f = FAMILIES[name]
    return byte_tokenizer(list(f.specials), eos=f.eos, pad=f.eos if pad == "pad=eos" else f.pad, bos=f.bos,
                          chat_template=f.template)  # fmt: skip


def marked(tok, ids: list[int], mask: list[int]) -> str:
    """The text of `ids`, token by token, with ``⟦ ⟧`` around each run of trained tokens."""
    out, on = [], False
    for i, m in zip(ids, mask, strict=True):
        if bool(m) != on:
            out.append("⟦" if m else "⟧")
            on = bool(m)
        out.append(tok.decode([i]))
    return "".join(out) + ("⟧" if on else "")


def char_mask(tok, ids: list[int], mask: list[int]) -> list[int]:
    """The loss mask per character of the decoded text (each byte token is one character here)."""
    return [m for i, m in zip(ids, mask, strict=True) for _ in tok.decode([i])]


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_conversation_trains_each_answer_and_its_end_of_turn_token(name, pad):
    f, tok = FAMILIES[name], tokenizer(name, pad)
    r = render_sft(tok, {"messages": list(f.messages), "completion_only": True}, max_length=4096)
    assert marked(tok, r.input_ids, r.loss_mask) == f.golden
    text = tok.apply_chat_template(list(f.messages), tokenize=False)
    assert tok.decode(r.input_ids) == text  # the ids are the template's own rendering
    # Every assistant turn's end-of-turn token is trained; the same token closing other turns (ChatML) is not.
    end_id = tok.convert_tokens_to_ids(f.end)
    assert sum(m for i, m in zip(r.input_ids, r.loss_mask) if i == end_id) == 2
    # No character of a system or user message is trained, wherever the template put it.
    chars = char_mask(tok, r.input_ids, r.loss_mask)
    for msg in f.messages:
        if msg["role"] != "assistant":
            at = text.find(msg["content"].strip())
            assert at >= 0 and not any(chars[at : at + len(msg["content"].strip())]), msg


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_prompt_completion_row_trains_the_completion_and_its_end_of_turn_token(name, pad):
    f, tok = FAMILIES[name], tokenizer(name, pad)
    row = {"prompt": U1["content"], "completion": "four"}
    r = render_sft(tok, row, max_length=4096)
    assert marked(tok, r.input_ids, r.loss_mask) == f.golden_pc.format("four")
    # The first trained token is the first one the model generates after the sampling prompt.
    prompt = render_prompt(tok, row)
    assert r.input_ids[: len(prompt)] == prompt and r.loss_mask.index(1) == len(prompt)


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_preference_pair_scores_each_response_and_its_end_of_turn_token(name, pad):
    f, tok = FAMILIES[name], tokenizer(name, pad)
    pair = render_pair(tok, {"prompt": U1["content"], "chosen": "four", "rejected": "It is five."},
                       max_length=4096)  # fmt: skip
    chosen, rejected = pair.chosen(), pair.rejected()
    assert marked(tok, chosen.input_ids, chosen.loss_mask) == f.golden_pc.format("four")
    assert marked(tok, rejected.input_ids, rejected.loss_mask) == f.golden_pc.format("It is five.")
    assert pair.prompt_ids == render_prompt(tok, {"prompt": U1["content"]})
    # Batched: the shorter chosen row is padded (with EOS itself when pad = eos) and keeps its loss on EOS.
    batch = collate_pairs([pair], tok.pad_token_id)
    end_id, n = tok.convert_tokens_to_ids(f.end), len(chosen.input_ids)
    assert batch["loss_mask"][0].tolist() == chosen.loss_mask + [0] * (len(rejected.input_ids) - n)
    assert batch["loss_mask"][1].tolist() == rejected.loss_mask
    assert batch["input_ids"][0, n:].eq(tok.pad_token_id).all()
    trained_ends = (batch["input_ids"] == end_id) & batch["loss_mask"].bool()
    assert trained_ends.sum(dim=1).tolist() == [1, 1]


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_collate_keeps_the_end_of_turn_loss_and_gives_padding_none(name, pad):
    f, tok = FAMILIES[name], tokenizer(name, pad)
    full = render_sft(tok, {"messages": list(f.messages), "completion_only": True}, max_length=4096)
    short = render_sft(tok, {"prompt": "2+2?", "completion": "4"}, max_length=4096)
    batch = collate([full, short], tok.pad_token_id)
    n, T = len(short.input_ids), len(full.input_ids)
    assert batch["loss_mask"].tolist() == [full.loss_mask, short.loss_mask + [0] * (T - n)]
    assert batch["input_ids"][1, n:].eq(tok.pad_token_id).all() and not batch["attention_mask"][1, n:].any()
    # The SFT targets (token t + 1 where loss_mask[t + 1]) hold every answer's end-of-turn token: 2 + 1.
    end_id = tok.convert_tokens_to_ids(f.end)
    targets = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:].bool()]
    assert int((targets == end_id).sum()) == 3
    if pad == "pad=eos" and f.end == f.eos:  # the same id as the padding, trained only where it is real
        assert int(batch["input_ids"].eq(end_id).logical_and(batch["loss_mask"].bool()).sum()) == 3


def test_an_end_of_turn_token_that_swallows_the_newline_after_it():
    """Tokens with ``rstrip`` (the newline after ``<|end|>`` and ``<|assistant|>`` is part of the token, as some
    Phi-3 tokenizer files set): ``<|end|>`` is still trained and ``<|assistant|>`` still is not."""
    from tokenizers import AddedToken

    f = FAMILIES["phi-3.5"]
    specials = [AddedToken(s, special=True, normalized=False, rstrip=s.startswith("<|") and s != "<|endoftext|>")
                for s in f.specials]  # fmt: skip
    tok = byte_tokenizer(specials, eos=f.eos, pad=f.eos, bos=f.bos, chat_template=f.template)
    r = render_sft(tok, {"messages": list(f.messages), "completion_only": True}, max_length=4096)
    assert marked(tok, r.input_ids, r.loss_mask) == (
        "<|system|>Answer in words, like four.<|end|><|user|>Is 2+2 four or five?<|end|>"
        "<|assistant|>⟦four<|end|>⟧<|user|>And 4+4?<|end|><|assistant|>⟦It is 8.\n<|end|>⟧<|endoftext|>"
    )


def sentencepiece_llama2_tokenizer():
    """Llama 2's kind of tokenizer: spaces become ``▁`` and stick to the next word, so ``' four'`` after
    ``[/INST]`` is one token ``▁four`` whose offsets start at the space (the template's, not the content's)."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in "▁\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "f"), ("▁f", "o"), ("▁fo", "u"), ("▁fou", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")  # fmt: skip
    fast.chat_template = LLAMA2
    return fast


def test_a_word_token_that_starts_with_the_templates_space_is_trained():
    tok = sentencepiece_llama2_tokenizer()
    row = {"prompt": U1["content"], "completion": "four"}
    r = render_sft(tok, row, max_length=4096)
    trained = [tok.convert_ids_to_tokens(i) for i, m in zip(r.input_ids, r.loss_mask) if m]
    assert trained == ["▁four", "▁", "</s>"]
    prompt = render_prompt(tok, row)
    assert r.input_ids[: len(prompt)] == prompt and r.loss_mask.index(1) == len(prompt)


def test_without_the_prefix_property_the_assistant_header_is_not_trained():
    """ChatML with the system prompt moved into the last user turn (as Mistral v0.3 moves it): rendering the
    conversation up to the first answer is not a prefix of the whole. The answer is found after its user turn
    (which holds the same word), and the header's newline before it stays untrained."""
    template = (
        "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{% set system = messages[0]['content'] + '\n' if m == users[-1] and messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + (system or '') + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", chat_template=template)
    r = render_sft(tok, {"messages": [SYS, U1, A1, U2, A2], "completion_only": True}, max_length=4096)
    assert marked(tok, r.input_ids, r.loss_mask) == (
        "<|im_start|>user\nIs 2+2 four or five?<|im_end|>\n<|im_start|>assistant\n⟦four<|im_end|>⟧\n"
        "<|im_start|>user\nAnswer in words, like four.\nAnd 4+4?<|im_end|>\n"
        "<|im_start|>assistant\n⟦It is 8.\n<|im_end|>⟧\n"
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_stops_on_the_end_of_turn_token_training_teaches(name):
    """What SFT trains the model to end a turn with is a stop token for sampling too, also where it is not the
    tokenizer's EOS (Llama 3 with <|end_of_text|>, Gemma 3, Phi-3.5): else rollouts and evaluation run past it."""
    from types import SimpleNamespace

    from posttrain.data.render import end_of_turn_ids
    from posttrain.models.generation import eos_token_ids

    tok = tokenizer(name, "own-pad")
    end = tok.convert_tokens_to_ids(FAMILIES[name].end)
    assert end_of_turn_ids(tok) == [end]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert set(eos_token_ids(model, tok)) == {end, tok.eos_token_id}


# --- what a template renders must not depend on the day, and a base model is sampled as it was trained ---------

LLAMA32_DATED = (  # Llama 3.2's system block: the date from `date_string`, else `strftime_now` (its model card)
    "{{ bos_token }}"
    "{% if not date_string is defined %}"
    "{% if strftime_now is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ' "
    "+ date_string + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STRFTIME_ONLY = (  # a template that calls the environment's `strftime_now` directly
    "{{ 'Today is ' + strftime_now('%Y-%m-%d') + '\n' }}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.mark.parametrize("template", [LLAMA32_DATED, STRFTIME_ONLY], ids=["llama-3.2", "strftime_now"])
def test_a_template_that_writes_todays_date_renders_the_same_on_any_day(template, monkeypatch):
    """Rendered with today's date, a row's tokens changed at midnight: a run resumed the next day, or its
    evaluation, saw other text than it trained on (an audit of chat templates, eighteenth session)."""
    import datetime

    import transformers.utils.chat_template_utils as ctu

    from posttrain.data.render import TEMPLATE_DATE
    from posttrain.models.generation import render_prompt as sampling_prompt

    tok = byte_tokenizer(LLAMA3_SPECIALS, eos="<|eot_id|>", bos="<|begin_of_text|>", chat_template=template)
    row = {"messages": [U1, A1]}
    renders = []
    for day in (datetime.datetime(2026, 12, 7, 23, 59), datetime.datetime(2026, 12, 8, 0, 1)):
        monkeypatch.setattr(ctu, "datetime", type("FrozenDatetime", (datetime.datetime,), {"now": staticmethod(
            lambda tz=None, day=day: day)}))  # fmt: skip
        assert day.strftime("%d %b %Y") in tok.apply_chat_template([U1], tokenize=False) or template is STRFTIME_ONLY
        renders.append((render_sft(tok, row, max_length=999).input_ids, sampling_prompt(tok, U1["content"])))
    assert renders[0] == renders[1]
    text = sampling_prompt(tok, U1["content"])
    assert TEMPLATE_DATE.strftime("%d %b %Y") in text or TEMPLATE_DATE.strftime("%Y-%m-%d") in text


def test_a_base_model_without_a_template_is_sampled_on_the_format_it_trains_on():
    """`generate` and `evaluate` sent a template-less model the raw prompt while SFT, DPO and GRPO trained it on
    the fallback template's `User: ... Assistant: `: the evaluated prompt was not the trained one."""
    from posttrain.models.generation import render_prompt as sampling_prompt

    tok = byte_tokenizer(["<|endoftext|>"], eos="<|endoftext|>")
    assert not tok.chat_template
    rendered = render_sft(tok, {"prompt": U1["content"], "completion": "four"}, max_length=999)
    trained_prompt = tok.decode(rendered.input_ids[: rendered.loss_mask.index(1)])
    assert sampling_prompt(tok, U1["content"]) == trained_prompt == f"User: {U1['content']}\nAssistant:"
    assert tok.decode(render_prompt(tok, {"prompt": U1["content"]})) == trained_prompt  # RL's sampling prompt
    assert sampling_prompt(tok, [SYS, U1]) == f"{SYS['content']}\n\nUser: {U1['content']}\nAssistant:"


@pytest.mark.parametrize("completion", ["four", "4", "It is 8.", "42 and 3", "\nfive"])
@pytest.mark.parametrize("bos", [False, True])
def test_a_template_less_prompt_is_the_trained_prefix_with_merges(completion, bos):
    """With a tokenizer that merges (a space glued to the next word: ``Ġfour``), the fallback's sampling prompt
    ended in a lone space token after `Assistant:` that SFT never trained there (it trained ``Ġfour``): a model
    that had learned every answer generated empty ones. The prompt's ids are now exactly the trained row's ids
    before its first trained token, and the decoded answer loses the space the template writes. A tokenizer that
    puts BOS before plain text (Llama 2, Gemma base) gets it before the rendered conversation too, in training and
    sampling alike."""
    from posttrain.data.render import answer_scaffold, strip_scaffold
    from posttrain.testing import merge_tokenizer

    tok = merge_tokenizer(["<|endoftext|>", "<s>"], eos="<|endoftext|>", bos="<s>", prepend_bos=bos)
    rendered = render_sft(tok, {"prompt": U1["content"], "completion": completion}, max_length=999)
    first = rendered.loss_mask.index(1)
    assert render_prompt(tok, {"prompt": U1["content"]}) == rendered.input_ids[:first]
    assert (rendered.input_ids[0] == tok.bos_token_id) is bos
    trained = [i for i, m in zip(rendered.input_ids, rendered.loss_mask) if m]
    answer = tok.decode(trained, skip_special_tokens=True)
    assert strip_scaffold(answer, answer_scaffold(tok)) == completion


ALPACA_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
                "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")
CHATML_ADDED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_template_that_writes_no_stop_is_warned_and_an_added_marker_closes_the_turn():
    """An Alpaca-style template closes an answer with plain text: nothing trains a stop, and generation runs every
    answer to max_new_tokens; the render says so (plain `text` rows get the EOS and are not concerned). ChatML
    markers added with `add_tokens` (not marked special, as community fine-tunes add them) close the turn: they are
    trained and sampling stops on them."""
    from posttrain.data.render import end_of_turn_ids, render_dataset

    alpaca = byte_tokenizer(["<unk>", "<s>", "</s>"], eos="</s>", bos="<s>", chat_template=ALPACA_STYLE)
    with pytest.warns(UserWarning, match="rows.jsonl: the chat template writes no token after an assistant's answer"):
        render_dataset(alpaca, [{"prompt": "2+2?", "completion": "four"}], max_length=99, source="rows.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render_dataset(alpaca, [{"text": "four"}], max_length=99)
    added = byte_tokenizer(["<unk>", "</s>"], eos="</s>", chat_template=CHATML_ADDED)
    added.add_tokens(["<|im_start|>", "<|im_end|>"])
    assert added.convert_ids_to_tokens(end_of_turn_ids(added)) == ["<|im_end|>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (r,), _ = render_dataset(added, [{"prompt": "2+2?", "completion": "four"}], max_length=99)
    assert added.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m]) == "four<|im_end|>"


QWEN3_NO_THINKING = (  # Qwen3's shape: the last assistant turn wrapped in an (empty) think block, earlier ones not
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_answer_rewards_see_is_without_the_templates_scaffold():
    """A Qwen3-style template writes an empty think block before every final answer, so SFT teaches the model to
    write it; its decoded answers began with ``<think>\\n\\n</think>\\n\\n`` (not special tokens) and exact_match
    scored a correct model 0. `generate` and the rollouts now take the scaffold off what verifiers see."""
    import torch

    from posttrain.data.render import answer_scaffold, strip_scaffold
    from posttrain.rollout.engine import build_rollout

    tok = byte_tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|pad|>",
                         chat_template=QWEN3_NO_THINKING)  # fmt: skip
    scaffold = answer_scaffold(tok)
    assert scaffold == "<think>\n\n</think>\n\n"
    trained = render_sft(tok, {"prompt": "2+2?", "completion": "4"}, max_length=999)
    assert marked(tok, trained.input_ids, trained.loss_mask).endswith("⟦<think>\n\n</think>\n\n4<|im_end|>⟧\n")
    ids = torch.tensor([tok("<think>\n\n</think>\n\n4<|im_end|>", add_special_tokens=False)["input_ids"]])
    prompt = torch.tensor([tok("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False)["input_ids"]])  # fmt: skip
    rollout = build_rollout(tok, prompt, torch.ones_like(prompt), ids, torch.zeros(ids.shape), eos=[tok.eos_token_id],
                            stop=[])  # fmt: skip
    assert rollout.texts == ["4"]
    assert strip_scaffold("<think>\nI add.\n</think>\n\n4", scaffold) == "<think>\nI add.\n</think>\n\n4"  # reasoning stays
    assert answer_scaffold(byte_tokenizer(["<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                                          chat_template=SMOLLM2)) == ""  # fmt: skip
    tok.chat_template = SMOLLM2  # found once per tokenizer and template: a new template is looked at anew
    assert answer_scaffold(tok) == ""


R1_DISTILL = (  # DeepSeek-R1's distilled models: the generation prompt opens a think block that a finished turn lacks
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% else %}{{ '<|Assistant|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{% endif %}"
)


def test_a_generation_prompt_that_finished_turns_do_not_write_is_said_once():
    """Training taught the answer right after ``<|Assistant|>`` while sampling prompts end with
    ``<|Assistant|><think>\\n``: the model is sampled on a prompt it never trained on, silently."""
    tok = byte_tokenizer(["<|User|>", "<|Assistant|>", "<|end|>"], eos="<|end|>", chat_template=R1_DISTILL)
    row = {"prompt": "2+2?", "completion": "4"}
    with pytest.warns(UserWarning, match=r"generation prompt ends with '<\|Assistant\|><think>', which its rendering "
                                         r"of a finished conversation does not write before the answer \(it writes "
                                         r"'<\|Assistant\|>'\)") as caught:  # fmt: skip
        render_sft(tok, row, max_length=999)
        render_sft(tok, row, max_length=999)
    assert len(caught) == 1  # once per template, not once per row


QWEN3_SWITCH = QWEN3_NO_THINKING.replace(  # and Qwen3's switch: enable_thinking=false puts the block in the prompt
    "{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")


def test_chat_template_kwargs_are_written_into_the_template_every_render_and_the_saved_tokenizer_use(tmp_path):
    """`data.chat_template_kwargs` (`set_template_variables`): Qwen3's `enable_thinking: false` makes the empty think
    block part of the generation prompt, so SFT trains the answer alone and sampling starts after the block; the
    template renders as transformers renders the original given the variable, and the saved tokenizer keeps it."""
    from transformers import AutoTokenizer

    from posttrain.data.render import answer_scaffold, chat_text, set_template_variables
    from posttrain.models.generation import render_prompt as sampling_prompt

    def qwen3(template=QWEN3_SWITCH):
        return byte_tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|pad|>",
                              chat_template=template)  # fmt: skip

    tok = qwen3()
    assert answer_scaffold(tok) == "<think>\n\n</think>\n\n" and sampling_prompt(tok, "2+2?").endswith("assistant\n")
    set_template_variables(tok, {"enable_thinking": False})
    assert sampling_prompt(tok, "2+2?") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert answer_scaffold(tok) == ""  # the block is the prompt's now: answers begin with the answer
    trained = render_sft(tok, {"prompt": "2+2?", "completion": "4"}, max_length=999)
    assert marked(tok, trained.input_ids, trained.loss_mask).endswith("<think>\n\n</think>\n\n⟦4<|im_end|>⟧\n")
    for conversation, gen in (([U1, A1, U2, A2], False), ([U1, A1, U2], True)):
        assert chat_text(tok, conversation, add_generation_prompt=gen) == qwen3().apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=gen, enable_thinking=False)  # fmt: skip
    tok.save_pretrained(tmp_path / "saved")
    assert sampling_prompt(AutoTokenizer.from_pretrained(tmp_path / "saved"), "2+2?") == sampling_prompt(tok, "2+2?")
    set_template_variables(tok, {"enable_thinking": True})  # trained again with another value: it replaces the first
    assert tok.chat_template.count("{% set ") == 1 and sampling_prompt(tok, "2+2?").endswith("assistant\n")
    styled = qwen3(QWEN3_SWITCH + "{{ style | default('') }}")  # another name later (--template-var on a fine-tune)
    set_template_variables(styled, {"enable_thinking": False})
    set_template_variables(styled, {"style": "terse"})  # keeps the value the model was trained with
    assert sampling_prompt(styled, "2+2?").endswith("assistant\n<think>\n\n</think>\n\nterse")
    newline = qwen3("\n" + QWEN3_SWITCH)  # a template starting with a newline keeps it (transformers' trim_blocks)
    set_template_variables(newline, {"enable_thinking": False})
    assert chat_text(newline, [U1], add_generation_prompt=True) == qwen3("\n" + QWEN3_SWITCH).apply_chat_template(
        [U1], tokenize=False, add_generation_prompt=True, enable_thinking=False)  # fmt: skip
    set_template_variables(newline, {"enable_thinking": True})
    assert newline.chat_template.endswith("true %}{# end of data.chat_template_kwargs #}\n" + "\n" + QWEN3_SWITCH)
    # spaces before the first block (lstrip_blocks takes them off) and a value outside ASCII render as transformers
    # renders the original given the variable
    spaced = "  {% for m in messages %}{{ m['content'] }}{% endfor %}{{ greeting }}"
    tok = qwen3(spaced)
    set_template_variables(tok, {"greeting": "hé 😀 \"q\""})
    assert chat_text(tok, [U1]) == qwen3(spaced).apply_chat_template([U1], tokenize=False, greeting="hé 😀 \"q\"")


@pytest.mark.parametrize(("template", "variables", "needle"), [
    (None, {"enable_thinking": False}, "the model's tokenizer has no chat template"),
    (QWEN3_SWITCH, {"enable_thinkng": False}, "the model's chat template never mentions enable_thinkng"),
    (SMOLLM2, {"enable_thinking": False}, "never mentions enable_thinking, so setting it would change nothing"),
    (QWEN3_SWITCH, {"add_generation_prompt": True}, "add_generation_prompt cannot be set"),
    (QWEN3_SWITCH, {"think": False}, "never mentions think,"),  # a word of its text (<think>), not a variable
    (QWEN3_SWITCH, {"reasoning-mode": False}, "'reasoning-mode' cannot be a template variable's name"),
    (QWEN3_SWITCH, {"true": False}, "'true' cannot be a template variable's name"),
])  # fmt: skip
def test_chat_template_kwargs_that_would_do_nothing_are_refused(template, variables, needle):
    from posttrain.data.render import set_template_variables
    from posttrain.errors import ConfigError

    tok = byte_tokenizer(["<|im_start|>", "<|im_end|>"], eos="<|im_end|>", chat_template=template)
    with pytest.raises(ConfigError, match=needle):
        set_template_variables(tok, variables)
    assert tok.chat_template == template


def test_rows_that_train_earlier_turns_under_a_last_turn_scaffold_are_said():
    """Qwen3's template writes the empty think block before a conversation's last answer only: a chat row's earlier
    assistant turns are trained without it, the last with it. Said once, naming the rows; a prompt/completion row
    (one trained answer) and a template that writes every turn alike say nothing."""
    import warnings

    from posttrain.data.render import render_dataset
    from posttrain.data.schema import normalise_row

    qwen3 = byte_tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|pad|>",
                           chat_template=QWEN3_NO_THINKING)  # fmt: skip
    smol = byte_tokenizer(["<|pad|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|pad|>",
                          chat_template=SMOLLM2)  # fmt: skip
    def row(raw, line):  # as load_rows gives them: normalised, with their file line
        return normalise_row(raw, "sft", source="chat.jsonl", line=line)

    chat = {"messages": [U1, A1, U2, A2]}
    single = {"prompt": [U1, A1, U2], "completion": A2["content"]}
    for tok, rows, said in ((qwen3, [row(single, 1), row(chat, 4), row(chat, 7)], True),
                            (qwen3, [row(single, 1)], False), (smol, [row(chat, 1)], False)):  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            render_dataset(tok, rows, max_length=999, source="chat.jsonl")
        notes = [str(w.message) for w in caught]
        assert bool(notes) == said, notes
        if said:
            assert notes == [
                "chat.jsonl: 2 of 3 rows train assistant turns before their last (lines 4 and 7), which this chat "
                "template writes without the '<think>\\n\\n</think>' it writes before a conversation's last answer (as "
                "Qwen3's drops earlier turns' reasoning): the model learns to answer both with and without it. To "
                "train each row's last answer only, give those rows as `prompt` (the earlier turns, as messages) and "
                "`completion`"]  # fmt: skip


def test_the_markers_refused_in_message_text_are_the_tokens_that_open_or_end_a_turn():
    """What `check_markers` refuses, per family: every special token the template writes (with a system message
    too: Phi-3's <|system|>) and the EOS (Llama 3 base's <|end_of_text|>, Gemma's <eos>: an answer holding it
    teaches the model to stop there); not the other special tokens (Qwen's pad <|endoftext|>: a text that holds it
    reads as it does for the tokenizer, and opens or ends no turn)."""
    from posttrain.data.render import template_markers

    expected = {
        "qwen2.5": {"<|im_start|>", "<|im_end|>"},
        "llama-3": {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"},
        "gemma-3": {"<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"},
    }  # fmt: skip
    for name, want in expected.items():
        assert set(template_markers(tokenizer(name, "pad=eos"))) == want, name
    assert "<|system|>" in template_markers(tokenizer("phi-3.5", "pad=eos"))
