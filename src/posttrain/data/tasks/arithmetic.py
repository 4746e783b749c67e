"""Arithmetic word problems with a numeric answer, and the verifier that extracts and checks it.

A problem starts with a count of items and applies `min_ops`..`max_ops` operations (add, subtract, multiply)
told as sentences; the question asks for the final count and the prompt asks for a final ``Answer: N`` line.
The completion works it out step by step and ends with ``Answer: N``. Difficulty knobs: the number of
operations and `max_value` (the range of the starting count and of the amounts). Sentence wordings are split:
``split="heldout"`` rows use only wordings training never sees.

The verifier takes the marked answer (``Answer: N`` or ``#### N``, the last one if several), else the last
number in the text, and compares numerically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
INSTRUCTION = "Solve the problem. End with a line 'Answer: <number>'."

_MARKED = re.compile(r"(?:Answer:|####)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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
    """
    marked = _MARKED.findall(text)
    if marked:
        return float(marked[-1].replace(",", "")), True
    numbers = _NUMBER.findall(text)
    return (float(numbers[-1].replace(",", "")), False) if numbers else (None, False)


@dataclass(frozen=True)
class Arithmetic:
    """Word problems; `min_ops`/`max_ops` operations, amounts up to `max_value`."""

    min_ops: int = 1
    max_ops: int = 3
    max_value: int = 50
    name: str = "arithmetic"

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
                "metadata": {"task": self.name, "split": split, "n_ops": len(steps)},
            })  # fmt: skip
        return rows

    def verify(self, completion: str, answer: float | int | str) -> dict[str, bool]:
        """``correct`` (numerically equal), ``formatted`` (a marked answer), ``has_number``.

        >>> Arithmetic().verify("12 + 5 = 17.\\nAnswer: 17", 17)
        {'correct': True, 'formatted': True, 'has_number': True}
        >>> Arithmetic().verify("I think it is 16", 17)
        {'correct': False, 'formatted': False, 'has_number': True}
        """
        got, marked = extract_answer(completion)
        want = float(str(answer).replace(",", ""))
        correct = got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
        return {"correct": correct, "formatted": marked, "has_number": got is not None}

    def score(self, completion: str, answer: float | int | str) -> float:
        """1.0 when the answer is numerically right, else 0.0.

        >>> Arithmetic().score("#### 4", "4"), Arithmetic().score("Answer: 5", 4)
        (1.0, 0.0)
        """
        return float(self.verify(completion, answer)["correct"])
