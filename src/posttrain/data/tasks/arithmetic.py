"""Arithmetic word problems with a numeric answer, and the verifier that extracts and checks it.

A problem starts with a count of items and applies `min_ops`..`max_ops` operations (add, subtract, multiply)
told as sentences; the question asks for the final count and the prompt asks for a final ``Answer: N`` line.
The completion works it out step by step and ends with ``Answer: N``. Difficulty knobs: the number of
operations and `max_value` (the range of the starting count and of the amounts). Sentence wordings are split:
``split="heldout"`` rows use only wordings training never sees.

The verifier takes the marked answer (``Answer: N`` or ``#### N``, the last one if several), else the last
number in the text, and compares numerically.

`Arithmetic.rejected` writes worse completions for preference pairs, each scored 0 by the verifier: ``wrong``
(the same steps with one slip, carried through to a wrong ``Answer:``), ``off_format`` (the right value in
words, no digits and no ``Answer:`` line), ``rambling`` (padded narration that either slips or loses track
before the last step).
"""

from __future__ import annotations

import math
import operator
import random
import re
from dataclasses import dataclass, replace
from typing import ClassVar

from posttrain.data.tasks.base import task_rng

NAMES = ("Sam", "Ava", "Noah", "Mia", "Leo", "Zoe", "Omar", "Ines", "Ravi", "Lena", "Kofi", "Yara")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "cards", "pencils", "shells")

# (train wordings, heldout wordings) per sentence kind.
WORDINGS = {
    "start": (("{name} has {n} {items}.", "{name} starts the day with {n} {items}.",
               "There are {n} {items} in {name}'s box."),
              ("{name} owns {n} {items}.", "At first, {name} keeps {n} {items} in a drawer.")),
    "add": (("{name} buys {k} more.", "A friend gives {name} {k} more {items}."),
            ("{name} then finds {k} extra {items}.",)),
    "sub": (("{name} gives away {k} {items}.", "{name} loses {k} of them."),
            ("Then {k} of the {items} are sold.",)),
    "mul": (("Then the number of {items} becomes {k} times as large.", "{name} multiplies the collection by {k}."),
            ("After a lucky trade, {name} has {k} times as many {items}.",)),
    "question": (("How many {items} does {name} have now?",), ("What is the final count of {name}'s {items}?",)),
}  # fmt: skip
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
# Measured on the embedded model: the earlier "End with a line 'Answer: <number>'." made it write a literal "<number>:";
# this wording raised greedy format compliance on one-step additions from 44% to 94% (32 prompts).
INSTRUCTION = "Solve the problem. End your reply with 'Answer:' followed by the number."

_BOLD = r"(?:\*\*|__)?"  # Markdown bold around the marker or the number: "**Answer:** 17", "Answer: **17**"
_MARKER = re.compile(rf"{_BOLD}(?:Answer\s*:|####){_BOLD}", re.IGNORECASE)
_VALUE_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# what a marked answer starts with: the number, or a sum worked out to it ("Answer: 12 + 5 = 17", chained too:
# "3 * 4 = 12 + 5 = 17" is 17); a hedge between two numbers ("17 or 18", bold or not) is no answer. Atomic groups
# around the whitespace: runs of spaces after a marker took seconds to backtrack through (a review: 41 s for 500)
_OP = r"[-+*/x\u00d7\u00f7]"
_MARKED_VALUE = re.compile(rf"(?>\s*{_BOLD}[ \t]*\$?[ \t]*{_BOLD}[ \t]*)(?P<first>{_VALUE_NUMBER})"
                           rf"(?P<sum>(?>(?:[ \t]*{_OP}[ \t]*{_VALUE_NUMBER})+[ \t]*=[ \t]*{_VALUE_NUMBER})+)?"
                           rf"(?P<hedge>(?>[ \t]*{_BOLD}[ \t]*)(?:or|/)(?>[ \t]*{_BOLD}[ \t]*)-?\d)?",
                           re.IGNORECASE)  # fmt: skip
_NUMBER = re.compile(_VALUE_NUMBER)
_STEP = re.compile(r"^(\d+) ([+*-]) (\d+) = (\d+)\.$")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# Rejected completions (see `Arithmetic.rejected`). Off-format ones hold no digit, so the verifier finds no number.
OFF_FORMAT = ("The final count is {words}.", "Working through every change in order, the count ends up at {words}.",
              "{Words}, if I followed the story correctly.")  # fmt: skip
OPENINGS = (
    "Okay, so let me think about this problem really carefully, step by step, because word problems can be "
    "tricky and it is easy to make a mistake if you rush through them.",
    "Alright! This is a classic kind of word problem about counting things. Let me read it again slowly and "
    "make sure I understand every part of the story before I start calculating anything at all.",
    "Hmm, interesting question. Before I calculate anything, I want to restate what we know, since it always "
    "helps to be really clear about the setup of a problem like this one.",
)
ASIDES = ("Let me double-check that, just to be safe.", "That makes sense so far, I believe.",
          "Okay, good, so far so good, moving on to the next part of the story.",
          "I want to be careful here, because this is exactly the kind of place where people slip up.")  # fmt: skip
SAY_OP = {"+": ("we add", "plus"), "-": ("we take away", "minus"), "*": ("we multiply by", "times")}
LOSE_TRACK = (
    "And then there is one more change at the very end of the story. Hmm, this is getting complicated, and I "
    "keep losing track of which amount goes with which sentence, so I should probably re-read the whole "
    "question from the beginning before I commit to a final answer."
)

# ---- Answer-preserving variants of a clean problem (`posttrain diagnose`'s robustness probe) ------------------
# Wordings neither split uses (the `paraphrase` variant), names and items neither split uses (`names`), and
# irrelevant sentences that hold a number and a name (`noop`, the GSM-Symbolic "NoOp" perturbation: a statement
# that looks relevant and changes nothing, Mirzadeh et al. 2024, sec. 4.4).
UNSEEN_WORDINGS = {
    "start": ("{name} is holding {n} {items}.", "In {name}'s bag there are {n} {items}."),
    "add": ("Later, {name} is handed {k} further {items}.", "{name} picks up another {k} {items}."),
    "sub": ("{name} hands {k} of the {items} to a neighbour.", "Afterwards, {k} {items} go missing."),
    "mul": ("{name}'s pile of {items} grows to {k} times its size.",
            "Thanks to a deal, the {items} of {name} are multiplied by {k}."),
    "question": ("How many {items} are with {name} at the end?", "At the end, how many {items} does {name} hold?"),
}  # fmt: skip
UNSEEN_INSTRUCTIONS = (
    "Work it out, then write 'Answer:' and the number on the last line.",
    "Think it through and close your reply with 'Answer:' followed by the result.",
)
UNSEEN_NAMES = ("Priya", "Tomas", "Aiko", "Chidi", "Marta", "Jonas", "Nadia", "Felix")
UNSEEN_ITEMS = ("buttons", "stamps", "crayons", "beads", "tickets", "keys")
NOOP = ("{other} has {m} {other_items} at home.", "Last year, {other} counted {m} {items} at a market.",
        "{other} says that {m} {items} would fit in a small box.")  # fmt: skip
PERTURBATIONS = ("paraphrase", "noop", "names", "reorder", "numbers")
"""The variants `Arithmetic.perturb` makes: every sentence and the instruction in unseen wordings; an irrelevant
sentence with a number and a name before the question; unseen names and items; the question before the facts
(and, when every operation adds or subtracts, the operations in another order that never runs out of items);
other numbers in the same wording, with the answer recomputed (the only variant whose answer changes)."""

# A third family of wordings, for training on varied prompts (`posttrain study`'s SFT-diverse arm: the same problems
# and answers told in other words): neither split of `make`, nor any variant above, uses one of them. Addition and
# subtraction only, and every question is neutral about the operation ("now", never "left").
VARIED_WORDINGS = {
    "start": ("{name} currently has {n} {items}.", "{name} has collected {n} {items}.",
              "On the shelf, {name} keeps {n} {items}."),
    "add": ("{name} gets {k} more {items} from school.", "{name} receives {k} new {items}.",
            "Then {name} wins {k} more {items}."),
    "sub": ("{name} gives {k} {items} to a friend.", "{name} uses up {k} of the {items}.",
            "Then {name} throws away {k} {items}."),
    "question": ("How many {items} does {name} own now?", "What is the number of {items} {name} has now?",
                 "Count {name}'s {items}: how many are there now?"),
}  # fmt: skip
VARIED_INSTRUCTIONS = (
    "Find the answer. Finish with 'Answer:' and then the number.",
    "Solve it and put the result after 'Answer:' on the last line.",
    "Show the working, then end with 'Answer:' followed by the number.",
)
TRAIN_WORDINGS = {kind: train for kind, (train, _) in WORDINGS.items()}
"""The wordings `make(split="train")` draws from, by sentence kind."""
HELDOUT_WORDINGS = {kind: heldout for kind, (_, heldout) in WORDINGS.items()}
"""The wordings `make(split="heldout")` draws from, by sentence kind."""

_SLOT = {"name": r"(?P<name>[A-Z][a-z]+)", "items": r"(?P<items>[a-z]+)", "n": r"(?P<n>\d+)", "k": r"(?P<k>\d+)"}


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def extract_answer(text: str) -> tuple[float | None, bool]:
    """The answer in a completion and whether it was marked (``Answer: N`` / ``#### N``).

    >>> extract_answer("3 + 4 = 7. Answer: 7")
    (7.0, True)
    >>> extract_answer("so #### 1,234")
    (1234.0, True)
    >>> extract_answer("first 3, then 12 apples")
    (12.0, False)
    >>> extract_answer("no idea")
    (None, False)

    The marked answer is the last marker followed by a number: in bold too (`**Answer:** 17`), or a sum worked out
    to it (`Answer: 6 + 9 = 15` is 15, not 6); one hedged between two numbers (`Answer: 17 or 18`) is none (an
    audit found the bold read as unmarked, the sum as its first term and the hedge as right).

    >>> extract_answer("**Answer:** 17\\n\\nCheck: 17 - 5 = 12"), extract_answer("Answer: 6 + 9 = 15\\nThe answer is 15")
    ((17.0, True), (15.0, True))
    >>> extract_answer("Answer: 17 or 18"), extract_answer("Answer: 17. Check: 17 - 5 = 12.")
    ((None, True), (17.0, True))
    """
    text = text.replace("\u2212", "-")  # a typeset minus sign
    for found in reversed(list(_MARKER.finditer(text))):
        value = _MARKED_VALUE.match(text, found.end())
        if value is None:
            continue
        if value["hedge"]:
            return None, True
        result = _NUMBER.findall(value["sum"].rsplit("=", 1)[1])[0] if value["sum"] else value["first"]
        return float(result.replace(",", "")), True
    numbers = _NUMBER.findall(text)
    return (float(numbers[-1].replace(",", "")), False) if numbers else (None, False)


def number_words(n: int) -> str:
    """An integer in English words (no digits).

    >>> number_words(17), number_words(40), number_words(305), number_words(2_071)
    ('seventeen', 'forty', 'three hundred and five', 'two thousand and seventy-one')
    """
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" and {number_words(n % 100)}" if n % 100 else "")
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= size:
            head, rest = divmod(n, size)
            sep = " and " if rest < 100 else ", "
            return f"{number_words(head)} {name}" + (sep + number_words(rest) if rest else "")
    raise AssertionError("unreachable")


def parse_steps(completion: str) -> list[tuple[int, str, int]]:
    """The ``a OP k`` of each ``a OP k = b.`` line of a completion made by `Arithmetic.make`.

    >>> parse_steps("12 + 5 = 17.\\n17 * 2 = 34.\\nAnswer: 34")
    [(12, '+', 5), (17, '*', 2)]
    """
    found = (_STEP.match(line) for line in completion.splitlines())
    return [(int(m[1]), m[2], int(m[3])) for m in found if m]


def _run(
    steps: list[tuple[int, str, int]], slip_at: int = -1, delta: int = 0
) -> list[tuple[int, str, int, int]]:
    """Recompute the steps from the start, adding `delta` to the result of step `slip_at` (the error carries)."""
    value, out = steps[0][0], []
    for i, (_, op, k) in enumerate(steps):
        new = _APPLY[op](value, k) + (delta if i == slip_at else 0)
        out.append((value, op, k, new))
        value = new
    return out


def _slip(steps: list[tuple[int, str, int]], rng: random.Random) -> list[tuple[int, str, int, int]]:
    """The steps with one plausible slip (off by 1, 2 or 10) carried through; the final value always differs,
    since add, subtract and multiply by k >= 1 are strictly increasing in the running value."""
    at, delta = rng.randrange(len(steps)), rng.choice((1, -1, 2, -2, 10, -10))
    run = _run(steps, at, delta)
    if min(new for *_, new in run) <= 0:  # a count never goes to zero or below: slip upwards instead
        run = _run(steps, at, abs(delta))
    return run


def same_number(got: float, want: float, tolerance: float = 1e-6) -> bool:
    """Whether an answer equals the gold one: two whole numbers exactly (1e-6 of 1553414 let 1553413 count, and a
    pair's rejected side score as its chosen one), others within `tolerance` relative to the gold.

    >>> same_number(1553413.0, 1553414.0), same_number(100.0000001, 100.0), same_number(5.0, 5.0)
    (False, True, True)
    """
    if got.is_integer() and want.is_integer():
        return got == want
    return abs(got - want) <= tolerance * max(1.0, abs(want))


def _gold(answer: float | int | str) -> float:
    """A row's gold answer as the verifier reads it (`1,234` included); ValueError when it is no number."""
    return float(str(answer).replace(",", ""))


@dataclass(frozen=True)
class Arithmetic:
    """Word problems; `min_ops`/`max_ops` operations, amounts up to `max_value`."""

    min_ops: int = 1
    max_ops: int = 3
    max_value: int = 50
    name: str = "arithmetic"
    metrics: ClassVar[tuple[str, ...]] = ("correct", "formatted", "has_number")  # what `verify` returns

    def make(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """`n` rows, deterministic in (`seed`, `split`)."""
        rng = task_rng(self.name, seed, split)
        side = 0 if split == "train" else 1

        def say(kind: str, **slots) -> str:
            return rng.choice(WORDINGS[kind][side]).format(**slots)

        rows = []
        for i in range(n):
            name, items = rng.choice(NAMES), rng.choice(ITEMS)
            value = rng.randint(2, self.max_value)
            sentences = [say("start", name=name, n=value, items=items)]
            steps = []
            for _ in range(rng.randint(self.min_ops, self.max_ops)):
                op = rng.choice(("add", "sub", "mul")) if value > 1 else "add"
                if op == "add":
                    k = rng.randint(1, self.max_value)
                elif op == "sub":
                    k = rng.randint(1, value - 1)  # never below 1 item
                else:
                    k = rng.randint(2, 4)
                new = {"add": value + k, "sub": value - k, "mul": value * k}[op]
                sentences.append(say(op, name=name, k=k, items=items))
                steps.append(f"{value} {SYMBOL[op]} {k} = {new}.")
                value = new
            sentences.append(say("question", name=name, items=items))
            rows.append({
                "id": f"arithmetic-{split}-{seed}-{i}",
                "prompt": f"{' '.join(sentences)}\n{INSTRUCTION}",
                "completion": "\n".join(steps) + f"\nAnswer: {value}",
                "answer": value,
                "metadata": {"task": self.name, "split": split, "n_ops": len(steps), "max_value": self.max_value},
            })  # fmt: skip
        return rows

    def answer_problem(self, answer) -> str | None:
        """Why `verify` cannot compare with `answer` (None when it can): a finite number, or a text of one.

        >>> Arithmetic().answer_problem("1,234"), Arithmetic().answer_problem("five")
        (None, "'five' is not a number")
        """
        if isinstance(answer, bool) or not isinstance(answer, int | float | str):
            return f"must be a number, got {type(answer).__name__} {answer!r}"
        try:
            value = _gold(answer)
        except ValueError:
            return f"{answer!r} is not a number"
        return None if math.isfinite(value) else f"{answer!r} is not a finite number"

    def verify(self, completion: str, answer: float | int | str) -> dict[str, bool]:
        """``correct`` (numerically equal), ``formatted`` (a marked answer), ``has_number``.

        >>> Arithmetic().verify("12 + 5 = 17.\\nAnswer: 17", 17)
        {'correct': True, 'formatted': True, 'has_number': True}
        >>> Arithmetic().verify("I think it is 16", 17)
        {'correct': False, 'formatted': False, 'has_number': True}
        """
        got, marked = extract_answer(completion)
        want = _gold(answer)
        # whole numbers exactly: 1e-6 of 1553414 let 1553413 count as right (and pairs' rejected side as chosen)
        correct = got is not None and same_number(got, want)
        return {"correct": correct, "formatted": marked, "has_number": got is not None}

    def score(self, completion: str, answer: float | int | str) -> float:
        """1.0 when the answer is numerically right, else 0.0.

        >>> Arithmetic().score("#### 4", "4"), Arithmetic().score("Answer: 5", 4)
        (1.0, 0.0)
        """
        return float(self.verify(completion, answer)["correct"])

    perturbations: ClassVar[tuple[str, ...]] = PERTURBATIONS

    def perturb(self, row: dict, kind: str, rng: random.Random) -> dict | None:
        """A variant of `kind` (one of `PERTURBATIONS`) of a row made by `make`: ``{"id", "perturbs", "kind",
        "prompt", "completion", "answer", "metadata"}``, where ``perturbs`` is the row's id and the answer is the
        row's (recomputed for ``numbers``); None when the prompt was not written by `make`.

        >>> row = Arithmetic().make(1, seed=0, split="heldout")[0]
        >>> v = Arithmetic().perturb(row, "noop", random.Random(0))
        >>> v["id"], v["perturbs"], v["answer"] == row["answer"], len(v["prompt"]) > len(row["prompt"])
        ('arithmetic-heldout-0-0~noop', 'arithmetic-heldout-0-0', True, True)
        """
        prompt = row["prompt"]
        if not isinstance(prompt, str):  # a normalised row: one user message
            prompt = prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else ""
        problem = parse_problem(prompt)
        if problem is None:
            return None
        variant = perturb_problem(problem, kind, rng, self.max_value)
        return {"id": f"{row['id']}~{kind}", "perturbs": row["id"], "kind": kind, "prompt": variant.prompt(),
                "completion": variant.completion(), "answer": variant.answer,
                "metadata": {"task": self.name, "n_ops": len(variant.ops), "max_value": self.max_value}}  # fmt: skip

    def rejected(self, row: dict, kind: str, rng: random.Random) -> str:
        """A worse completion of `kind` (``wrong``, ``off_format``, ``rambling``) for a row made by `make`.

        Every kind scores 0 (see the module docstring).

        >>> row = {"completion": "12 + 5 = 17.\\nAnswer: 17", "answer": 17}
        >>> Arithmetic().rejected(row, "off_format", random.Random(0))
        'Working through every change in order, the count ends up at seventeen.'
        """
        steps, value = parse_steps(row["completion"]), int(row["answer"])
        if kind == "wrong":
            run = _slip(steps, rng)
            return "\n".join(f"{a} {op} {k} = {new}." for a, op, k, new in run) + f"\nAnswer: {run[-1][3]}"
        if kind == "off_format":
            words = number_words(value)
            return rng.choice(OFF_FORMAT).format(words=words, Words=words.capitalize())
        if kind == "rambling":
            return _ramble(steps, rng)
        raise ValueError(f"kind must be wrong, off_format or rambling, got {kind!r}")


def _ramble(steps: list[tuple[int, str, int]], rng: random.Random) -> str:
    """Padded narration that either slips and ends with a wrong ``Answer:``, or loses track before the last step
    (so the last number in the text is the value before the last operation, never the answer)."""
    slips = rng.random() < 0.5
    run = _slip(steps, rng) if slips else _run(steps)
    parts = [rng.choice(OPENINGS), f"So, to begin with, we start with {steps[0][0]}."]
    for a, op, k, new in run if slips else run[:-1]:
        verb, word = SAY_OP[op]
        parts += [
            f"Next, {verb} {k}, so now we have {new}.",
            rng.choice(ASIDES),
            f"Yes: {a} {word} {k} is {new}.",
        ]
    if slips:
        parts.append(f"So after all of that, I am fairly confident about the result.\nAnswer: {run[-1][3]}")
    else:
        parts.append(LOSE_TRACK)
    return " ".join(parts)


@dataclass(frozen=True)
class Problem:
    """The structured facts of one word problem: who, which items, the starting count, each operation
    ``(op, k)`` with op in add/sub/mul, the wording of each sentence (start, one per operation, question) and of
    the instruction; for variants, an `extra` sentence told just before the question and whether the question
    comes first."""

    name: str
    items: str
    start: int
    ops: tuple[tuple[str, int], ...]
    wordings: tuple[str, ...]
    instruction: str = INSTRUCTION
    extra: str = ""
    question_first: bool = False

    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(before, symbol, k, after)`` per operation, in order."""
        return _run([(self.start, SYMBOL[op], k) for op, k in self.ops]) if self.ops else []

    @property
    def answer(self) -> int:
        return self.steps()[-1][3] if self.ops else self.start

    def prompt(self) -> str:
        slots = {"name": self.name, "items": self.items}
        story = [self.wordings[0].format(n=self.start, **slots)]
        story += [w.format(k=k, **slots) for w, (_, k) in zip(self.wordings[1:-1], self.ops)]
        story += [self.extra.format(**slots)] if self.extra else []
        question = self.wordings[-1].format(**slots)
        told = [question, *story] if self.question_first else [*story, question]
        return f"{' '.join(told)}\n{self.instruction}"

    def completion(self) -> str:
        """Worked out step by step, as `Arithmetic.make` writes it."""
        steps = "".join(f"{a} {op} {k} = {new}.\n" for a, op, k, new in self.steps())
        return f"{steps}Answer: {self.answer}"


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else _SLOT[p] for i, p in enumerate(parts)))


_KNOWN = {kind: [(w, _pattern(w)) for w in (*train, *heldout)] for kind, (train, heldout) in WORDINGS.items()}


def parse_problem(prompt: str) -> Problem | None:
    """The facts of a prompt written by `Arithmetic.make` (either split), or None for any other text.

    >>> p = parse_problem("Sam has 5 apples. Sam buys 3 more. How many apples does Sam have now?\\n" + INSTRUCTION)
    >>> p.name, p.items, p.start, p.ops, p.answer
    ('Sam', 'apples', 5, (('add', 3),), 8)
    """
    story, _, instruction = prompt.rpartition("\n")
    if instruction != INSTRUCTION:
        return None
    found, pos, slots = [], 0, {}
    while pos < len(story) and (not found or found[-1][0] != "question"):
        kinds = ("start",) if not found else ("add", "sub", "mul", "question")
        hit = next(((kind, w, m) for kind in kinds for w, pat in _KNOWN[kind]
                    if (m := pat.match(story, pos)) and story[m.end():m.end() + 1] in ("", " ")), None)  # fmt: skip
        if hit is None:
            return None
        for slot in ("name", "items"):  # the same person and items throughout
            value = hit[2].groupdict().get(slot)
            if value is not None and slots.setdefault(slot, value) != value:
                return None
        found.append(hit)
        pos = hit[2].end() + 1
    if pos < len(story) or not found or found[-1][0] != "question" or len(slots) < 2:
        return None
    ops = tuple((kind, int(m["k"])) for kind, _, m in found[1:-1])
    return Problem(slots["name"], slots["items"], int(found[0][2]["n"]), ops, tuple(w for _, w, _ in found))


def perturb_problem(p: Problem, kind: str, rng: random.Random, max_value: int = 50) -> Problem:
    """One variant of `p` (see `PERTURBATIONS`), with the same answer except for ``numbers``.

    >>> p = parse_problem("Sam has 5 apples. Sam buys 3 more. How many apples does Sam have now?\\n" + INSTRUCTION)
    >>> q = perturb_problem(p, "reorder", random.Random(0))
    >>> q.prompt().split("\\n")[0], q.answer
    ('How many apples does Sam have now? Sam has 5 apples. Sam buys 3 more.', 8)
    """
    if kind == "paraphrase":
        return reword(p, UNSEEN_WORDINGS, rng, UNSEEN_INSTRUCTIONS)
    if kind == "names":
        return replace(p, name=rng.choice(UNSEEN_NAMES), items=rng.choice(UNSEEN_ITEMS))
    if kind == "noop":
        other_items = rng.choice([i for i in ITEMS if i != p.items])
        extra = rng.choice(NOOP).format(other=rng.choice([n for n in NAMES if n != p.name]), m=rng.randint(2, 9),
                                        other_items=other_items, items="{items}")  # fmt: skip
        return replace(p, extra=extra)
    if kind == "reorder":
        return replace(_shuffled_ops(p, rng), question_first=True)
    if kind == "numbers":
        return _new_numbers(p, rng, max_value)
    raise ValueError(f"kind must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")


def sentence_kinds(p: Problem) -> list[str]:
    """The kind of each of `p`'s sentences, in the order of `p.wordings`: start, one per operation, question.

    >>> sentence_kinds(Problem("Sam", "apples", 5, (("add", 3), ("sub", 2)), ("", "", "", "")))
    ['start', 'add', 'sub', 'question']
    """
    return ["start", *(op for op, _ in p.ops), "question"]


def reword(p: Problem, wordings: dict[str, tuple[str, ...]], rng: random.Random,
           instructions: tuple[str, ...] = ()) -> Problem:  # fmt: skip
    """`p` with each sentence whose kind has an entry in `wordings` told in one of its wordings (drawn in
    sentence order), and the instruction drawn from `instructions` when they are given; the facts, hence the
    answer, stay the same.

    >>> p = parse_problem("Sam has 5 apples. Sam gives away 3 apples. How many apples does Sam have now?\\n"
    ...                   + INSTRUCTION)
    >>> reword(p, {"sub": ("{name} drops {k} {items}.",)}, random.Random(0)).prompt().split("\\n")[0]
    'Sam has 5 apples. Sam drops 3 apples. How many apples does Sam have now?'
    """
    words = tuple(rng.choice(wordings[kind]) if kind in wordings else w for kind, w in zip(sentence_kinds(p), p.wordings))
    return replace(p, wordings=words, instruction=rng.choice(instructions) if instructions else p.instruction)


def draw_problem(rng: random.Random, ops: tuple[str, ...], *, max_value: int = 50,
                 wordings: dict[str, tuple[str, ...]] = TRAIN_WORDINGS, names: tuple[str, ...] = NAMES,
                 items: tuple[str, ...] = ITEMS) -> Problem:  # fmt: skip
    """A problem with the operations `ops` (add, sub, mul) in this order, its numbers drawn as `make` draws them
    (a start in 2..max_value; add 1..max_value, sub 1..count-1, mul 2..4: a count never drops below 1), its
    person, items and sentences drawn from `names`, `items` and `wordings` (by kind; default the train split's).
    `make` itself is unchanged: this is for callers that choose the operations (`posttrain study` trains on a set
    share of additions).

    >>> p = draw_problem(random.Random(0), ("sub",), max_value=10)
    >>> [op for op, _ in p.ops], 1 <= p.answer < p.start <= 10, p.instruction == INSTRUCTION
    (['sub'], True, True)
    """
    while True:
        start = rng.randint(2, max_value)
        drawn = _draw_amounts(rng, start, ops, max_value)
        if drawn is not None:
            break
    name, item = rng.choice(names), rng.choice(items)
    words = (rng.choice(wordings["start"]), *(rng.choice(wordings[op]) for op in ops), rng.choice(wordings["question"]))
    return Problem(name, item, start, tuple(drawn), words)


def _draw_amounts(rng: random.Random, start: int, ops, max_value: int) -> list[tuple[str, int]] | None:
    """An amount for each of `ops` from `start` (add 1..max_value, subtract 1..count-1, multiply by 2..4), in
    order; None when a subtraction would find a count of 1 or less (the caller draws again)."""
    value, drawn = start, []
    for op in ops:
        if op == "sub" and value <= 1:
            return None
        low, high = {"add": (1, max_value), "sub": (1, value - 1), "mul": (2, 4)}[op]
        k = rng.randint(low, high)
        value = {"add": value + k, "sub": value - k, "mul": value * k}[op]
        drawn.append((op, k))
    return drawn


def _shuffled_ops(p: Problem, rng: random.Random) -> Problem:
    """`p` with its operations in another order, when they all add or subtract (so the final count is the same)
    and some order tried never takes the count below 1; else `p` as it is."""
    order = list(range(len(p.ops)))
    if len(order) < 2 or any(op == "mul" for op, _ in p.ops):
        return p
    for _ in range(20):
        rng.shuffle(order)
        counts = [p.start]
        for op, k in (p.ops[i] for i in order):
            counts.append(counts[-1] + (k if op == "add" else -k))
        if min(counts) >= 1 and order != sorted(order):
            middle = tuple(p.wordings[1 + i] for i in order)
            return replace(p, ops=tuple(p.ops[i] for i in order), wordings=(p.wordings[0], *middle, p.wordings[-1]))
    return p


def _new_numbers(p: Problem, rng: random.Random, max_value: int) -> Problem:
    """The same operations and wording with other amounts, drawn as `Arithmetic.make` draws them (a count never
    drops below 1); the start differs from `p`'s, so the problem changes and its answer is recomputed."""
    while True:
        start = rng.randint(2, max_value)
        ops = _draw_amounts(rng, start, [op for op, _ in p.ops], max_value)
        if ops is not None and start != p.start:
            return replace(p, start=start, ops=tuple(ops))
