"""Render a normalised row into token ids and a loss mask: the single source of truth for masking.

`render_sft` returns ``Rendered(input_ids, loss_mask, truncated)``. ``loss_mask[t] == 1`` means token ``t`` is a
training target; the trainer shifts (the logits at ``t - 1`` predict token ``t``), so ``loss_mask[0]`` is never
used as a target.

How the mask is found (``train_on="completion"``): the conversation is rendered with the tokenizer's own chat
template, once in full and once per assistant turn up to that turn with the generation prompt
(``messages[:k]`` + ``add_generation_prompt=True``). When that is a prefix of the full text (the prefix
property, true for ChatML, Llama 3, Gemma, ...), the assistant's content is searched for from there, so a
prompt that happens to contain the same words is never matched. The trained characters are the content and the
end-of-turn token right after it (``<|im_end|>`` for ChatML: the model must learn to stop); the role header, the
newline after the end-of-turn token, system and user turns are never trained. Characters map to tokens through
the fast tokenizer's offsets on the full text (so ids equal tokenizing the whole conversation); a slow
tokenizer is encoded piece by piece instead. Every assistant turn counts, except the turns of a
prompt/completion row's prompt (``row["n_prompt"]``).

With ``train_on="all"`` every token counts; a plain ``text`` row always trains every token (and gets the EOS
token appended). A tokenizer with no chat template uses `FALLBACK_CHAT_TEMPLATE`: ``User: ...`` /
``Assistant: ...`` lines, each assistant turn ending with the EOS token.

This module does not pad or batch (see `collate.py`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from posttrain.data.schema import normalise_row
from posttrain.errors import DataError, Problem, UserError

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + (eos_token or '') + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


@dataclass
class Rendered:
    """One example as token ids; ``loss_mask[t] == 1`` when token ``t`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def chat_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (or the fallback when it has none)."""
    kwargs = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_CHAT_TEMPLATE}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def render_sft(tokenizer, row: dict, *, max_length: int, train_on: str = "completion", source: str = "data"
               ) -> Rendered:  # fmt: skip
    """Token ids and loss mask of one normalised SFT row (see `load_rows`), truncated to `max_length`.

    A raw ``prompt``/``completion`` row (e.g. from ``TASKS[name].make``) is normalised first.
    Raises `DataError` naming `source`, the row's line and ``max_length`` when no target token survives
    truncation (the prompt alone fills `max_length`).
    """
    if train_on not in ("completion", "all"):
        raise ValueError(f"train_on must be 'completion' or 'all', got {train_on!r}")
    if "messages" not in row and "text" not in row:  # a raw prompt/completion row, e.g. from a task's make()
        row = normalise_row(row, "sft", source=source, line=getattr(row, "line", None))
    if "text" in row and "messages" not in row:
        ids = tokenizer(row["text"])["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = [*ids, tokenizer.eos_token_id]
        mask = [1] * len(ids)
    else:
        text = chat_text(tokenizer, row["messages"])
        spans = _assistant_spans(tokenizer, row["messages"], text, first=row.get("n_prompt", 0))
        ids, mask = _tokenize_with_spans(tokenizer, text, spans)
        if train_on == "all" or not row.get("completion_only", True):
            mask = [1] * len(ids)
    truncated = len(ids) > max_length
    if not any(mask[1:max_length]):  # position 0 is never a target (nothing predicts it)
        first = next((t for t, m in enumerate(mask) if m and t), len(ids))
        raise DataError([Problem(source, getattr(row, "line", None), "max_length", (
            f"the prompt alone is {first} tokens, >= max_length {max_length}: no completion token would be "
            "trained; raise data.max_length or shorten this row")
        )])  # fmt: skip
    ids, mask = ids[:max_length], mask[:max_length]
    return Rendered(ids, mask, truncated)


def render_prompt(tokenizer, row: dict) -> list[int]:
    """Token ids of a row's prompt followed by the generation prompt (for evaluation and sampling).

    The prompt is ``row["prompt"]`` (a string or messages), or ``row["messages"]`` up to ``n_prompt`` (a
    prompt/completion row) or without its trailing assistant turns.
    """
    if "messages" in row:
        messages = list(row["messages"])
        if "n_prompt" in row:
            messages = messages[: row["n_prompt"]]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    elif "prompt" in row:
        p = row["prompt"]
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
    else:
        raise UserError("render_prompt needs a row with `prompt` or `messages` (a `text` row has no prompt)")
    text = chat_text(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_all(render_one, rows, *, header: str) -> list:
    """`render_one(row)` for every row, collecting the `DataError` problems of all rows into one error (its
    header: `header` with ``{n}``, the number of problems). Rows without a file line are numbered by position."""
    out, problems = [], []
    for i, row in enumerate(rows):
        try:
            out.append(render_one(row))
        except DataError as err:
            problems += [p if p.line is not None else Problem(p.file, None, p.field, f"row {i + 1}: {p.message}")
                         for p in err.problems]  # fmt: skip
    if problems:
        raise DataError(problems, header=header.format(n=len(problems)))
    return out


def render_dataset(tokenizer, rows: list[dict], *, max_length: int, train_on: str = "completion",
                   source: str = "data") -> tuple[list[Rendered], int]:  # fmt: skip
    """Render every row; warn once with the number of truncated rows. Rows too long to train raise together."""
    out = render_all(
        lambda row: render_sft(tokenizer, row, max_length=max_length, train_on=train_on, source=source),
        rows, header=f"{source}: {{n}} row(s) do not fit max_length={max_length}",
    )  # fmt: skip
    n_truncated = sum(r.truncated for r in out)
    if n_truncated:
        warnings.warn(
            f"{source}: {n_truncated} of {len(out)} rows are longer than max_length={max_length} tokens and were "
            "truncated (their ends are not trained); raise data.max_length to keep them whole",
            stacklevel=2,
        )
    return out, n_truncated


def _end_of_turn_tokens(tokenizer) -> list[str]:
    """Special tokens that may close an assistant turn: EOS and any special token named like an end marker."""
    names = {tokenizer.eos_token} if tokenizer.eos_token else set()
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = str(getattr(tok, "content", tok))
        if getattr(tok, "special", False) and any(
            k in content.lower() for k in ("end", "eot", "eos", "</s>")
        ):
            names.add(content)
    return sorted(names, key=len, reverse=True)


def _assistant_spans(tokenizer, messages: list[dict], text: str, *, first: int = 0) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of `text` to train: each assistant content + its end-of-turn token."""
    ends = _end_of_turn_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant" or k < first:
            continue
        start = cursor
        if k > 0:  # skip the whole prompt so far, when the template has the prefix property
            for gen in (True, False):
                prefix = chat_text(tokenizer, messages[:k], add_generation_prompt=gen)
                if text.startswith(prefix):
                    start = max(start, len(prefix))
                    break
        content = msg["content"]
        pos = text.find(content, start) if content else -1
        if pos < 0 and content.strip():  # some templates trim the content
            content = content.strip()
            pos = text.find(content, start)
        if pos < 0:
            raise UserError(
                f"the chat template rewrites assistant turn {k}, so its tokens cannot be located for the loss "
                "mask; use a tokenizer whose template copies message content verbatim"
            )
        end = pos + len(content)
        for tok in ends:
            if text.startswith(tok, end):
                end += len(tok)
                break
        spans.append((pos, end))
        cursor = end
    return spans


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a mask that is 1 for tokens starting inside a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
        return ids, mask
    ids, mask, at = [], [], 0  # slow tokenizers have no offsets: encode the pieces between span edges
    for s, e in [*spans, (len(text), len(text))]:
        for piece, m in ((text[at:s], 0), (text[s:e], 1)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                mask += [m] * len(piece_ids)
        at = e
    return ids, mask
