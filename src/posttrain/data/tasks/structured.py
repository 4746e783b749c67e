"""Structured output: extract a person's record from a short text as a JSON object matching `SCHEMA`.

The quickstart demo. The prompt names the five keys and nothing else; the rules below are only visible in the
demonstrations, so a model has to LEARN them (an instruction-tuned base model emits plausible JSON that breaks
them, and scores near 0% exact):

- ``name``: the full name as written;
- ``birth_date``: ISO ``YYYY-MM-DD``, whatever the text's format ("March 5th, 1990", "5 March 1990",
  "the 5th of March 1990", "Mar. 5, 1990");
- ``role``: a canonical lowercase snake_case code ("Data Scientist" -> ``data_scientist``), one of `ROLES`;
- ``languages``: lowercase, in order of mention;
- ``remote``: a boolean derived from the text ("works from home" -> true, "commutes to the office" -> false).

No arithmetic: every value is a lookup or a copy, learnable by a 135M model in ~50 LoRA steps.
Sentence templates are split: ``split="heldout"`` rows use only templates (including first-person ones) that
training never sees; the value phrasings (date formats, role titles, remote phrases) are shared.
The completion is ``json.dumps(answer, separators=(",", ":"))``.

`Structured.rejected` writes worse completions for preference pairs: ``wrong`` (compact JSON with one field
wrong: score 0.8), ``off_format`` (every value right but no JSON object: prose, ``key: value`` lines or a Python
dict: score 0), ``rambling`` (a chatty walk through the text, then pretty-printed JSON that copies the text's
date and role wording and capitalised languages, breaking the rules: score 0.4).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from jsonschema import Draft202012Validator

from posttrain.data.tasks.base import task_rng

ROLES = ("software engineer", "data scientist", "nurse", "high school teacher", "graphic designer",
         "accountant", "civil engineer", "pharmacist", "product manager", "chef")  # fmt: skip
FIELDS = ("name", "birth_date", "role", "languages", "remote")

SCHEMA: dict = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "birth_date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "role": {"enum": [r.replace(" ", "_") for r in ROLES]},
        "languages": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}, "minItems": 1},
        "remote": {"type": "boolean"},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}
_VALIDATOR = Draft202012Validator(SCHEMA)

INSTRUCTION = (
    "Extract a JSON object with the keys name, birth_date, role, languages and remote from this text."
)

FIRST = ("Maria", "James", "Aisha", "Kenji", "Lucia", "Omar", "Elena", "David", "Priya", "Lars", "Fatima",
         "Chen", "Sofia", "Mateo", "Hannah", "Yusuf", "Ingrid", "Carlos", "Amara", "Tomas", "Nadia", "Pavel",
         "Grace", "Rafael", "Leila", "Ethan", "Mei", "Jonas", "Zara", "Diego")  # fmt: skip
LAST = ("Lopez", "Okafor", "Tanaka", "Schmidt", "Rossi", "Haddad", "Novak", "Kim", "Silva", "Andersen", "Patel",
        "Dubois", "Moreau", "Nguyen", "Costa", "Kowalski", "Jensen", "Ibrahim", "Fischer", "Morales", "Larsen",
        "Petrova", "Walsh", "Santos", "Bauer")  # fmt: skip
LANGUAGES = ("English", "Spanish", "French", "German", "Italian", "Portuguese", "Japanese", "Mandarin", "Arabic",
             "Hindi", "Russian", "Korean", "Dutch", "Swahili", "Polish", "Turkish")  # fmt: skip
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
# (third person, first person) verb phrases and the boolean they mean.
REMOTE = ((("works remotely", "work remotely"), True), (("works from home", "work from home"), True),
          (("works fully remote", "work fully remote"), True), (("works on site", "work on site"), False),
          (("commutes to the office every day", "commute to the office every day"), False),
          (("works at the company office", "work at the company office"), False))  # fmt: skip

# Slots: {name} {first} {date} {a_role} {role} {langs} {remote} {remote1} (first person).
TRAIN_TEMPLATES = (
    "{name} was born on {date}. {first} is {a_role} who {remote} and speaks {langs}.",
    "Meet {name}, {a_role} born on {date}. {first} speaks {langs} and {remote}.",
    "{name} ({a_role}) was born on {date}, speaks {langs}, and {remote}.",
    "Profile: {name}. Born {date}. Job: {role}. Languages: {langs}. {first} {remote}.",
    "Our new colleague {name} {remote}. {first} is {a_role}, was born on {date} and speaks {langs}.",
    "{name} speaks {langs}. Born on {date}, {first} now {remote} as {a_role}.",
    "Born on {date}, {name} is {a_role}. {first} {remote} and is fluent in {langs}.",
    "Name: {name}\nDate of birth: {date}\nOccupation: {role}\nSpeaks: {langs}\nNote: {first} {remote}.",
    "{name}, who speaks {langs}, is {a_role}. {first} was born on {date} and {remote}.",
    "As {a_role}, {name} {remote}. {first} was born on {date} and can speak {langs}.",
    "This is {name}. {first} was born on {date}, {remote} as {a_role}, and speaks {langs}.",
    "{name} is {a_role}. Birthday: {date}. Languages spoken: {langs}. {first} {remote}.",
)
HELDOUT_TEMPLATES = (
    "Hi, I'm {name}! I was born on {date} and I work as {a_role}. I speak {langs}, and I {remote1}.",
    "Employee record for {name}: {a_role}, born {date}, speaks {langs}. {first} {remote}.",
    "{name} has been {a_role} for years. {first}, born on {date}, speaks {langs} and {remote}.",
    "Everyone knows {name}: {a_role} who {remote}, speaks {langs}, and was born on {date}.",
)


def _ordinal(d: int) -> str:
    """English ordinal.

    >>> [_ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '22nd', '23rd']
    """
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


DATE_FORMATS = (
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {_ordinal(d)}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]}. {d}, {y}",
)


def _join(items: list[str]) -> str:
    """English list.

    >>> _join(["A"]), _join(["A", "B"]), _join(["A", "B", "C"])
    ('A', 'A and B', 'A, B and C')
    """
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def parse_json_object(text: str) -> Any:
    """The JSON value in a completion, or None: the whole text, or else the last ``{...}`` object in it that parses
    (in a fenced block or in prose: `json_valid` asks "is there JSON", and the other metrics judge what it says).
    The last, as the final answer: a draft (in `<think>`, or corrected after), a fenced block of code after the
    object, or a brace in the prose before it made the first one, or nothing, the answer (an audit). Strict JSON:
    `NaN` and `Infinity` are not JSON values.

    >>> parse_json_object('```json\\n{"a": 1}\\n```')
    {'a': 1}
    >>> parse_json_object('JSON:\\n{"a": [1, 2]}\\nThis object has one key.')
    {'a': [1, 2]}
    >>> parse_json_object('Keys {a, b}: {"a": 1} is a draft. Corrected: {"a": 2}\\n```python\\nprint({1: 2})\\n```')
    {'a': 2}
    >>> parse_json_object('{"a": 1') is None, parse_json_object('{"a": NaN}') is None
    (True, True)
    """
    objects = _objects(text)
    return objects[-1] if objects else None


def _objects(text: str) -> list:
    """The whole text's JSON value ([it]), or else every top-level `{...}` object in it that parses, in order.
    Only a `{` that can open an object (`{"` or `{}`) is tried, so a text of braces is read in linear time (each
    failed try costs its position: 100,000 braces took 1.5 s), and nesting deep enough to exhaust the recursion
    limit is no JSON."""
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    try:
        return [decoder.decode(text.strip())]
    except (ValueError, RecursionError):
        pass
    found, at = [], 0
    for start in _OPENS.finditer(text):
        if start.start() < at:
            continue  # inside an object already read: its own, not an answer
        try:
            value, end = decoder.raw_decode(text, start.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            found.append(value)
            at = end
    return found


_OPENS = re.compile(r'\{\s*["}]')


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _answer_object(completion: str) -> Any:
    """The object a completion answers with: of the objects in it (`parse_json_object`'s reading), the last of those
    holding the most of the record's keys, so a corrected answer counts and a note after it (`{"role": null}` as an
    example, `{}`, a schema, `{"confidence": 0.9}`) does not replace it (a review: those scored 0).

    >>> _answer_object('{"name": "A", "role": "chef"} If none, write {"role": null}.')
    {'name': 'A', 'role': 'chef'}
    """
    dicts = [o for o in _objects(completion) if isinstance(o, dict)]  # (a whole text that is a list is no record)
    if not dicts:
        return None
    most = max(len(o.keys() & set(FIELDS)) for o in dicts)
    return [o for o in dicts if len(o.keys() & set(FIELDS)) == most][-1]


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included: Python's `1 == True` scored `"remote": 1` right beside a schema that
    refused it (an audit).

    >>> _same({"x": 1}, {"x": True}), _same({"b": [1], "a": "s"}, {"a": "s", "b": [1]})
    (False, True)
    """
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class Structured:
    """Extract a person's record as JSON; the rules are learned from demonstrations (module docstring)."""

    name = "structured"
    schema = SCHEMA
    fields = FIELDS
    metrics = ("json_valid", "schema_match", "exact", *(f"field_{f}" for f in FIELDS))  # what `verify` returns

    def make(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` rows, deterministic in (`seed`, `split`); heldout rows use only heldout templates."""
        rng = task_rng(self.name, seed, split)
        templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
        rows = []
        for i in range(n):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            y, m, d = rng.randint(1950, 2005), rng.randint(1, 12), rng.randint(1, 28)
            date_fmt = rng.randrange(len(DATE_FORMATS))
            role = rng.choice(ROLES)
            title = role.title() if rng.random() < 0.5 else role
            langs = rng.sample(LANGUAGES, rng.choice((1, 2, 2, 3)))
            (remote3, remote1), remote = rng.choice(REMOTE)
            t = rng.randrange(len(templates))
            text = templates[t].format(
                name=f"{first} {last}", first=first, date=DATE_FORMATS[date_fmt](y, m, d),
                a_role=("an " if title[0] in "AEIOUaeiou" else "a ") + title, role=title,
                langs=_join(langs), remote=remote3, remote1=remote1,
            )  # fmt: skip
            answer = {
                "name": f"{first} {last}",
                "birth_date": f"{y:04d}-{m:02d}-{d:02d}",
                "role": role.replace(" ", "_"),
                "languages": [lang.lower() for lang in langs],
                "remote": remote,
            }
            rows.append({
                "id": f"structured-{split}-{seed}-{i}",
                "prompt": f"{INSTRUCTION}\n\nText: {text}",
                "completion": json.dumps(answer, separators=(",", ":")),
                "answer": answer,
                "metadata": {"task": self.name, "split": split, "template": f"{split}-{t}", "date_format": date_fmt},
            })  # fmt: skip
        return rows

    def answer_problem(self, answer) -> str | None:
        """Why `verify` cannot compare with `answer` (None when it can): a record of the task's schema.

        >>> Structured().answer_problem("Ann")
        "must be a record with the fields name, birth_date, role, languages, remote (the task's schema), got str 'Ann'"
        """
        if isinstance(answer, dict) and _VALIDATOR.is_valid(answer):
            return None
        return (f"must be a record with the fields {', '.join(FIELDS)} (the task's schema), got "
                f"{type(answer).__name__} {answer!r}"[:300])  # fmt: skip

    def verify(self, completion: str, answer: dict) -> dict[str, bool]:
        """``json_valid``, ``schema_match``, ``exact`` and ``field_<name>`` for each field.

        >>> good = '{"name":"Ann Lee","birth_date":"1990-03-05","role":"chef","languages":["dutch"],"remote":true}'
        >>> ans = json.loads(good)
        >>> Structured().verify(good, ans)["exact"]
        True
        >>> v = Structured().verify(good.replace("1990-03-05", "March 5, 1990"), ans)
        >>> v["json_valid"], v["schema_match"], v["exact"], v["field_birth_date"], v["field_role"]
        (True, False, False, False, True)
        >>> Structured().verify("no json here", ans)["json_valid"]
        False
        """
        obj = _answer_object(completion)
        valid = isinstance(obj, dict)
        out = {
            "json_valid": valid,
            "schema_match": valid and _VALIDATOR.is_valid(obj),
            "exact": valid and _same(obj, answer),
        }
        for f in FIELDS:
            out[f"field_{f}"] = valid and f in obj and _same(obj[f], answer[f])
        return out

    def rejected(self, row: dict, kind: str, rng: random.Random) -> str:
        """A worse completion of `kind` (``wrong``, ``off_format``, ``rambling``) for a row made by `make`.

        >>> ans = {"name": "Ann Lee", "birth_date": "1990-03-05", "role": "chef", "languages": ["dutch"],
        ...        "remote": True}
        >>> print(Structured().rejected({"answer": ans}, "off_format", random.Random(1)))
        name: Ann Lee
        birth_date: 1990-03-05
        role: chef
        languages: dutch
        remote: true
        """
        answer = row["answer"]
        if kind == "wrong":
            return json.dumps(_one_field_wrong(answer, rng), separators=(",", ":"))
        if kind == "off_format":
            return _off_format(answer, rng)
        if kind == "rambling":
            return _ramble(answer, row.get("metadata", {}).get("date_format", 0), rng)
        raise ValueError(f"kind must be wrong, off_format or rambling, got {kind!r}")

    def score(self, completion: str, answer: dict) -> float:
        """Reward in [0, 1]: the fraction of fields exactly right (0 when the output is not a JSON object).

        >>> Structured().score('{"name": "Ann Lee"}', {"name": "Ann Lee", "birth_date": "", "role": "",
        ...     "languages": [], "remote": False})
        0.2
        """
        v = self.verify(completion, answer)
        return sum(v[f"field_{f}"] for f in FIELDS) / len(FIELDS)


def _one_field_wrong(answer: dict, rng: random.Random) -> dict:
    """The answer with one field changed the way a careless extraction would change it."""
    out = json.loads(json.dumps(answer))
    field = rng.choice(FIELDS)
    if field == "name":
        first, last = answer["name"].split(" ", 1)
        if rng.random() < 0.5:
            out["name"] = f"{rng.choice([f for f in FIRST if f != first])} {last}"
        else:
            out["name"] = f"{first} {rng.choice([x for x in LAST if x != last])}"
    elif field == "birth_date":
        y, m, d = map(int, answer["birth_date"].split("-"))
        if d <= 12 and d != m:  # day and month swapped: the classic date slip
            m, d = d, m
        else:
            y += rng.choice((-1, 1))
        out["birth_date"] = f"{y:04d}-{m:02d}-{d:02d}"
    elif field == "role":
        out["role"] = rng.choice([r for r in ROLES if r.replace(" ", "_") != answer["role"]]).replace(
            " ", "_"
        )
    elif field == "languages":
        langs = answer["languages"]
        if len(langs) > 1:
            out["languages"] = langs[::-1]  # the wrong order of mention
        else:
            out["languages"] = [rng.choice([x.lower() for x in LANGUAGES if x.lower() != langs[0]])]
    else:
        out["remote"] = not answer["remote"]
    return out


def _off_format(answer: dict, rng: random.Random) -> str:
    """Every value right, but no JSON object in sight (`parse_json_object` finds nothing)."""
    style = rng.randrange(3)
    if style == 0:
        return "\n".join(
            f"{k}: {', '.join(v) if isinstance(v, list) else json.dumps(v) if isinstance(v, bool) else v}"
            for k, v in answer.items()
        )
    if style == 1:
        works = "works remotely" if answer["remote"] else "does not work remotely"
        return (f"{answer['name']} was born on {answer['birth_date']}, works as {answer['role']}, speaks "
                f"{_join(answer['languages'])} and {works}.")  # fmt: skip
    return repr(answer)  # a Python dict: single quotes and True/False are not JSON


def _ramble(answer: dict, date_format: int, rng: random.Random) -> str:
    """A chatty answer whose JSON copies the text's wording instead of applying the rules (date, role, case)."""
    y, m, d = map(int, answer["birth_date"].split("-"))
    copied = {
        "name": answer["name"],
        "birth_date": DATE_FORMATS[date_format](y, m, d),
        "role": answer["role"].replace("_", " ").title(),
        "languages": [x.capitalize() for x in answer["languages"]],
        "remote": answer["remote"],
    }
    opening = rng.choice((
        "Sure! I'd be happy to help you with that. Extracting information from text is something I enjoy.",
        "Of course! Let me take a careful look at this text and pull out all of the details you asked for.",
        "Great question! This looks like a short description of a person, so let me read it closely first.",
    ))  # fmt: skip
    works = "They work remotely" if answer["remote"] else "They do not work remotely"
    return (
        f"{opening} Let me go through the text carefully, one detail at a time. The person's name is "
        f"{copied['name']}. Their date of birth is {copied['birth_date']}. They work as {copied['role']}. They "
        f"speak {_join(copied['languages'])}. {works}, so remote is {json.dumps(copied['remote'])}.\n\n"
        f"Here is the JSON object you asked for:\n\n```json\n{json.dumps(copied, indent=2)}\n```\n\n"
        "I kept the values exactly as they appear in the text, so that nothing is lost in translation. Let me "
        "know if you would like me to change the format or add any other fields!"
    )
