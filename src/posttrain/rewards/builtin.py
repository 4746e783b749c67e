"""Built-in reward functions, each made by a factory from the spec's ``args``; `REWARDS` maps names to them.

A reward function has the signature ``fn(prompts, completions, **columns) -> list[float]`` (columns: the
dataset's other fields, as lists aligned with ``prompts``). A sample the function cannot score (its column is
missing or malformed) gets NaN, which `compute_rewards` turns into the fallback and counts as a failure.

What this module does not do: combine, weight or log rewards (`posttrain.rewards.compute`), or load
user files (`posttrain.rewards.spec`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from posttrain.data.tasks import TASKS
from posttrain.data.tasks.arithmetic import same_number
from posttrain.models.heads import RewardModelScorer
from posttrain.rewards import sandbox

RewardFn = Callable[..., list[float]]
NAN = float("nan")

# ---------------------------------------------------------------------------------------------- numeric answer
_MARKER = re.compile(r"\banswer\s*(?:is\b\s*:?|:)|####", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_PLAIN = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_VALUE = re.compile(r"[-+$\\({\[.\d]|[A-Za-z]\w*\s*(?:=|[-+*/^(]\s*[\w(])")  # 5, \frac, x = 5, x^2+1, n(n+1)/2
_LEADING = re.compile(r"\$?\s*(" + _PLAIN.pattern + r")")
# what may follow a number that is the whole answer: nothing, punctuation, or words and a parenthesis
# ("42.", "42 apples, since", "42 (6 x 7)"); not an operator, LaTeX, x, "and"/"or" (2 and 3), %
_ALONE = re.compile(r"\s*\$?(?:\s*[.,;:!?])*(?:\s*$|\s+\((?![-\d.\s]*[-+*/^])|"
                    r"\s+(?!(?:x|and|or|times|plus|minus)\b)[A-Za-z])")  # fmt: skip
_NUM = r"-?\d+(?:\.\d+)?"
# several values joined by "or"/"and" (x = 3 or x = 5, 2 and 3, a hedge 3 or 4): compared as a set
_MANY = re.compile(rf"(?:[A-Za-z]\s*=\s*)?{_NUM}(?:\s*(?:,|,?\s*\b(?:or|and)\b)\s*(?:[A-Za-z]\s*=\s*)?{_NUM})+\.?")
_OPERATOR = re.compile(r"[-+*/^\u00d7\u00f7]|\sx\s|\\(?:times|cdot|div)")  # before an =: an equation's left side
_BRACKETED = re.compile(rf"[(\[]\s*({_NUM})\s*[)\]]\.?")  # (7), [7]
_BLANK = re.compile(r"\s*")
_MINUS = str.maketrans({"\u2212": "-"})  # a typeset minus sign (not an en dash: 3\u20135 days is a range)


def _boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (braces balanced), or None.

    >>> _boxed(r"so \boxed{\frac{1}{2}} and done")
    '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(completion: str) -> str | None:
    r"""The marked final answer, None when the completion marks none: whichever comes last of the last
    ``\boxed{...}`` and the last ``Answer:`` / ``The answer is`` / ``####`` that a value follows (on its line, or
    on the next when the marker ends its line; "I hope this answer is clear" marks nothing). Of a marked line, a
    plain number that words or a parenthesis follow is the answer ("42 apples, since she had 40", "42 (6 x 7)");
    anything else is read whole (``\frac{1}{2}``, ``2, 3``, ``1.5\times10^3``).

    >>> final_answer("3 + 4 = 7.\nAnswer: 7 apples"), final_answer("#### 1,234"), final_answer("it is 5")
    ('7', '1,234', None)
    >>> final_answer("Answer:\n42"), final_answer("Answer: 42\n\nI hope this answer is clear."), final_answer("Answer: 2, 3")
    ('42', '42', '2, 3')
    >>> final_answer(r"<think>\boxed{5}</think> The answer is **6**."), final_answer(r"The answer is $\boxed{6}$.")
    ('6', '6')
    >>> final_answer("Answer: 3 + 4 = 7"), final_answer("Answer: 6 x 7 = 42"), final_answer("The answer is x^2+1")
    ('7', '42', 'x^2+1')
    """
    text = completion.translate(_MINUS)
    marked = None
    for m in reversed(list(_MARKER.finditer(text))):
        line = _line_at(text, m.end())
        if not line.strip():  # the marker ends its line: the value is on the next one
            line = _line_at(text, _BLANK.match(text, m.end()).end())
        line = re.sub(r"\*\*|__", "", line).strip()  # Markdown's bold: **42**
        if _VALUE.match(line):
            marked = (m.start(), line)
            break
    boxed_at = text.rfind("\\boxed{")
    if boxed_at >= 0 and (marked is None or boxed_at > marked[0]) and (boxed := _boxed(text)) is not None:
        return boxed.strip()
    if marked is None:
        return None
    return _marked_value(marked[1])


def _marked_value(value: str) -> str:
    """What a marked line's text answers (`final_answer`).

    >>> _marked_value("42 apples, since 40 + 2"), _marked_value("3 + 4 = 7"), _marked_value("12 inches = 1 foot")
    ('42', '7', '12')
    >>> _marked_value("x = 3 or x = 5"), _marked_value("3 or 4"), _marked_value("(7)"), _marked_value("50%")
    ('3, 5', '3, 4', '7', '50%')
    """
    sentence = re.match(r"\s*(-?)\$?(-?\d+(?:,\d{3})*(?:\.\d+)?)\.\s+[A-Z]", value)  # "17. Check: 17 - 5 = 12.": the answer, then more
    if sentence:
        return sentence.group(1) + sentence.group(2)
    if re.search(r"\b(?:or|and)\b", value) and _MANY.fullmatch(value):
        return ", ".join(re.findall(rf"(?<![\d.]){_NUM}", re.sub(r"[A-Za-z]\s*=", "", value)))
    if bracketed := _BRACKETED.fullmatch(value):
        return bracketed.group(1)
    before, eq, after = value.rpartition("=")
    after = after.strip() if eq else None
    # an equation's result (3 + 4 = 7, x = 5) before its first number; a number and words first otherwise (12 inches = 1 foot)
    order = (after, value) if eq and (_OPERATOR.search(before) or not _LEADING.match(value)) else (value, after)
    for candidate in order:
        lead = _LEADING.match(candidate) if candidate else None
        if lead and _ALONE.match(candidate, lead.end()):
            return lead.group(1)
    return after if eq and "\\" not in value else value


def _line_at(text: str, start: int) -> str:
    """The text from `start` to the end of its line (indexes only: a completion that repeats a marker thousands of
    times is not copied once per marker)."""
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)]


def to_number(text: str) -> float | None:
    """`text` as a number when it is one plain number (thousands commas, ``$``, a trailing period and
    ``a/b`` fractions allowed), else None.

    >>> to_number("$1,234.50."), to_number("3/4"), to_number("-2"), to_number("42 apples")
    (1234.5, 0.75, -2.0, None)

    LaTeX's escaped dollar (``\\$18.90``, how MATH writes money) and thin-space thousands (``1\\,000``), a sign
    before the dollar (``-$17``) and a leading ``+`` read as the number (they read as no number, and every answer
    to such a row scored 0: an audit).

    >>> to_number(r"\\$18.90"), to_number(r"1\\,000"), to_number("-$17"), to_number("+17")
    (18.9, 1000.0, -17.0, 17.0)
    """
    s = str(text).translate(_MINUS).replace("\\$", "$").replace("\\,", "").strip()
    s = re.sub(r"^([-+]?)\s*\$", r"\1", s).strip().strip("$").rstrip(".").strip().removeprefix("+")
    if not _PLAIN.fullmatch(s):
        return None
    num, _, den = s.replace(",", "").partition("/")
    value = float(num) / float(den) if den and float(den) else (None if den else float(num))
    # Too large for a float (an integer of 309 digits or more): not plain, so math-verify compares it exactly;
    # as inf it would have matched every other number too large.
    return value if value is None or math.isfinite(value) else None


def readable_number(text: str) -> bool:
    """Whether `text` is a gold answer `numeric_match` can compare with: a plain number, or an expression
    math-verify parses (``\\frac{1}{2}``, ``2\\sqrt{3}``).

    >>> readable_number("1,234"), readable_number(r"\\frac{1}{2}"), readable_number("four"), readable_number("nan")
    (True, True, False, False)
    """
    if to_number(text) is not None:
        return True
    parsed = _math_verify_parse(text)
    # math-verify gives back the text it read beside what it made of it: a list of strings only is nothing read
    # (a gold `\text{odd}`), and a letter alone, or a set of letters, is a choice's label, not a number (`{B}`)
    return any(not isinstance(p, str) and not _label(p) for p in parsed) and not any(
        str(p).lower() in ("nan", "zoo", "oo", "-oo") for p in parsed)


def _label(value) -> bool:
    """Whether math-verify's reading of a gold answer is a letter or a set of letters (a choice: ``B``, ``{B}``)."""
    args = getattr(value, "args", ()) if type(value).__name__ == "FiniteSet" else (value,)
    return bool(args) and all(getattr(a, "is_Symbol", False) for a in args)


def _math_verify():
    """math-verify, imported on first use (it pulls in sympy, ~0.5 s), with its per-call warnings off."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without a timeout
    return math_verify


MATH_VERIFY_SECONDS = 5.0
"""The wall-clock limit on one math-verify parse or comparison (math-verify's own default), on the main thread
(a SIGALRM timer; other threads run without one). A call past it scores 0, so an answer that takes sympy long
(``\\sum_{k=1}^{1000} k^3``) can score 0 on a slow or busy machine and 1 on a fast one: each such call is counted
(`math_verify_timeouts`), and `numeric_answer` logs the count as ``reward/timeouts_<label>`` with a note."""
_TIMEOUTS = [0]  # math-verify calls past the limit since `math_verify_timeouts` was last read


class _TimedOut(BaseException):
    """Raised by the timer inside math-verify: a BaseException, so that its `except Exception` (which turns any
    error into "not equal") lets it through to `_limited`, which counts it."""


_UNSET = object()


def _limited(call, on_timeout):
    """`call()`, stopped after `MATH_VERIFY_SECONDS` on the main thread (`on_timeout` is returned then, counted).
    A timer the caller had running is stopped meanwhile and re-armed after, with what was left of it; a timer that
    fires just after `call()` returned loses nothing (the result is kept)."""
    if threading.current_thread() is not threading.main_thread():
        return call()

    def expired(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expired)
    started = time.monotonic()
    outer = signal.setitimer(signal.ITIMER_REAL, MATH_VERIFY_SECONDS)  # (what was left of the caller's, its interval)
    result = _UNSET
    try:
        try:
            result = call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # one-shot: nothing fires after this
    except _TimedOut:
        if result is _UNSET:
            _TIMEOUTS[0] += 1
            result = on_timeout
    finally:
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - started), 1e-6), outer[1])
    return result


def math_verify_timeouts() -> int:
    """The math-verify calls stopped at `MATH_VERIFY_SECONDS` since the last read (read and reset)."""
    counted, _TIMEOUTS[0] = _TIMEOUTS[0], 0
    return counted


def _math_verify_parse(text: str) -> list:
    math_verify = _math_verify()
    return _limited(lambda: math_verify.parse(_as_math(text), parsing_timeout=None), [])


_LATEX = re.compile(r"[\\{}]")  # a command or a group: a ^ alone (5m^2, x^2+1) reads bare as it always has
_TUPLE = re.compile(r"\s*[(\[].*,.*[)\]]\s*")
_LIST = re.compile(r"-?\d+(?:\.\d+)?(?:(?:\s*,\s*|,?\s+and\s+)-?\d+(?:\.\d+)?)+")  # 2, 3 / 2 and 3 (not 1,234)
_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_GROUP = re.compile(r"\\(?:text|mbox|mathrm|textrm)\s*\{[^{}]*\}")  # \text{ cm}: a unit LaTeX-mode math-verify reads
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}|\s[A-Za-z]")  # a word, or a unit after a space (9.8 m/s^2)
_TRAILING_WORDS = re.compile(r"\s+[A-Za-z][A-Za-z\s.,!]*$")  # "... of the pizza", "units."
_DEGREES = re.compile(r"(\\circ\}?)\s*[CFK]\b")  # 5^{\circ}C: the scale's letter is no variable


def _as_math(text: str) -> str:
    r"""An answer in bare LaTeX (``2\sqrt{3}``, ``\dfrac{3}{4}``, an interval ``(-2,2)``) put between ``$`` signs, as
    math-verify reads LaTeX: bare, it takes the first number it finds (``2\sqrt{3}`` read as 2, so a completion
    answering 2 scored right) or nothing (``(-2,2)``, ``\dfrac{3}{4}``). Words after the expression are dropped
    first (``\frac{1}{2} of the pizza``); an answer with words or units inside it (``5 cm^2``, ``9.8 m/s^2``), or
    without LaTeX, or already in ``$``, is left as it is, for math-verify's own reading (``42 apples`` is 42).

    >>> _as_math(r"2\sqrt{3}"), _as_math("(-2,2)"), _as_math("42 apples"), _as_math(r"$\frac{1}{2}$")
    ('$2\\sqrt{3}$', '$(-2,2)$', '42 apples', '$\\frac{1}{2}$')
    >>> _as_math(r"\frac{1}{2} of the pizza"), _as_math("5 cm^2"), _as_math("9.8 m/s^2"), _as_math(r"-5^{\circ}C")
    ('$\\frac{1}{2}$', '5 cm^2', '9.8 m/s^2', '$-5^{\\circ}$')
    >>> _as_math("2, 3"), _as_math("-3,2"), _as_math("2 and 3"), _as_math("1,234")
    ('$2, 3$', '$-3,2$', '$2, 3$', '1,234')
    """
    if "$" in text:
        return text
    if _LIST.fullmatch(text.strip()) and to_number(text) is None:  # several answers: a set (1,234 is one number)
        return "$" + re.sub(r",?\s+and\s+", ", ", text.strip()) + "$"
    core = _DEGREES.sub(r"\1", _TRAILING_WORDS.sub("", text.strip())).rstrip(" .")
    bare = _COMMAND.sub("", _TEXT_GROUP.sub("", core))  # what is left to read once LaTeX's own units are set aside
    power = "^" in core and not re.search(r"\d\s*[A-Za-z]", bare)  # x^2+1, not 5m^2 (a unit)
    if not (_LATEX.search(core) or power or _TUPLE.fullmatch(core)) or _PROSE.search(bare):
        return text
    return f"${core}$"


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Symbolic/numeric equality by math-verify (LaTeX, fractions, expressions, units)."""
    math_verify = _math_verify()
    gold_parsed, pred_parsed = _math_verify_parse(gold), _math_verify_parse(pred)
    return _limited(lambda: math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None), False)


def _marked_gold(text: str) -> str:
    r"""A gold answer's own value: the last ``\boxed{}`` of a worked solution (MATH's), or what follows its last
    ``####`` (GSM8K's); else the text as it is (a prose marker such as ``answer:`` is the gold's own words).

    >>> _marked_gold(r"so $x = \boxed{3}$."), _marked_gold("She sold 48 + 24 = 72.\n#### 72"), _marked_gold("5 (answer: five)")
    ('3', '72', '5 (answer: five)')
    """
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    marked = re.findall(r"####[ \t]*(.*)", text)
    return marked[-1].strip() if marked else text


def numeric_match(completion: str, answer: Any, *, tolerance: float = 1e-6) -> bool:
    r"""Whether the completion's answer equals `answer` numerically (relative `tolerance`; two whole numbers
    exactly: 1000000 is not 1000001, which 1e-6 of it allowed).

    The answer is the marked one (`final_answer`) if any, else the last number in the text. Plain numbers
    are compared directly; anything else (``\frac{1}{2}``, ``42 apples``, a symbolic gold answer, several
    answers ``2, 3``, compared as a set) goes to math-verify.

    >>> numeric_match("3 + 4 = 7. Answer: 7", 7), numeric_match("I get 1,234", "1234")
    (True, True)
    >>> numeric_match(r"so \boxed{\frac{1}{2}}", 0.5), numeric_match("Answer: 8", "7")
    (True, False)
    >>> numeric_match(r"\boxed{2\sqrt{3}}", r"2\sqrt{3}"), numeric_match(r"\boxed{2}", r"2\sqrt{3}")
    (True, False)
    >>> numeric_match(r"\boxed{(-2,2)}", "(-2,2)"), numeric_match(r"\boxed{3}", r"so $x = \boxed{3}$.")
    (True, True)
    """
    completion = completion.translate(_MINUS).replace("\\$", "$")  # LaTeX's escaped dollar is a dollar
    pred = final_answer(completion)
    # A gold answer given as a worked solution (MATH's `solution`, GSM8K's `#### 72`) is compared by its marked
    # answer, as the completion's is; else as it is.
    gold_text = _marked_gold(str(answer).translate(_MINUS).replace("\\$", "$"))
    if re.search(r"\b(?:or|and)\b", gold_text) and _MANY.fullmatch(gold_text.strip()):
        gold_text = _marked_value(gold_text.strip())  # x = 3 or x = 5: the set {3, 5}, as a completion's is read
    gold = to_number(gold_text)
    if pred is None:
        numbers = _NUMBER.findall(completion)
        if not numbers:
            return False
        pred = numbers[-1]
    got = to_number(pred)
    if gold is not None and got is not None:
        return same_number(got, gold, tolerance)
    return _math_verify_equal(gold_text, pred)


def _real(value: Any, name: str) -> float:
    """A reward's numeric argument as a float, refused (ValueError) unless a finite number >= 0. A text that is one
    is read: YAML reads ``1e-3`` (no dot) as a string, which failed every sample once scoring began.

    >>> _real("1e-3", "tolerance"), _real(2, "scale")
    (0.001, 2.0)
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return number


def numeric_answer(*, column: str = "answer", tolerance: float = 1e-6) -> RewardFn:
    """1.0 when the completion's final answer equals the `column` value numerically, else 0.0.

    >>> fn = numeric_answer()
    >>> fn(["q1", "q2", "q3"], ["... Answer: 42", "#### 41", "so it is 3.0"], answer=[42, "42", 3])
    [1.0, 0.0, 1.0]
    """
    tolerance = _real(tolerance, "tolerance")

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        answers = _column(columns, column, "numeric_answer")
        return [float(numeric_match(c, a, tolerance=tolerance)) for c, a in zip(completions, answers)]

    reward.events = lambda: {"timeouts": math_verify_timeouts()}  # type: ignore[attr-defined]
    reward.event_notes = {"timeouts": (  # type: ignore[attr-defined]
        f"math-verify comparisons ran past {MATH_VERIFY_SECONDS:g} s and scored 0 (a wall-clock limit: a slower or "
        "busier machine scores the same answer lower; expressions that take sympy this long are rare in answers)")}
    return reward


# ------------------------------------------------------------------------------------------ exact / regex / json
def exact_match(*, column: str = "answer", case_sensitive: bool = True) -> RewardFn:
    """1.0 when the stripped completion equals the stripped `column` value (as a string), else 0.0.

    >>> exact_match()(["q", "q"], [" Paris\\n", "paris"], answer=["Paris", "Paris"])
    [1.0, 0.0]
    >>> exact_match(case_sensitive=False)(["q"], ["paris"], answer=["Paris"])
    [1.0]
    """
    norm = (lambda s: str(s).strip()) if case_sensitive else (lambda s: str(s).strip().casefold())

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        answers = _column(columns, column, "exact_match")
        return [float(norm(c) == norm(a)) for c, a in zip(completions, answers)]

    return reward


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def regex_format(*, pattern: str, mode: str = "search", flags: str = "") -> RewardFn:
    """1.0 when `pattern` matches the completion, else 0.0. `mode`: ``search`` (anywhere) or ``fullmatch``
    (the whole stripped completion); `flags`: letters from ``imsx`` (IGNORECASE, MULTILINE, DOTALL, VERBOSE).

    >>> regex_format(pattern=r"Answer: -?\\d+")(["q", "q"], ["so... Answer: 12", "twelve"])
    [1.0, 0.0]
    >>> regex_format(pattern=r"<think>.*</think>.*", mode="fullmatch", flags="s")(["q"], ["<think>a\\nb</think> 3"])
    [1.0]
    """
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"mode must be 'search' or 'fullmatch', got {mode!r}")
    if set(flags) - set(_FLAGS):
        raise ValueError(f"flags must be letters from 'imsx', got {flags!r}")
    try:
        regex = re.compile(pattern, sum((_FLAGS[f] for f in set(flags)), 0))
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    match = regex.search if mode == "search" else (lambda s: regex.fullmatch(s.strip()))

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(match(c) is not None) for c in completions]

    return reward


def parse_json(text: str) -> Any:
    """The completion parsed as JSON, from the whole (stripped) text or a single ```json fenced block;
    raises ValueError when neither parses.

    >>> parse_json('```json\\n{"a": 1}\\n```'), parse_json(' [1, 2] ')
    ({'a': 1}, [1, 2])
    """
    fenced = re.fullmatch(r"\s*```(?:json)?[ \t]*\n(.*?)```\s*", text, re.DOTALL | re.IGNORECASE)
    return json.loads(fenced.group(1) if fenced else text.strip(), parse_constant=_not_json)


def _not_json(name: str):
    """NaN and Infinity are not JSON (Python's reader takes them, and NaN passed every bound: `minimum: 0`)."""
    raise ValueError(f"{name} is not JSON")


def json_schema(*, schema: dict | None = None, column: str = "schema") -> RewardFn:
    """1.0 when the completion is JSON (optionally in a ```json fence) valid under `schema`, else 0.0.
    Without `schema`, each row's `column` gives it (a dict or a JSON string).

    >>> fn = json_schema(schema={"type": "object", "required": ["name"]})
    >>> fn(["q", "q", "q"], ['{"name": "Ann"}', '```json\\n{"age": 3}\\n```', "not json"])
    [1.0, 0.0, 0.0]
    >>> json_schema()(["q"], ['[1, 2]'], schema=['{"type": "array"}'])
    [1.0]
    """
    fixed = _validator(schema) if schema is not None else None

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        schemas = [None] * len(completions) if fixed else _column(columns, column, "json_schema")
        out = []
        for completion, row_schema in zip(completions, schemas):
            try:
                validator = fixed or _validator(
                    json.loads(row_schema) if isinstance(row_schema, str) else row_schema
                )
            except (ValueError, TypeError):
                out.append(NAN)  # the row's schema is broken: not the completion's fault
                continue
            try:
                out.append(float(validator.is_valid(parse_json(completion))))
            except ValueError:
                out.append(0.0)
        return out

    return reward


def schema_problem(schema: Any) -> str | None:
    """Why a row's `json_schema` schema (a dict or a JSON string) cannot be used, or None: every sample of its row
    would be unscored (the fallback) and counted as a failure.

    >>> schema_problem('{"type": "object"}'), schema_problem('{"type": 3}')
    (None, 'invalid JSON schema: 3 is not valid under any of the given schemas')
    """
    try:
        _validator(json.loads(schema) if isinstance(schema, str) else schema)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _validator(schema: Any):
    """A validator for `schema` of the draft its `$schema` names (draft 2020-12 without one: draft-07's
    `dependencies` and tuple `items` mean other things there)."""
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        raise ValueError(f"invalid JSON schema: $schema must be a string, got {schema['$schema']!r}")
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"invalid JSON schema: {e.message}") from None
    return cls(schema)


# ------------------------------------------------------------------------------------------------ length penalty
def length_penalty(
    *, target: int, scale: float | None = None, unit: str = "chars", tokenizer: Any = None
) -> RewardFn:
    """``-max(0, length - target) / scale`` (0 up to `target`, then linearly negative; `scale` defaults to
    `target`, so twice the target length costs 1.0). `unit`: ``chars``, ``words`` (whitespace-separated) or
    ``tokens`` (needs `tokenizer`: a path/name loaded with ``transformers.AutoTokenizer``, or an object
    with ``encode(text) -> list``).

    >>> length_penalty(target=4)(["q", "q"], ["abc", "abcdefgh"])
    [0.0, -1.0]
    >>> length_penalty(target=2, scale=1, unit="words")(["q"], ["one two three"])
    [-1.0]
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 0 or (
            scale is not None and _real(scale, "scale") <= 0):  # fmt: skip
        raise ValueError(f"need a whole target >= 0 and scale > 0, got target={target!r}, scale={scale!r}")
    if unit not in ("chars", "words", "tokens"):
        raise ValueError(f"unit must be 'chars', 'words' or 'tokens', got {unit!r}")
    if unit == "tokens" and tokenizer is None:
        raise ValueError("unit 'tokens' needs a 'tokenizer' (a tokenizer path or name)")
    scale = float(scale if scale is not None else max(target, 1))
    tok = tokenizer
    if isinstance(tokenizer, str):  # loaded now, before any sampling: a wrong path failed every sample (penalty 0)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer {tokenizer!r} could not be loaded: {str(e).splitlines()[0]}") from None

    def length(text: str) -> int:
        if unit == "chars":
            return len(text)
        if unit == "words":
            return len(text.split())
        return len(tok.encode(text, add_special_tokens=False) if hasattr(tok, "vocab_size") else tok.encode(text))

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [-max(0, length(c) - target) / scale for c in completions]

    return reward


# ------------------------------------------------------------------------------------------- task / model / code
def task(*, task: str | None = None, column: str = "answer", metric: str | None = None) -> RewardFn:
    """A built-in task's own score, ``TASKS[task].score(completion, answer)`` in [0, 1], or with `metric` one of
    its verifier's metrics as 0 or 1 (``TASKS[task].verify(...)[metric]``: e.g. arithmetic's ``formatted``, the
    marked answer that the recipes reward and report alike). Without `task`, each row names its task in a
    ``task`` column or in ``metadata["task"]`` (as rows made by the tasks do).

    >>> task(task="arithmetic")(["q", "q"], ["Answer: 17", "Answer: 16"], answer=[17, 17])
    [1.0, 0.0]
    >>> task()(["q"], ["Answer: 3"], answer=[3], metadata=[{"task": "arithmetic"}])
    [1.0]
    >>> task(task="arithmetic", metric="formatted")(["q"] * 3, ["Answer: $16", "#### 16", "It is 16."], answer=[17] * 3)
    [1.0, 1.0, 0.0]
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    if metric is not None:
        have = TASKS[task].metrics if task is not None else sorted({m for t in TASKS.values() for m in t.metrics})
        if metric not in have:
            who = f"the {task} task's verifier" if task else "any task's verifier"
            raise ValueError(f"metric {metric!r} is not a metric of {who}; choose one of {', '.join(have)}")

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        answers = _column(columns, column, "task")
        if task is not None:
            names = [task] * len(completions)
        else:  # each row's `task` column, else its metadata.task (a file may use either, row by row)
            own = columns.get("task") or [None] * len(completions)
            meta = columns.get("metadata") or [None] * len(completions)
            names = [t if t is not None else (m.get("task") if isinstance(m, dict) else None)
                     for t, m in zip(own, meta)]  # fmt: skip
        out = []
        for completion, answer, name in zip(completions, answers, names):
            if name not in TASKS or (metric is not None and metric not in TASKS[name].metrics):
                out.append(NAN)  # the sample fails, with the reward's error count
            elif metric is None:
                out.append(float(TASKS[name].score(completion, answer)))
            else:
                out.append(float(TASKS[name].verify(completion, answer)[metric]))
        return out

    return reward


class Unscored(Exception):
    """What a reward function may return in place of one sample's value when it cannot score that sample (a
    trained reward model that cannot render it: `reward_model`): the sample fails, as a NaN would
    (`rewards.compute`), and the logged error says why instead of "nan is not a finite number"."""


def reward_model(*, path: str) -> RewardFn:
    """The score of a trained reward model at `path` (``posttrain.models.heads.RewardModelScorer``),
    loaded on the first call. It scores the whole prompt when the rollout passes it as a ``prompt_messages``
    column (system and earlier turns included, as the model was trained), else the prompt text as a user turn.
    Completions flagged in a ``truncated`` column (the rollout passes one) are scored with the turn left open.

    The returned function's ``prepare`` attribute (None: the model stays as loaded) is applied to the model when it
    loads; the run that calls the function sets it, knowing what this layer does not (the rollout source shards
    the model under ``run.sharding=fsdp2`` and partitions it under DeepSpeed ZeRO-3, as it does a frozen-copy
    reference). A sample the model cannot score gets `Unscored` saying why (the sample's failure); the function is
    never retried sample by sample (``retry_per_sample``, `rewards.compute`).

    >>> fn = reward_model(path="runs/rm/final")  # nothing is loaded until the first call
    >>> callable(fn), fn.prepare, fn.retry_per_sample
    (True, None, False)
    """
    state: dict[str, Any] = {}

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float | Unscored]:
        if "scorer" not in state:
            state["scorer"] = RewardModelScorer(path, prepare=reward.prepare)
        full = columns.get("prompt_messages")
        cut = columns.get("truncated")
        extra = {"truncated": list(cut)} if cut is not None else {}
        scorer = state["scorer"]
        scores = scorer(list(full) if full is not None else prompts, completions, **extra)
        why = scorer.unscored  # the samples it could not score, and why (each is NaN in `scores`)
        return [Unscored(f"the reward model cannot score it: {why[i]}") if i in why else float(x)
                for i, x in enumerate(scores)]  # fmt: skip

    reward.prepare = None
    reward.collective = False  # True once the run shards the model: a failed batch then stops the run (`rewards.compute`)
    # never retried sample by sample (`rewards.compute`): a sample it cannot score is already `Unscored`, and a
    # sharded model's forwards are collectives, which every process must run as many of
    reward.retry_per_sample = False
    return reward


def code_exec(
    *,
    column: str = "tests",
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    max_processes: int = 32,
    workers: int | None = None,
    all_or_nothing: bool = False,
) -> RewardFn:
    """The fraction of tests passed (or, with `all_or_nothing`, 1.0 only when all pass) by the completion's
    program (`sandbox.extract_code`) run in the sandbox; tests come from `column` (a string of asserts or a
    list of snippets, see `sandbox.split_tests`). Fractions give partial credit, a denser signal. Tests that
    define ``check(candidate)`` and never call it (HumanEval's) are called on the row's `entry_point` column.

    >>> fn = code_exec(timeout_s=5)
    >>> fn(["q"], ["```python\\ndef sq(x):\\n    return x * x\\n```"], tests=["assert sq(3) == 9\\nassert sq(2) == 5"])
    [0.5]
    """
    limits = sandbox.Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)
    timeouts = [0]  # programs that ran past the limit since `events` was last read

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        tests = _column(columns, column, "code_exec")
        # HumanEval's tests define check(candidate) and leave the call to the harness: made here from the row's
        # entry_point (a row without one is refused before the run, `checks.check_reward_inputs`)
        entries = columns.get("entry_point") or [None] * len(tests)
        tests = [sandbox.with_check_call(t, e) for t, e in zip(tests, entries)]
        codes = [sandbox.extract_code(c) for c in completions]
        results = sandbox.run_many(codes, list(tests), limits=limits, workers=workers)
        timeouts[0] += sum(r.timed_out for r in results)
        if all_or_nothing:
            return [float(r.total > 0 and r.passed == r.total) for r in results]
        return [r.fraction for r in results]

    def events() -> dict[str, int]:
        """The programs that ran past `timeout_s` since the last read (`compute.RewardResult.events`)."""
        counted, timeouts[0] = timeouts[0], 0
        return {"timeouts": counted}

    reward.events = events
    reward.event_notes = {"timeouts": (
        f"programs ran past timeout_s={timeout_s:g} s and were scored on the tests they passed before it (a wall-clock "
        "limit: a slower or busier machine scores the same program lower; raise timeout_s if right programs are slow)")}
    return reward


def random_reward(*, p: float = 0.5, seed: int = 0) -> RewardFn:
    """1.0 with chance `p`, else 0.0, whatever the completion says: the control for gains that do not come from
    the reward (a "spurious" reward, Shao et al. 2025, "Spurious Rewards: Rethinking Training Signals in RLVR";
    `posttrain study`'s random-reward GRPO arm). Each value is drawn from a hash of (seed, prompt, completion),
    so a sample always gets the same reward (a resumed run scores as the first did) and nothing reads the answer.

    >>> fn = random_reward(seed=1)
    >>> fn(["q", "q"], ["a", "a"]) == fn(["q", "q"], ["a", "a"]) and set(fn(["q"] * 50, list("ab" * 25))) == {0.0, 1.0}
    True
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out = []
        for prompt, completion in zip(prompts, completions):
            digest = hashlib.sha256(json.dumps([seed, str(prompt), completion]).encode()).digest()
            out.append(float(int.from_bytes(digest[:8], "big") / 2**64 < p))
        return out

    return reward


def _column(columns: dict[str, Any], name: str, reward: str) -> list:
    if name not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise KeyError(f"reward {reward!r} needs a {name!r} column; the dataset has: {have}")
    return columns[name]


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "numeric_answer": numeric_answer,
    "exact_match": exact_match,
    "regex_format": regex_format,
    "json_schema": json_schema,
    "length_penalty": length_penalty,
    "task": task,
    "reward_model": reward_model,
    "code_exec": code_exec,
    "random": random_reward,
}

__all__ = ["REWARDS", "RewardFn", "final_answer", "numeric_match", "parse_json", "to_number"]
