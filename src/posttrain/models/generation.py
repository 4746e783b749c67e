"""Sample completions for a list of prompts with Hugging Face `generate` (KV cache, left padding).

Small on purpose: `posttrain generate`, evaluation and the quickstart's before/after table use it. The RL
rollout engine (batched sampling that yields training batches with log-probabilities) is a separate module.
"""

from __future__ import annotations

from collections.abc import Sequence

Prompt = str | Sequence[dict]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model sees: the chat template with the generation prompt (the assistant turn's header).

    A string is one user message. Without a chat template (a base model), a string prompt is used as is.
    """
    if isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            return prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not getattr(tokenizer, "chat_template", None):
            from posttrain.errors import UserError

            raise UserError(
                "this tokenizer has no chat template, so prompts must be plain strings, not messages"
            )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation_config EOS id(s)."""
    ids: set[int] = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return sorted(ids)


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> list[str]:
    """Complete each prompt; returns the decoded completions (no prompt, no special tokens), in prompt order.

    Greedy when `temperature == 0`, else sampling with `temperature` and nucleus `top_p` (no top-k). Each
    completion ends at the first EOS token or at the first of the `stop` strings (the stop string is cut off).
    `seed` makes sampling repeatable without touching the caller's global RNG state. The first call with a new
    set of stop strings costs a few seconds on a large vocabulary (transformers precomputes a table, then caches it).
    """
    import torch
    from transformers import GenerationConfig

    texts = [render_prompt(tokenizer, p) for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        use_cache=True,
        # Stop decoding a row as soon as it contains a stop string (saves the tokens after it); the text is
        # still cut below, since the matched string itself must go.
        stop_strings=list(stop) if stop else None,
    )
    # Longest prompts first, batched by similar length: less padding per batch. Results go back in order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                # Left padding: every prompt ends at the same position, so new tokens are appended in one column.
                enc = tokenizer(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False,
                ).to(device)  # fmt: skip
                out = model.generate(
                    **enc, generation_config=gen_cfg, tokenizer=tokenizer
                )  # (b, prompt_len + new)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                for i, row in zip(idx, new_tokens.tolist()):
                    results[i] = _cut(tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True), stop)
    finally:
        model.train(was_training)
    return results


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """The token ids before the first EOS (padding after EOS goes too).

    >>> _until_eos([5, 6, 2, 0, 0], [2])
    [5, 6]
    """
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


def _cut(text: str, stop: list[str] | None) -> str:
    """Text up to the earliest stop string.

    >>> _cut("answer: 4\\nQ: next", ["\\nQ:", "###"])
    'answer: 4'
    """
    if not stop:
        return text
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text
