"""A data file's own column names: `data.columns` renames them to the fields posttrain reads, and
`data.ignore_columns` leaves columns out (`--column OURS=THEIRS` and `--ignore-column NAME` on the command line);
inside its messages, `data.message_keys` renames their keys and `data.roles` their roles (ShareGPT's
``{"from": "human", "value": ...}``: `--message-key role=from --message-key content=value --role user=human
--role assistant=gpt`); `data.turns` reads a transcript string as its turns (Anthropic HH's ``"\\n\\nHuman: ...
\\n\\nAssistant: ..."``: `--turn user='\\n\\nHuman:' --turn assistant='\\n\\nAssistant:'`).

Most files people have were not written for posttrain: ``question``/``answer`` where an SFT row reads
``prompt``/``completion``, or a ``source`` column that an SFT or preference row refuses as unknown. A `Columns`
maps each row before it is checked, so every check, error and count stays the same; problems are reported under the
file's own column names (`Columns.file_field`), so ``FILE:LINE: question: must be a string`` points at what the
user can see in the file. A field may also read several text columns joined, in order, by a blank line (an Alpaca
row's ``{prompt: [instruction, input]}``; an empty one is left out); nothing else is ever joined.

Nothing here is silent: a column, message key or role named in a setting that no row of the training file has is
refused (`Columns.unused`; a held-out file read with the same settings may lack one), and a row that holds both a renamed column and a column already called by the field it is
renamed to is refused (which one to read would be a guess).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from posttrain.config_rules import show


@dataclass(frozen=True)
class Columns:
    """`rename`: posttrain's field -> the file's column (``{"prompt": "question"}``); `ignore`: the file's columns
    to leave out. `cli`: given as ``--column``/``--ignore-column`` (named so in messages), not by a run's config.

    >>> c = Columns({"prompt": "question", "completion": "answer"}, ("source",))
    >>> c.apply({"question": "2+2?", "answer": "4", "source": "gsm8k"})
    ({'prompt': '2+2?', 'completion': '4'}, [])
    >>> c.file_field("prompt[0].content"), c.file_field("id"), c.file_field(None)
    ('question[0].content', 'id', None)
    """

    rename: Mapping[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    cli: bool = False
    message_keys: Mapping[str, str] = field(default_factory=dict)
    """``role``/``content`` -> the key a message of the file holds it under (ShareGPT: ``from``, ``value``)."""
    roles: Mapping[str, str] = field(default_factory=dict)
    """``system``/``user``/``assistant`` -> the file's name for that role (ShareGPT: ``human``, ``gpt``)."""
    turns: Mapping[str, str] = field(default_factory=dict)
    """``system``/``user``/``assistant`` -> the text that opens that role's turn in a transcript string (Anthropic HH:
    ``"\\n\\nHuman:"``, ``"\\n\\nAssistant:"``). A string in a message field (messages, prompt, completion, chosen,
    rejected) that holds one reads as its turns (`split_turns`); a prompt's last turn, an assistant's with no text
    (HH's ``"...\\n\\nAssistant:"``, the cue to answer), is left out. A string with none stays one message."""
    strict: bool = True
    """Refuse a name in the settings that no row of the file has (`unused`); off for a run's `data.eval`, which the
    same settings read: a column only the training file has is no mistake there (the training file is checked)."""

    def __bool__(self) -> bool:
        return bool(self.rename or self.ignore or self.message_keys or self.roles or self.turns)

    @property
    def names_messages(self) -> bool:
        """Whether a setting names what messages hold (a key, a role, a ``COLUMN.KEY`` to leave out)."""
        return bool(self.message_keys or self.roles or any("." in name for name in self.ignore))

    @functools.cached_property
    def _file_roles(self) -> dict[str, str]:
        """The file's role name -> posttrain's (`roles` turned round), made once, read for every message."""
        return {theirs: ours for ours, theirs in self.roles.items()}

    @property
    def message_source(self) -> tuple[str, str]:
        """The two message settings' names as the user gave them."""
        return ("--message-key", "--role") if self.cli else ("data.message_keys", "data.roles")

    @property
    def turn_source(self) -> str:
        """The transcript setting's name as the user gave it."""
        return "--turn" if self.cli else "data.turns"

    @property
    def source(self) -> tuple[str, str]:
        """The two settings' names as the user gave them."""
        return ("--column", "--ignore-column") if self.cli else ("data.columns", "data.ignore_columns")

    def leave_out(self, names: list[str]) -> str:
        """How to leave `names` out, as the user would write it.

        >>> Columns().leave_out(["a", "b"]), Columns(cli=True).leave_out(["a", "b"])
        ('data.ignore_columns: [a, b]', '--ignore-column a --ignore-column b')
        """
        return " ".join(f"--ignore-column {n}" for n in names) if self.cli else f"data.ignore_columns: {show(names)}"

    def apply(self, data: dict) -> tuple[dict, list[tuple[str, str]]]:
        """The row with posttrain's field names, and (field, message) for each clash: a column that is already
        called what another column is renamed to (unless that column is itself renamed or ignored), or a column
        to join that holds no text.

        >>> Columns({"prompt": ["instruction", "input"], "completion": "output"}).apply(
        ...     {"instruction": "Add.", "input": "2 and 2", "output": "4"})
        ({'prompt': 'Add.\\n\\n2 and 2', 'completion': '4'}, [])
        >>> Columns({"prompt": ["instruction", "input"]}).apply({"instruction": "Say hi.", "input": ""})[0]
        {'prompt': 'Say hi.'}
        """
        renamed_from = {c for theirs in self.rename.values() for c in sources(theirs)}
        out: dict = {}
        clashes: list[tuple[str, str]] = []
        data = self._without_message_keys(data)
        for key, value in data.items():
            if key in self.ignore or key in renamed_from:
                continue
            if key in self.rename and any(c in data for c in sources(self.rename[key])):
                clashes.append((key, f"this row has both {key} and {shown(self.rename[key])}, which {self.source[0]} "
                                     f"reads as {key}: leave one out ({self.leave_out([key])})"))  # fmt: skip
                continue
            out[key] = value
        for ours, theirs in self.rename.items():
            if isinstance(theirs, str):
                if theirs in data:
                    out[ours] = data[theirs]
                continue
            given = [(c, data[c]) for c in theirs if data.get(c) is not None]  # a null is an absent column
            if not given:
                continue
            if bad := [c for c, v in given if not isinstance(v, str)]:
                clashes.append((bad[0], f"{self.source[0]} joins it into {ours}, and it holds no text"))
                continue
            out[ours] = "\n\n".join(v for _, v in given if v.strip())  # a blank one is left out
        if self.message_keys or self.roles:
            for name in MESSAGE_FIELDS:
                if isinstance(out.get(name), list):
                    out[name] = [self._message(m) for m in out[name]]
        if self.turns:
            for name in MESSAGE_FIELDS:
                if not isinstance(out.get(name), str):
                    continue
                messages, problem = split_turns(out[name], self.turns)
                if messages and all(m["content"].startswith(":") for m in messages if m["content"]):
                    problem = ("every turn's text begins with ':', so the markers lack their colon (HH's are "
                               '"\\n\\nHuman:" and "\\n\\nAssistant:")')  # fmt: skip
                if problem:
                    clashes.append((self.file_field(name), f"{problem} ({self.turn_source})"))
                elif messages is not None:
                    if name == "prompt" and len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
                        messages.pop()  # the cue to answer, not a turn
                    out[name] = messages
        return out, clashes

    def turn_roles(self, data: dict) -> set[str]:
        """The roles whose marker (`turns`) a text column of the row `data` holds, as the check that each marker is
        somewhere in the file reads them."""
        if not self.turns:
            return set()
        texts = [v for v in data.values() if isinstance(v, str)]
        return {role for t in texts for _, _, role in _turn_marks(t, self.turns)}

    def _without_message_keys(self, data: dict) -> dict:
        """`data` without the message keys `ignore` names as ``COLUMN.KEY`` (ShareGPT's per-message ``weight``):
        dropped from every message of that column."""
        nested = [name.split(".", 1) for name in self.ignore if "." in name and name not in data]
        if not nested:
            return data
        data = dict(data)
        for column, key in nested:
            if isinstance(data.get(column), list):
                data[column] = [{k: v for k, v in m.items() if k != key} if isinstance(m, dict) else m
                                for m in data[column]]  # fmt: skip
        return data

    def _message(self, message):
        """One message with posttrain's keys and role names (anything but a dict is left for the checks)."""
        if not isinstance(message, dict):
            return message
        moved = self.message_keys.values()
        out = {k: v for k, v in message.items() if k not in moved or k in self.message_keys}
        for ours, theirs in self.message_keys.items():
            if theirs in message:
                out[ours] = message[theirs]
        role = self._file_roles.get(out.get("role"))
        if role is not None:
            out["role"] = role
        return out

    def file_field(self, name: str | None) -> str | None:
        """A problem's field (posttrain's name, e.g. ``prompt[1].content``) as the file calls it."""
        if not name:
            return name
        head, sep, rest = _split(name)
        index, dot, key = rest.partition("].")
        if sep == "[" and dot and key in self.message_keys:  # a message's key: messages[1].role -> [1].from
            rest = f"{index}].{self.message_keys[key]}"
        return (shown(self.rename[head]) if head in self.rename else head) + sep + rest

    def unused(self, seen: Iterable[str], keys: Iterable[str] = (), roles: Iterable[str] = (),
               turns: Iterable[str] = ()) -> list[str]:  # fmt: skip
        """Messages for each column named in either setting that no row had (`seen`: every column of the file), for
        each message key or role named that no message had (`keys`, `roles`: `message_parts` of every row), and for
        each turn marker no text held (`turns`: the roles of `turn_roles` of every row)."""
        seen, keys, roles, turns = set(seen), set(keys), set(roles), set(turns)
        out = [f"{self.source[0]} reads {ours} from column {c!r}, which no row has"
               for ours, theirs in self.rename.items() for c in sources(theirs) if c not in seen]  # fmt: skip
        out += [f"{self.source[1]} names column {name!r}, which no row has" for name in self.ignore
                if name not in seen and not ("." in name and name.split(".", 1)[0] in seen
                                             and name.split(".", 1)[1] in keys)]  # fmt: skip
        if out and seen:
            out[-1] += f" (its columns: {', '.join(sorted(seen))})"
        said = len(out)
        out += [f"{self.message_source[0]} reads {ours} from the key {theirs!r}, which no message has"
                for ours, theirs in self.message_keys.items() if theirs not in keys]  # fmt: skip
        if len(out) > said:
            out[-1] += f" (their keys: {', '.join(sorted(keys)) or 'none'})"
        said = len(out)
        out += [f"{self.message_source[1]} reads {ours} from the role {theirs!r}, which no message has"
                for ours, theirs in self.roles.items() if theirs not in roles]  # fmt: skip
        if len(out) > said:
            out[-1] += f" (their roles: {', '.join(sorted(roles)) or 'none'})"
        out += [f"{self.turn_source} opens {role}'s turns with {marker!r}, which no text of the file holds"
                for role, marker in self.turns.items() if role not in turns]  # fmt: skip
        return out

    def message_parts(self, data: dict) -> tuple[set[str], set[str]]:
        """The keys and the role names (under the file's role key) of every message in a row's lists."""
        keys: set[str] = set()
        roles: set[str] = set()
        # the file's role key: as set, else the first of the names layouts use for it (for the hint's guess)
        role_keys = (self.message_keys["role"],) if "role" in self.message_keys else ("role", *_MESSAGE_KEYS["role"])
        for value in data.values():
            if isinstance(value, list):
                for m in value:
                    if isinstance(m, dict):
                        keys.update(m)
                        role = next((m[k] for k in role_keys if k in m), None)
                        if isinstance(role, str):
                            roles.add(role)
        return keys, roles


def split_turns(text: str, turns: Mapping[str, str]) -> tuple[list[dict] | None, str]:
    """`text` cut into messages where a marker of `turns` (role -> marker) opens a turn: (messages, ""), (None, "")
    when it holds no marker, (None, problem) when text comes before the first. A marker matches as written, except
    that at the very start of `text` its leading whitespace may be missing; a turn's text is stripped.

    >>> hh = {"user": "\\n\\nHuman:", "assistant": "\\n\\nAssistant:"}
    >>> split_turns("\\n\\nHuman: 2+2?\\n\\nAssistant: 4\\n\\nHuman: and 3+3?\\n\\nAssistant:", hh)[0]
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'and 3+3?'}, {'role': 'assistant', 'content': ''}]
    >>> split_turns("Human: hi\\nthere\\n\\nAssistant: hello", hh)[0]
    [{'role': 'user', 'content': 'hi\\nthere'}, {'role': 'assistant', 'content': 'hello'}]
    >>> split_turns("Just an answer.", hh), split_turns("Sure.\\n\\nHuman: thanks", hh)[1]
    ((None, ''), "text comes before the first turn's marker ('Sure.')")
    """
    found = _turn_marks(text, turns)
    if not found:
        return None, ""
    if before := text[: found[0][0]].strip():
        return None, f"text comes before the first turn's marker ({before[:40]!r})"
    ends = [s for s, _, _ in found[1:]] + [len(text)]
    return [{"role": role, "content": text[end:stop].strip()} for (_, end, role), stop in zip(found, ends)], ""


# Transcript markers layouts use (a suggestion in an error message; never applied): Anthropic HH, OpenAssistant
# Guanaco, Vicuna, and plain User/Assistant lines.
_TURNS = (
    {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"},
    {"user": "### Human:", "assistant": "### Assistant:"},
    {"user": "USER:", "assistant": "ASSISTANT:"},
    {"user": "User:", "assistant": "Assistant:"},
)


def guess_turns(texts: Iterable[str]) -> dict[str, str]:
    """The `turns` of a common transcript layout that every one of `texts` reads as (a user's and an assistant's
    turn each, nothing before the first), else none.

    >>> guess_turns(["\\n\\nHuman: hi\\n\\nAssistant: hello"]) == _TURNS[0]
    True
    >>> guess_turns(["Human: hi", "just text"])
    {}
    """
    texts = list(texts)
    for turns in _TURNS:
        split = [split_turns(t, turns)[0] for t in texts]
        if texts and all(s and {"user", "assistant"} <= {m["role"] for m in s} for s in split):
            return dict(turns)
    return {}


def turns_setting(turns: Mapping[str, str]) -> str:
    """`turns` as the setting and the flags that read them.

    >>> print(turns_setting(_TURNS[0]))
    data.turns: {user: "\\n\\nHuman:", assistant: "\\n\\nAssistant:"}; --turn 'user=\\n\\nHuman:' --turn 'assistant=\\n\\nAssistant:'
    """
    config = ", ".join(f"{role}: {json.dumps(marker)}" for role, marker in turns.items())
    flags = " ".join(f"--turn '{role}={typed(marker)}'" for role, marker in turns.items())
    return f"data.turns: {{{config}}}; {flags}"


def typed(text: str) -> str:
    """`text` as a flag takes it on a command line, a newline as ``\\n`` and a tab as ``\\t`` (`--turn`, `--stop`).

    >>> typed("\\n\\nHuman:")
    '\\\\n\\\\nHuman:'
    """
    return text.replace("\n", "\\n").replace("\t", "\\t")


def _turn_marks(text: str, turns: Mapping[str, str]) -> list[tuple[int, int, str]]:
    """(start, end, role) of every marker of `turns` in `text`, in order (`split_turns`)."""
    ordered = sorted(turns.items(), key=lambda kv: len(kv[1]), reverse=True)  # one that begins another after it
    pattern = re.compile("|".join(f"({_marker_pattern(marker)})" for _, marker in ordered))
    found = [(m.start(), m.end(), ordered[m.lastindex - 1][0]) for m in pattern.finditer(text)]
    start = text.lstrip()
    at = len(text) - len(start)
    head = next((role for role, marker in ordered if marker.strip()
                 and re.match(_marker_pattern(marker.lstrip()), start)), None)  # fmt: skip
    if head is not None and not (found and found[0][0] <= at):  # "Human: ..." for the marker "\\n\\nHuman:"
        found.insert(0, (at, at + re.match(_marker_pattern(turns[head].lstrip()), start).end(), head))
    return found


def _marker_pattern(marker: str) -> str:
    """A turn marker as a regular expression: as written, a newline in it matching a Windows line end too.

    >>> bool(re.fullmatch(_marker_pattern("\\n\\nHuman:"), "\\r\\n\\r\\nHuman:"))
    True
    """
    return "".join(r"\r?\n" if c == "\n" else re.escape(c) for c in marker)


def sources(theirs: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The file's columns a field reads: one, or several joined."""
    return (theirs,) if isinstance(theirs, str) else tuple(theirs)


def shown(theirs: str | list[str] | tuple[str, ...]) -> str:
    """How a field's columns are named in a message: ``question``, or ``instruction+input`` (joined).

    >>> shown("question"), shown(["instruction", "input"])
    ('question', 'instruction+input')
    """
    return "+".join(sources(theirs))


MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
"""The fields that may hold a list of messages (`data.message_keys` and `data.roles` apply to each)."""

# Message keys and role names other layouts use (a suggestion in an error message; never applied).
_MESSAGE_KEYS = {"role": ("from", "speaker", "author"), "content": ("value", "text", "message")}
_ROLES = {"user": ("human", "prompter", "user_msg"), "assistant": ("gpt", "bot", "model", "chatbot", "assistant_msg")}


def guess_messages(keys: set[str], roles: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The `message_keys` and `roles` that messages with `keys` and role names `roles` suggest (ShareGPT's).

    >>> guess_messages({"from", "value"}, {"human", "gpt", "system"})
    ({'role': 'from', 'content': 'value'}, {'user': 'human', 'assistant': 'gpt'})
    >>> guess_messages({"role", "content"}, {"user", "model"})
    ({}, {'assistant': 'model'})
    """
    found_keys = {} if {"role", "content"} <= keys else {
        ours: k for ours, options in _MESSAGE_KEYS.items() if ours not in keys
        for k in [next((o for o in options if o in keys), None)] if k is not None}  # fmt: skip
    found_roles = {ours: r for ours, options in _ROLES.items() if ours not in roles
                   for r in [next((o for o in options if o in roles), None)] if r is not None}  # fmt: skip
    return found_keys, found_roles


# Column names that often hold a field, most likely first (a suggestion in an error message; never applied).
_OFTEN = {
    "prompt": ("question", "instruction", "query", "problem", "input", "prompt_text"),
    "completion": ("answer", "output", "response", "solution", "target", "reply"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "better", "accepted"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "worse"),
    "answer": ("solution", "final_answer", "ground_truth", "gold", "label", "target"),
    "messages": ("conversations", "conversation", "dialog", "dialogue", "chat", "turns"),
}
# A prompt column whose text goes on in another (Alpaca's instruction + input, Dolly's instruction + context).
_JOINED = {"instruction": ("input", "context")}


def guess_columns(kind: str, columns: set[str]) -> dict[str, str]:
    """Renames the names of a file's `columns` suggest for `kind`, where they give every field a row shape needs
    (else none): SFT ``prompt``/``completion``, preference ``prompt``/``chosen``/``rejected``, prompts ``prompt``
    (and ``answer``).

    >>> guess_columns("sft", {"question", "answer", "source"})
    {'prompt': 'question', 'completion': 'answer'}
    >>> guess_columns("prompts", {"problem", "solution"})
    {'prompt': 'problem', 'answer': 'solution'}
    >>> guess_columns("sft", {"question", "notes"})
    {}
    >>> guess_columns("sft", {"conversations", "id"})
    {'messages': 'conversations'}
    >>> guess_columns("sft", {"instruction", "input", "output"})
    {'prompt': ['instruction', 'input'], 'completion': 'output'}
    """
    wanted = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
              "prompts": ("prompt", "answer")}[kind]  # fmt: skip
    free, out = set(columns), {}
    for name in wanted:
        if name in columns:  # already called so
            free.discard(name)
            continue
        found = next((c for c in _OFTEN[name] if c in free), None)
        if found is not None:
            out[name] = found
            free.discard(found)
    needed = [f for f in wanted if f != "answer"]
    if all(f in out or f in columns for f in needed) and out:
        if (extra := next((c for c in _JOINED.get(out.get("prompt"), ()) if c in free), None)) is not None:
            out["prompt"] = [out["prompt"], extra]  # Alpaca's input, Dolly's context: part of the prompt
        return out
    if kind != "preference" and "messages" not in columns:  # a chat under another name (ShareGPT's conversations)
        found = next((c for c in _OFTEN["messages"] if c in columns), None)
        if found is not None:
            return {"messages": found}
    return {}


def run_columns(cfg, path=None) -> Columns:
    """A run config's `data.columns`, `data.ignore_columns`, `data.message_keys`, `data.roles` and `data.turns`, for the file
    `path` (None: `data.train`): not `strict` for a held-out file other than the training file."""
    return Columns(dict(cfg.data.columns), tuple(cfg.data.ignore_columns), message_keys=dict(cfg.data.message_keys),
                   roles=dict(cfg.data.roles), turns=dict(cfg.data.turns),
                   strict=path is None or path == cfg.data.train)  # fmt: skip


def _split(name: str) -> tuple[str, str, str]:
    """
    >>> _split("prompt[1].content"), _split("text")
    (('prompt', '[', '1].content'), ('text', '', ''))
    """
    cut = min((i for i in (name.find("["), name.find(".")) if i >= 0), default=len(name))
    return name[:cut], name[cut : cut + 1], name[cut + 1 :]
