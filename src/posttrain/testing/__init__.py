"""Tiny, fully offline stand-ins for a real model and tokenizer, for tests and examples.

`tiny_tokenizer()` is a byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template,
built in code by `byte_tokenizer`, which builds the same kind with any model family's special tokens, EOS, pad
and chat template; `tiny_model()` is a 2-layer random Llama sized to it (or another family's). Neither touches the disk or the
network.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(specials, *, eos: str | None, pad: str | None = None, bos: str | None = None,
                   unk: str | None = None, chat_template: str | None = None):  # fmt: skip
    """A byte-level BPE tokenizer with no merges: ids ``0 .. len(specials) - 1`` are `specials`, then one
    token per UTF-8 byte.

    `specials` are strings or `tokenizers.AddedToken` (e.g. ``rstrip=True``: the token swallows the whitespace
    after it, as some real tokenizer files set). `eos`, `pad`, `bos`, `unk` name tokens of `specials` (pad may
    equal eos). With it, a test can stand in for any model family's tokenizer: its special tokens, its chat
    template, its EOS and its padding, with text that tokenizes one byte per token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    added = [s if isinstance(s, AddedToken) else AddedToken(s, special=True, normalized=False) for s in specials]
    vocab = {a.content: i for i, a in enumerate(added)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(added)
    names = {"eos_token": eos, "pad_token": pad, "bos_token": bos, "unk_token": unk}
    for name, value in names.items():
        if value is not None and value not in vocab:
            raise ValueError(f"{name} {value!r} is not one of the special tokens {list(vocab)[: len(added)]}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = chat_template
    return fast


def merge_tokenizer(specials, *, eos: str | None, bos: str | None = None, prepend_bos: bool = False,
                    chat_template: str | None = None, corpus: list[str] | None = None, vocab_size: int = 400):  # fmt: skip
    """A byte-level BPE tokenizer with merges learned here from `corpus` (GPT-2's split: a space is glued to the
    word after it, ``Ġfour``), as real tokenizers have and `byte_tokenizer` has not: tests of what a prompt's last
    token is need one. `prepend_bos` puts `bos` before plain text, as Llama 2's and Gemma's tokenizers do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus or ["User: Is 2+2 four or five?\nAssistant: four\n", "Assistant: It is 8. Hello there, how are you?\n",
                      "User: add 1 2\nAssistant: 3 and 42\n", "the answer is four. four five six seven eight.\n"]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text * 20, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos)
    fast.chat_template = chat_template
    return fast


def tiny_tokenizer():
    """A byte-level tokenizer (every UTF-8 byte is one token) with a ChatML template; ids 0-2 are specials."""
    return byte_tokenizer(SPECIAL_TOKENS, eos="<|im_end|>", pad="<|pad|>", chat_template=CHATML_TEMPLATE)


def _family_config(family: str, vocab_size: int, hidden_size: int, layers: int):
    """(config, model class) of a 2-layer random model of a family, with the tiny tokenizer's special ids."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    decoder = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common, **decoder), tf.LlamaForCausalLM
    if family == "gemma2":  # final_logit_softcapping: logits = cap * tanh(logits / cap)
        return tf.Gemma2Config(**common, **decoder, head_dim=hidden_size // 4, query_pre_attn_scalar=hidden_size // 4,
                               sliding_window=64), tf.Gemma2ForCausalLM  # fmt: skip
    if family == "cohere":  # logit_scale: logits * scale
        return tf.CohereConfig(**common, **decoder), tf.CohereForCausalLM
    if family == "granite":  # logits_scaling: logits / scaling
        return tf.GraniteConfig(**common, **decoder), tf.GraniteForCausalLM
    if family == "gpt2":  # ships dropout 0.1 on residuals, embeddings and attention
        return tf.GPT2Config(**common, n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=512), tf.GPT2LMHeadModel
    # ALiBi (distances in slots, no position ids: `models.prefix_sharing.slot_distances`)
    if family == "bloom":
        return tf.BloomConfig(**common, hidden_size=hidden_size, n_layer=layers, n_head=4), tf.BloomForCausalLM
    if family == "mpt":
        return tf.MptConfig(**common, d_model=hidden_size, n_layers=layers, n_heads=4, max_seq_len=512), tf.MptForCausalLM
    if family == "falcon_alibi":
        return tf.FalconConfig(**common, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                               alibi=True, new_decoder_architecture=False, multi_query=True), tf.FalconForCausalLM  # fmt: skip
    if family == "opt":  # its head calls the base model's decoder directly (`self.model.decoder`)
        return tf.OPTConfig(**common, hidden_size=hidden_size, ffn_dim=2 * hidden_size, num_hidden_layers=layers,
                            num_attention_heads=4, word_embed_proj_dim=hidden_size, max_position_embeddings=512,
                            dropout=0.0), tf.OPTForCausalLM  # fmt: skip
    raise ValueError(f"unknown tiny model family {family!r}")


TINY_FAMILIES = ("llama", "gemma2", "cohere", "granite", "gpt2")
"""The families whose logits or dropout differ from Llama's, which tests run through every path. `tiny_model` also
builds "bloom", "mpt" and "falcon_alibi" (ALiBi attention) and "opt", for the tests of what differs in them."""


def tiny_model(vocab_size: int = 259, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
               family: str = "llama", **config):  # fmt: skip
    """A 2-layer random model (about 40k parameters) for tests: a Llama by default, or another family of
    `TINY_FAMILIES` whose logits or dropout differ from Llama's; `config` sets further config fields (e.g.
    `final_logit_softcapping=1.0`, `attention_dropout=0.1`)."""
    import torch

    cfg, cls = _family_config(family, vocab_size, hidden_size, layers)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return cls(cfg)


def save_tiny_model(path, *, hidden_size: int = 32, family: str = "llama", **config):
    """Save `tiny_model` and `tiny_tokenizer` as a local Hugging Face folder (loadable by `model.name=PATH`)."""
    tok = tiny_tokenizer()
    tiny_model(len(tok), hidden_size=hidden_size, family=family, **config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def with_random_lora(model, *, r: int = 4, alpha: int = 8, std: float = 0.3, seed: int = 0):
    """`model` with LoRA adapters (`adapters.apply_lora`) whose B is drawn from N(0, std^2) (seeded), not peft's zero
    start, so that the adapted model differs from its base."""
    import torch

    from posttrain.config import TechniqueConfig
    from posttrain.models.adapters import apply_lora

    model = apply_lora(model, TechniqueConfig(name="lora", r=r, alpha=alpha))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def assert_base_unchanged(model, model_dir, prefix: str = "") -> None:
    """Every parameter saved in `model_dir/model.safetensors` is bit-for-bit the same in `model`, a peft model
    (maybe inside a wrapper whose attribute path is `prefix`, e.g. "policy."): LoRA left the base frozen."""
    import torch
    from safetensors.torch import load_file

    on_disk = load_file(str(Path(model_dir) / "model.safetensors"))
    params = dict(model.named_parameters())
    checked = 0
    for name, value in on_disk.items():
        # peft: "<prefix>base_model.model.<name>"; wrapped layers keep their weight as "...<layer>.base_layer.weight"
        layer, _, leaf = name.rpartition(".")
        for candidate in (
            f"{prefix}base_model.model.{name}",
            f"{prefix}base_model.model.{layer}.base_layer.{leaf}",
        ):
            if candidate in params:
                assert torch.equal(params[candidate].detach().cpu(), value), candidate
                checked += 1
    assert checked == len(on_disk), f"{checked} of {len(on_disk)} base parameters found in the model"


def assert_as_accurate(got, want, exact, *, factor: float = 2.0, msg: str = "") -> None:
    """`got` (a float32 computation) is as close to `exact` (the same computation in float64) as `want` (the
    reference float32 computation) is: max |got - exact| <= factor x max(max |want - exact|, 2 ulps of max |exact|).

    For two float32 paths to one gradient that add the same terms in another order (a chunked output layer,
    attention with or without a mask, another CPU's kernels). A fixed tolerance cannot be tight for them: an
    element is a sum over tokens whose terms can be far larger than the sum, so its rounding depends on the terms,
    and a bound that held on one CPU failed on another (an AMD EPYC VM, 2026-12-05: chunked gradients of tiny
    models 1.4e-7 from the unchunked ones, beyond rtol 1e-5 + atol 1e-7). Against float64 the chunked path's error
    was 1.06-1.31x the unchunked one's on every family there; a mixed-up row or a missing term is off by far more.
    """
    import torch

    exact = exact.detach().double()
    err_got = float((got.detach().double() - exact).abs().max())
    err_want = float((want.detach().double() - exact).abs().max())
    scale = float(exact.abs().max())
    floor = 2 * torch.finfo(torch.float32).eps * scale
    # a float32 result is within ~1e-6 of float64 relative to its scale: an "exact" further off is not exact (a
    # float32 step inside it, or another function), and would loosen the bound
    assert err_want <= 1e-4 * scale, f"{msg}: the reference is {err_want:.3g} from the float64 run (scale {scale:.3g})"
    bound = factor * max(err_want, floor)
    assert err_got <= bound, (
        f"{msg}: max |got - exact| = {err_got:.3g} > {bound:.3g} ({factor} x max(the reference's error "
        f"{err_want:.3g}, 2 ulps {floor:.3g}))"
    )
