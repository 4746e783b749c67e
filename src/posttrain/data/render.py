"""Render a normalised row into token ids and a loss mask: the single source of truth for masking.

`render_sft` returns ``Rendered(input_ids, loss_mask, truncated)``. ``loss_mask[t] == 1`` means token ``t`` is a
training target; the trainer shifts (the logits at ``t - 1`` predict token ``t``), so ``loss_mask[0]`` is never
used as a target.

How the mask is found (``train_on="completion"``): the conversation is rendered with the tokenizer's own chat
template, once in full and once per assistant turn up to that turn with the generation prompt
(``messages[:k]`` + ``add_generation_prompt=True``). A turn trains what the model must generate for it:

- from the end of that generation prompt, when it is a prefix of the full text (the prefix property: ChatML,
  Llama 2 and 3, Gemma, Phi-3, ...), so the space Llama 2 and Mistral write after ``[/INST]`` is trained and
  a prompt that happens to contain the same words never is (a template that ignores
  ``add_generation_prompt`` yet writes a role header gets that header trained: the model must write it then).
  Without the prefix property (Mistral v0.3 moves the system prompt into the last user turn) the content is
  searched for after the previous user turn's content, and the whitespace just before it is trained unless it
  ends the assistant header the generation prompt adds;
- through the content (found verbatim, or stripped for templates that trim it);
- through the end-of-turn token: the first special token the template writes after the content, past any
  whitespace between them (Llama 2's ``' ' + '</s>'``). That is ``<|im_end|>`` for ChatML (Qwen, SmolLM),
  ``</s>`` for Llama 2 and Mistral, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``<|end|>`` for
  Phi-3: read off the text, never guessed from the EOS token, which for Llama 3 base (``<|end_of_text|>``),
  Gemma (``<eos>``) and Phi-3 (``<|endoftext|>``) is not the token that ends a turn. The model must learn to
  stop.

Nothing after the end-of-turn token (the newline after ``<|im_end|>``, the next header, Phi-3's closing EOS),
no role header and no system or user text is trained. Characters map to tokens through the fast tokenizer's
offsets on the full text (so ids equal tokenizing the whole conversation); a token is trained when any of its
characters is (a SentencePiece ``▁four`` whose offsets start at the template's space). A slow tokenizer is
encoded piece by piece instead. Every assistant turn counts, except the turns of a prompt/completion row's
prompt (``row["n_prompt"]``). `tests/unit/test_chat_templates.py` holds the golden masks per family.

The mask does not depend on the pad token: padding is added later (`collate.py`), by length, so an
end-of-turn token equal to the pad id keeps its loss.

With ``train_on="all"`` every token counts; a plain ``text`` row always trains every token (and gets the EOS
token appended). A tokenizer with no chat template uses `FALLBACK_CHAT_TEMPLATE`: ``User: ...`` /
``Assistant: ...`` lines, each assistant turn ending with the EOS token, after the BOS token when the tokenizer
puts one before plain text (Llama 2, Mistral and Gemma base models saw it before every pretraining document); every
prompt posttrain renders (training, sampling, `generate`, `evaluate`) goes through the same `chat_text`, so a base
model is trained and evaluated on one format. Its generation prompt ends at ``Assistant:``, and the space after it
is the answer's first character: merge-based tokenizers join that space to the answer's first word (``Ġfour``,
``▁four``), so a prompt ending in the space would end in a token the model never saw there; the decoded answer
loses that one space again (`answer_scaffold`).

A template that writes today's date (Llama 3.1-3.3 put ``Today Date: ...`` in the system block: a `date_string`
variable, or `strftime_now`) gets the fixed `TEMPLATE_DATE` instead, so the same row renders to the same tokens on
any day: a run resumed the next day, or evaluated later, sees the text it trained on.

This module does not pad or batch (see `collate.py`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from posttrain.data.schema import normalise_row, places, problem_at
from posttrain.errors import ConfigError, DataError, Problem, UserError

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + (eos_token or '') + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FALLBACK_SCAFFOLD = " "
"""What `FALLBACK_CHAT_TEMPLATE` writes between its generation prompt and an answer's content."""


@dataclass
class Rendered:
    """One example as token ids; ``loss_mask[t] == 1`` when token ``t`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


TEMPLATE_DATE = datetime.datetime(2024, 7, 26)
"""The day a chat template that writes today's date is given (Llama 3.1's own default `date_string`)."""


_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


@functools.lru_cache(maxsize=8)
def fixed_date_template(template: str) -> str:
    """`template` with each call of transformers' `strftime_now(FORMAT)` replaced by `TEMPLATE_DATE` in that
    format, as a string literal (a render's variables are passed as plain data, so a function cannot stand in).

    >>> fixed_date_template("Today Date: {{ strftime_now('%d %b %Y') }}")
    "Today Date: {{ '26 Jul 2024' }}"
    """
    return _STRFTIME_NOW.sub(lambda m: repr(TEMPLATE_DATE.strftime(m.group(2))), template)


def chat_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (or the fallback when it has none), with
    the template's date fixed at `TEMPLATE_DATE` (its `date_string` variable, and its `strftime_now` calls)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        template = ("{{ bos_token }}" if _adds_bos(tokenizer) else "") + FALLBACK_CHAT_TEMPLATE
    elif isinstance(template, str) and "strftime_now" in template:
        template = fixed_date_template(template)
    else:
        template = None  # the tokenizer's own (a dict of named templates included)
    kwargs = {} if template is None else {"chat_template": template}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        date_string=TEMPLATE_DATE.strftime("%d %b %Y"), **kwargs,
    )  # fmt: skip


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token before plain text (as the model saw every pretraining document).
    Found once per tokenizer, BOS and `add_bos_token` switch (Llama's tokenizers turn it off and on): `chat_text`
    asks on every render of a template-less tokenizer."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    key = (bos, getattr(tokenizer, "add_bos_token", None))
    try:
        known = _BOS.get(tokenizer)
        if known is None or known[0] != key:
            known = _BOS[tokenizer] = (key, _encodes_bos(tokenizer, bos))
    except TypeError:  # a tokenizer-like object that cannot be weakly referenced (or hashed): found each time
        return _encodes_bos(tokenizer, bos)
    return known[1]


_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ((BOS id, switch), whether it adds it)


def _encodes_bos(tokenizer, bos: int) -> bool:
    try:
        return tokenizer("x")["input_ids"][:1] == [bos]
    except Exception:  # a tokenizer-like object that cannot encode here: no BOS assumed
        return False


_SET_START, _SET_END = "{# posttrain: data.chat_template_kwargs #}", "{# end of data.chat_template_kwargs #}"
_PASSED = ("messages", "add_generation_prompt", "date_string")  # what `chat_text` gives every render itself


def set_template_variables(tokenizer, variables: Mapping[str, bool | int | float | str], *,
                           setting: str = "data.chat_template_kwargs") -> None:  # fmt: skip
    """Fix variables of the tokenizer's chat template (Qwen3's ``enable_thinking``) by writing them into the template
    as ``{% set NAME = VALUE %}`` statements: every render posttrain makes (training rows, sampled prompts,
    `generate`, evaluation) sees them, and so does the tokenizer saved with the model (checkpoints, ``final/``), in
    transformers or vLLM as here. An earlier call's statements (a model trained with the setting, trained or
    evaluated again) are kept for the names not given now and replaced for the others. Refused (`ConfigError`, before any model loads): a tokenizer with no chat template
    (posttrain's fallback reads no variable), a name no template of the tokenizer mentions (it would change
    nothing), and the names `chat_text` passes itself.

    >>> class Tok: chat_template = "{% if enable_thinking is false %}<think></think>{% endif %}{{ messages[0].content }}"
    >>> tok = Tok(); set_template_variables(tok, {"enable_thinking": False}); tok.chat_template.count("{% set ")
    1
    >>> set_template_variables(tok, {"enable_thinking": True}); "{% set enable_thinking = true %}" in tok.chat_template
    True
    >>> tok.chat_template.count("{% set ")
    1
    """
    if not variables:
        return
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            f"{setting}: the model's tokenizer has no chat template, so there is nothing for "
            f"{', '.join(variables)} to set (posttrain renders its rows with a fixed User:/Assistant: template, "
            "which reads no variable). Remove the setting, or use a model whose tokenizer has a chat template"
        )
    if passed := [name for name in variables if name in _PASSED]:
        raise ConfigError(f"{setting}: {', '.join(passed)} cannot be set: posttrain passes "
                          f"{', '.join(_PASSED)} to every render itself")  # fmt: skip
    if odd := [name for name in variables if not name.isidentifier() or name in _JINJA_WORDS]:
        raise ConfigError(f"{setting}: {', '.join(map(repr, odd))} cannot be a template variable's name (a name is "
                          "letters, digits and _, not starting with a digit, and not a word of the template language)")  # fmt: skip
    split = {k: _set_block(t) for k, t in (template.items() if isinstance(template, dict) else [(None, template)])}
    kept = next(iter(split.values()))[0]  # what an earlier call wrote (a trained model's tokenizer)
    named = {k: rest for k, (_, rest) in split.items()}
    read = set().union(*(_template_variables(t) for t in named.values()))
    unread = [n for n in variables if n not in read]
    if unread:
        raise ConfigError(
            f"{setting}: the model's chat template never mentions {', '.join(unread)}, so setting "
            f"{'it' if len(unread) == 1 else 'them'} would change nothing. Check the name against the template "
            "(tokenizer_config.json's or chat_template.jinja's variables)"
        )
    merged = {**kept, **variables}  # the values given win; the others a saved tokenizer has stay
    sets = "".join(f"{{% set {name} = {json.dumps(value, ensure_ascii=False)} %}}" for name, value in merged.items())
    # a newline after the statements, which transformers' trim_blocks drops: what the template starts with (a newline,
    # spaces before a block that lstrip_blocks takes off) stays at the start of a line, as it was
    named = {k: f"{_SET_START}{sets}{_SET_END}\n{t}" for k, t in named.items()}
    tokenizer.chat_template = named if isinstance(template, dict) else named[None]


_JINJA_WORDS = frozenset("true false none True False None TRUE FALSE NONE and or not in is if else".split())
"""The words Jinja reads as operators or constants wherever they stand; its other keywords can name a variable."""


def _template_variables(template: str) -> set[str]:
    """The variables a chat template reads from its render's arguments (Jinja's `meta.find_undeclared_variables`,
    parsed as transformers parses: loop controls and its `{% generation %}` blocks). A template Jinja cannot parse
    here: every word in it (a looser check, never a wrong refusal)."""
    import jinja2
    import jinja2.ext
    import jinja2.meta

    class Generation(jinja2.ext.Extension):  # transformers' block marking an assistant's tokens: its body is kept
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", Generation])
        return set(jinja2.meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:
        return set(re.findall(r"\w+", template))


_SET = re.compile(r"\{% set (\w+) = (.*?) %\}")


def _set_block(template: str) -> tuple[dict, str]:
    """(the values `set_template_variables` wrote into `template`, the template without them and the newline it
    added after them); ({}, `template`) when it wrote none.

    >>> _set_block('{# posttrain: data.chat_template_kwargs #}{% set a = false %}{% set b = "x" %}'
    ...            '{# end of data.chat_template_kwargs #}\\n{{ a }}')
    ({'a': False, 'b': 'x'}, '{{ a }}')
    """
    if not template.startswith(_SET_START) or (end := template.find(_SET_END)) < 0:
        return {}, template
    values = {name: json.loads(value) for name, value in _SET.findall(template[len(_SET_START) : end])}
    rest = template[end + len(_SET_END) :]
    return values, rest[1:] if rest.startswith("\n") else rest


_PROBE = ("Q7", "A9")  # a user turn and an answer no template rewrites, to see what a template wraps around content


def answer_scaffold(tokenizer) -> str:
    """What the chat template writes between the generation prompt and an answer's content in a finished turn,
    when that is more than whitespace: Qwen3's empty ``<think>\\n\\n</think>\\n\\n``. Training teaches the model to
    write it, so a sampled answer starts with it; `strip_scaffold` takes it off the text rewards and verifiers
    see. "" for the templates that write the content right after the generation prompt. Found once per tokenizer
    and template (every `generate` call and every rollout asks)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return FALLBACK_SCAFFOLD
    key = repr(template)  # a str, or a dict of named templates
    try:
        known = _SCAFFOLDS.get(tokenizer)
        if known is None or known[0] != key:
            known = _SCAFFOLDS[tokenizer] = (key, _find_scaffold(tokenizer))
    except TypeError:  # a tokenizer-like object that cannot be weakly referenced (or hashed): found each time
        return _find_scaffold(tokenizer)
    return known[1]


_SCAFFOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its template, its scaffold)


def _find_scaffold(tokenizer) -> str:
    user, answer = {"role": "user", "content": _PROBE[0]}, {"role": "assistant", "content": _PROBE[1]}
    try:
        gen = chat_text(tokenizer, [user], add_generation_prompt=True)
        full = chat_text(tokenizer, [user, answer])
    except Exception:  # a template that refuses the probe (e.g. requires a system turn): no scaffold known
        return ""
    at = full.find(_PROBE[1], len(gen)) if full.startswith(gen) else -1
    between = full[len(gen) : at] if at >= 0 else ""
    return between if between.strip() else ""


def last_turn_scaffold(tokenizer) -> str:
    """The scaffold (`answer_scaffold`) when the template writes it before the last answer of a conversation only
    (Qwen3 drops the think blocks of turns before the last user message), else "". Rows that train earlier turns
    then teach the model to answer both with and without it (`render_dataset` says so)."""
    scaffold = answer_scaffold(tokenizer)
    if not scaffold:
        return ""
    turns = [{"role": "user", "content": _PROBE[0]}, {"role": "assistant", "content": _PROBE[1]},
             {"role": "user", "content": "Q8"}, {"role": "assistant", "content": "A8"}]  # fmt: skip
    try:
        full = chat_text(tokenizer, turns)
    except Exception:  # a template that refuses the probe: nothing known
        return ""
    at = full.find(_PROBE[1])
    return scaffold if at >= 0 and not full[:at].rstrip().endswith(scaffold.strip()) else ""


def strip_scaffold(text: str, scaffold: str) -> str:
    """`text` without a leading `scaffold` (`answer_scaffold`), whitespace around it ignored; a scaffold that is
    only whitespace (the fallback template's space) is taken off once, as written.

    >>> strip_scaffold("<think>\\n\\n</think>\\n\\n4", "<think>\\n\\n</think>\\n\\n"), strip_scaffold("4", "<think>")
    ('4', '4')
    >>> strip_scaffold(" four", " "), strip_scaffold("  indented", " "), strip_scaffold("four", " ")
    ('four', ' indented', 'four')
    """
    if scaffold and not scaffold.strip():
        return text[len(scaffold) :] if text.startswith(scaffold) else text
    core = scaffold.strip()
    if core and text.lstrip().startswith(core):
        return text.lstrip()[len(core) :].lstrip()
    return text


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
        raise DataError([problem_at(source, row, "max_length", (
            f"the prompt alone is {first} tokens, >= max_length {max_length}: no completion token would be "
            "trained; raise data.max_length or shorten this row")
        )])  # fmt: skip
    ids, mask = ids[:max_length], mask[:max_length]
    return Rendered(ids, mask, truncated)


_MARKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> the template's markers
_MARKER_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def template_markers(tokenizer) -> tuple[str, ...]:
    """The special tokens that open or end a turn, longest first: those the chat template writes around the
    messages (ChatML's ``<|im_start|>`` and ``<|im_end|>``, Llama 3's ``<|start_header_id|>`` ..., Phi-3's
    ``<|system|>``, Llama 2's ``<s>`` and ``</s>``), probed with and without a system message, and the EOS token
    (Llama 3 base's ``<|end_of_text|>``, Gemma's ``<eos>``), which in a trained answer teaches the model to stop
    there. Each becomes that one token wherever it stands in a text. Other special tokens (SmolLM2's StarCoder names
    such as ``<filename>``) are let through: they tokenize to their own ids, as the tokenizer makes them of any
    text, but open or end no turn.

    >>> from posttrain.testing import tiny_tokenizer
    >>> template_markers(tiny_tokenizer())
    ('<|im_start|>', '<|im_end|>')
    """
    try:
        return _MARKERS[tokenizer]
    except (KeyError, TypeError):
        pass
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
    found |= {str(t.content) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
              if getattr(t, "special", False)}  # fmt: skip
    text = ""
    for messages in (_MARKER_PROBE, _MARKER_PROBE[1:]):  # a template may refuse a system message
        try:
            text += chat_text(tokenizer, messages) + chat_text(tokenizer, messages[:-1], add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (the template's own refusal: the other probe still tells)
            continue
    eos = str(getattr(tokenizer, "eos_token", None) or "")
    out = tuple(sorted((t for t in found if t.strip() and (t in text or t == eos)), key=lambda t: (-len(t), t)))
    try:
        _MARKERS[tokenizer] = out
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return out


MARKER_WHY = ("a token that opens or ends a turn (a marker the chat template writes, or the EOS): it would be read "
              "as that token, where the text says, not as characters (text already in chat-template form is wrapped in "
              "the template again); give each message's plain text")  # fmt: skip


def _row_messages(row: dict) -> list[tuple[str, dict]]:
    """(field, message) for every message of a normalised row of any kind, the field as its problem names it."""
    if "messages" in row:
        n = row.get("n_prompt")
        return [(f"messages[{k}].content" if n is None else ("prompt" if k < n else "completion"), m)
                for k, m in enumerate(row["messages"])]  # fmt: skip
    out = []
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        out += [(key, m) for m in ([{"content": value}] if isinstance(value, str) else value or [])]
    return out


def marker_problems(tokenizer, rows, *, source: str) -> list[Problem]:
    """One problem per message of `rows` (normalised, any kind) that holds one of the chat template's markers
    (`template_markers`), located as the row's load-time problems are (`schema.problem_at`). A `text` row is not
    checked: its text is taken as written, markers and all.

    >>> from posttrain.testing import tiny_tokenizer
    >>> from posttrain.data.schema import Row
    >>> rows = [Row({"prompt": [{"role": "user", "content": "hi<|im_end|>"}]}, line=3), {"prompt": "Usage: <filename>"}]
    >>> [str(p).split(", a token")[0] for p in marker_problems(tiny_tokenizer(), rows, source="d.jsonl")]
    ["d.jsonl:3: prompt: holds '<|im_end|>'"]
    """
    markers = template_markers(tokenizer)
    problems = []
    for row in rows:
        for field, m in _row_messages(row):
            hit = next((t for t in markers if t in m["content"]), None)
            if hit is not None:
                problems.append(problem_at(source, row, field, f"holds {hit!r}, {MARKER_WHY}"))
    return problems


def warn_no_stop(tokenizer, rows, *, source: str) -> None:
    """Warn when the rows' answers go through a chat template that writes no token after an answer (an Alpaca-
    style text template, or no EOS at all): nothing teaches the model to stop, and sampling then runs every
    answer to `max_new_tokens`. Plain `text` rows get the EOS appended and are not concerned."""
    if all("text" in row and "messages" not in row for row in rows) or end_of_turn_ids(tokenizer):
        return
    warnings.warn(
        f"{source}: the chat template writes no token after an assistant's answer that the tokenizer knows as an "
        f"added or EOS token (EOS: {tokenizer.eos_token!r}), so the trained answers end with nothing that teaches "
        "the model to stop, and generation runs each answer to max_new_tokens. Give the model folder's "
        "tokenizer_config.json a chat_template that closes each assistant turn with the EOS token (or an "
        "end-of-turn token added to the tokenizer)",
        stacklevel=2,
    )


def refuse_markers(tokenizer, rows, *, source: str) -> None:
    """`marker_problems` as one `DataError` (a header of its own: no length is at fault), before any row renders."""
    if problems := marker_problems(tokenizer, rows, source=source):
        n = len({(p.line, p.row) for p in problems})
        raise DataError(problems, header=f"{source}: {n} row(s) hold tokens that open or end a turn")


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
    refuse_markers(tokenizer, rows, source=source)
    warn_no_stop(tokenizer, rows, source=source)
    out = render_all(
        lambda row: render_sft(tokenizer, row, max_length=max_length, train_on=train_on, source=source),
        rows, header=f"{source}: {{n}} row(s) do not fit max_length={max_length}",
    )  # fmt: skip
    at, noun = places(rows)
    truncated = [at[i] for i, r in enumerate(out) if r.truncated]
    earlier = [at[i] for i, row in enumerate(rows) if _trains_earlier_turns(row)]
    if earlier and (scaffold := last_turn_scaffold(tokenizer)):
        warnings.warn(
            f"{source}: {len(earlier)} of {len(out)} rows train assistant turns before their last "
            f"({lines_text(earlier, noun=noun)}), which this chat template writes without the {scaffold.strip()!r} it writes "
            "before a conversation's last answer (as Qwen3's drops earlier turns' reasoning): the model learns to "
            "answer both with and without it. To train each row's last answer only, give those rows as `prompt` "
            "(the earlier turns, as messages) and `completion`",
            stacklevel=2,
        )  # fmt: skip
    if truncated:
        warnings.warn(
            f"{source}: {len(truncated)} of {len(out)} rows are longer than max_length={max_length} tokens and were "
            f"truncated (their ends are not trained: {lines_text(truncated, noun=noun)}); raise data.max_length to keep them "
            "whole",
            stacklevel=2,
        )
    return out, len(truncated)


def _trains_earlier_turns(row: dict) -> bool:
    """Whether a normalised row trains an assistant turn before its last one (a chat row; a prompt/completion row
    trains only its completion)."""
    messages = row.get("messages") or []
    return sum(m.get("role") == "assistant" for m in messages[row.get("n_prompt", 0) :]) > 1


def lines_text(lines: list[int], shown: int = 5, noun: str = "line") -> str:
    """The file lines of some rows, for a note: the first `shown`, then how many more (`noun`: ``"row"`` where
    they are row numbers, `schema.places`).

    >>> lines_text([4]), lines_text([3, 9, 12]), lines_text(list(range(1, 9)), shown=3), lines_text([2, 3], noun="row")
    ('line 4', 'lines 3, 9 and 12', 'lines 1, 2, 3 and 5 more', 'rows 2 and 3')
    """
    if len(lines) == 1:
        return f"{noun} {lines[0]}"
    if len(lines) <= shown:
        return f"{noun}s {', '.join(map(str, lines[:-1]))} and {lines[-1]}"
    return f"{noun}s {', '.join(map(str, lines[:shown]))} and {len(lines) - shown} more"


def _end_of_turn_tokens(tokenizer) -> list[str]:
    """Tokens that can close an assistant turn: EOS and every added token but BOS, longest first.

    No names are guessed: which one closes a turn is read off the rendered text (`_assistant_spans`), so a
    tokenizer whose EOS is not its end-of-turn marker (Llama 3 ``<|end_of_text|>`` vs ``<|eot_id|>``, Gemma
    ``<eos>`` vs ``<end_of_turn>``, Phi-3 ``<|endoftext|>`` vs ``<|end|>``) trains the marker its template
    writes. Added tokens that are not marked special count too: community ChatML fine-tunes add ``<|im_end|>``
    with ``tokenizer.add_tokens``, and their template still closes every turn with it. Longest first, so
    ``<|end|>`` never cuts ``<|endoftext|>`` short.
    """
    names = {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    names.discard(tokenizer.bos_token)  # opens a sequence, never closes a turn (unless it is also EOS)
    names.update(t for t in (tokenizer.eos_token,) if t)
    return sorted(names, key=len, reverse=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template writes to close an assistant turn, as ids (empty if it writes none).

    Read off a rendered probe conversation the way `_assistant_spans` finds it, so it is the token training
    teaches the model to stop with: sampling must stop on it too, also when it is not the tokenizer's EOS
    (Llama 3 ``<|eot_id|>`` with EOS ``<|end_of_text|>``, Gemma ``<end_of_turn>``, Phi-3 ``<|end|>``).

    >>> from posttrain.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> tok.convert_ids_to_tokens(end_of_turn_ids(tok))
    ['<|im_end|>']
    """
    probe = "Probe answer 42."
    try:
        text = chat_text(tokenizer, [{"role": "user", "content": "Probe question?"},
                                     {"role": "assistant", "content": probe}])  # fmt: skip
    except Exception:  # a template that refuses this conversation (e.g. one that demands a system turn)
        return []
    pos, end = _find_content(text, probe, 0)
    if pos < 0:
        return []
    stop = _turn_end(text, end, _end_of_turn_tokens(tokenizer))
    marker = text[end:stop].strip()
    if not marker:
        return []
    token_id = tokenizer.convert_tokens_to_ids(marker)
    return [token_id] if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else []


def _find_content(text: str, content: str, start: int) -> tuple[int, int]:
    """``[pos, end)`` of `content` in `text` at or after `start`, verbatim or else stripped (templates that trim
    it: Llama 2, Llama 3, Mistral, Gemma); ``(-1, -1)`` when it is not there or is only whitespace."""
    for c in (content, content.strip()):
        pos = text.find(c, start) if c.strip() else -1
        if pos >= 0:
            return pos, pos + len(c)
    return -1, -1


def _assistant_spans(tokenizer, messages: list[dict], text: str, *, first: int = 0) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of `text` to train: for each assistant turn from `first` on, what the
    model must generate, from the end of its prompt (`_turn_start`) through its end-of-turn token (`_turn_end`).
    No system or user text is ever in a span: each message is searched for after the one before it."""
    ends = _end_of_turn_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0  # the end of the last message found: every later message is searched for after it
    for k, msg in enumerate(messages):
        if msg["role"] == "system":  # templates move it (Llama 2: into the first user turn, Mistral: the last)
            continue
        if msg["role"] != "assistant" or k < first:  # a prompt turn: only move the cursor past it
            pos, end = _find_content(text, msg["content"], cursor)
            cursor = end if pos >= 0 else cursor
            continue
        start, end = _turn_start(tokenizer, messages, k, text, cursor)
        end = _turn_end(text, end, ends)
        spans.append((start, end))
        cursor = end
    return spans


def _turn_start(tokenizer, messages: list[dict], k: int, text: str, cursor: int) -> tuple[int, int]:
    """Where the model's part of assistant turn `k` starts in `text`, and where its content ends.

    With the prefix property (``messages[:k]`` + the generation prompt is a prefix of `text`: ChatML, Llama 2
    and 3, Gemma, Phi-3), everything after that prompt is the model's: the content and whatever the template
    writes before it (Llama 2's and Mistral's space after ``[/INST]``), and never a word of the prompt.
    Without it (Mistral v0.3 moves the system prompt into the last user turn), the content after `cursor`
    and the whitespace just before it, unless that whitespace ends the assistant header the generation prompt
    would write (``<|im_start|>assistant\n``).
    """
    gen = chat_text(tokenizer, messages[:k], add_generation_prompt=True) if k else None
    prefix_property = gen is not None and text.startswith(gen) and len(gen) >= cursor
    header = None  # unknown for a conversation that opens with the assistant: no whitespace is taken then
    if prefix_property:
        cursor = len(gen)
    elif gen is not None:
        bare = chat_text(tokenizer, messages[:k])
        header = gen[len(os.path.commonprefix([gen, bare])) :]  # what the generation prompt adds
        if text.startswith(bare) and len(bare) >= cursor:
            cursor = len(bare)
    pos, end = _find_content(text, messages[k]["content"], cursor)
    if pos >= 0 and header and header.strip() and not text[cursor:pos].strip().endswith(header.strip()):
        _note_prompt_gap(tokenizer, header, text[cursor:pos])
    if pos < 0:
        raise UserError(
            f"the chat template rewrites assistant turn {k}, so its tokens cannot be located for the loss "
            "mask; use a tokenizer whose template copies message content verbatim"
        )
    if prefix_property:
        return cursor, end
    while header is not None and pos > cursor and text[pos - 1].isspace() and not (
        header and text.endswith(header, 0, pos)
    ):
        pos -= 1
    return pos, end


_GAP_NOTED: set[str] = set()


def _note_prompt_gap(tokenizer, header: str, written: str) -> None:
    """Warn, once per template, that its generation prompt ends with text its finished turns do not write before
    the answer (DeepSeek-R1's distilled models open the answer with ``<think>\\n``): training teaches the answer
    after `written`, sampling prompts end with `header`."""
    key = str(getattr(tokenizer, "chat_template", ""))
    if key in _GAP_NOTED:
        return
    _GAP_NOTED.add(key)
    warnings.warn(
        f"the chat template's generation prompt ends with {header.strip()!r}, which its rendering of a finished "
        f"conversation does not write before the answer (it writes {written.strip()!r}): training teaches the "
        "answer after the latter, while sampling and evaluation prompts end with the former. Check the template, "
        "or write that text at the start of the responses",
        stacklevel=2,
    )


def _turn_end(text: str, end: int, ends: list[str]) -> int:
    """The end of an assistant turn whose content ends at `end`: past the first special token the template
    writes next (whitespace between them, Llama 2's ``' ' + '</s>'``, included): the end-of-turn token the
    model must learn to stop with. Just the content when no special token follows it."""
    gap = end
    while gap < len(text) and text[gap].isspace():
        gap += 1
    marker = next((t for t in ends if text.startswith(t, gap)), None)
    return end if marker is None else gap + len(marker)


def _tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a mask that is 1 for tokens holding a character of a span.

    Overlap, not "starts inside": a token that joins the prompt's last character to the content's first (a
    SentencePiece ``▁four`` after ``Assistant:``) is the model's first generated token and must be trained.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
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
