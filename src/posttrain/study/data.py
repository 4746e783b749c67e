"""The study's data, per seed: one-step arithmetic word problems trained mostly on one phrasing family, and
evaluation splits that change one thing each, with matched number ranges.

Training (`train`): `task.train_rows` one-step problems, `task.add_share` of them additions and the rest
subtractions, told in the train split's wordings (arithmetic's `TRAIN_WORDINGS`: "buys more", "a friend gives";
"gives away", "loses") with its names and items, each with its worked answer. The same problems feed every arm:
the fixed-template SFT pairs (W, SFT-more), their prompts reworded (`varied`, SFT-diverse: each sentence and the
instruction drawn from the train wordings and arithmetic's `VARIED_WORDINGS`, the answers unchanged), and the
prompts alone (GRPO, DPO's and SFT-self's sampling). A noise condition replaces the completions of a share of
them with a wrong worked answer (arithmetic's `rejected(kind="wrong")`: one slip carried through).

Evaluation (`eval`), scored by every arm on the same rows:

| split | what it is | paired with |
|---|---|---|
| `id` | new problems in the training wordings, names and items; half additions, half subtractions; never the numbers of a training problem | |
| `paraphrase` | each `id` problem with every sentence and the instruction in wordings no training data uses (`perturb_problem`) | its `id` problem |
| `noop` | each `id` problem with an irrelevant sentence holding a number and a name (GSM-Symbolic's NoOp) | its `id` problem |
| `names` | each `id` problem with names and items no training data uses | its `id` problem |
| `rare_op` | each `id` subtraction with only its operation sentence in an unseen wording (the held-out split's and the variants' subtraction wordings) | its `id` problem |

Every evaluation row keeps `op` and, for a subtraction, `shortcut`: the number a model that adds instead of subtracting
would answer (start + k), counted apart as the shortcut error; training rows keep the same under `metadata`
(with `wrong`: whether the noise condition replaced its completion), where the data schema allows extra facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.data.tasks import make_perturbed
from posttrain.data.tasks.arithmetic import (
    HELDOUT_WORDINGS,
    INSTRUCTION,
    TRAIN_WORDINGS,
    UNSEEN_WORDINGS,
    VARIED_INSTRUCTIONS,
    VARIED_WORDINGS,
    Arithmetic,
    Problem,
    draw_problem,
    reword,
)
from posttrain.study.config import TaskSettings

SPLITS = ("id", "paraphrase", "noop", "names", "rare_op")
OOD_SPLITS = SPLITS[1:]
VARIANTS = ("paraphrase", "noop", "names")  # made by arithmetic's `perturb_problem`
RARE_OP_WORDINGS = {"sub": (*HELDOUT_WORDINGS["sub"], *UNSEEN_WORDINGS["sub"])}
"""Subtraction told in wordings no training data uses: the held-out split's and the variants'."""
DIVERSE_WORDINGS = {kind: (*TRAIN_WORDINGS[kind], *VARIED_WORDINGS[kind]) for kind in VARIED_WORDINGS}
DIVERSE_INSTRUCTIONS = (INSTRUCTION, *VARIED_INSTRUCTIONS)


@dataclass
class SeedData:
    """One seed's rows (module docstring). `eval` holds every split's rows, each with its `split`."""

    train: list[dict]
    varied: list[dict]
    prompts: list[dict]
    eval: list[dict]

    def split(self, name: str) -> list[dict]:
        return [r for r in self.eval if r["split"] == name]


def shortcut(p: Problem) -> int | None:
    """What a model that adds every amount would answer, for a problem with a subtraction; None without one.

    >>> shortcut(Problem("Sam", "apples", 9, (("sub", 4),), ("", "", ""))), shortcut(Problem("Sam", "x", 9,
    ...     (("add", 4),), ("", "", "")))
    (13, None)
    """
    if all(op != "sub" for op, _ in p.ops):
        return None
    value = p.start
    for op, k in p.ops:
        value = value * k if op == "mul" else value + k
    return value


def _row(p: Problem, row_id: str, **extra) -> dict:
    return {"id": row_id, "prompt": p.prompt(), "completion": p.completion(), "answer": p.answer,
            "op": p.ops[0][0], "shortcut": shortcut(p), **extra}  # fmt: skip


def _training_row(p: Problem, row_id: str) -> dict:
    """An SFT row (the extra facts under `metadata`, where the data schema keeps them)."""
    return {"id": row_id, "prompt": p.prompt(), "completion": p.completion(), "answer": p.answer,
            "metadata": {"task": "arithmetic", "op": p.ops[0][0], "shortcut": shortcut(p), "wrong": False}}  # fmt: skip


def make_seed_data(t: TaskSettings, seed: int, noise: float = 0.0) -> SeedData:
    """The training and evaluation rows of one seed (module docstring); equal arguments give equal rows, and the
    evaluation rows do not depend on `noise`."""
    rng = random.Random(f"posttrain-study:{seed}:train")
    n_add = round(t.add_share * t.train_rows)
    ops = ["add"] * n_add + ["sub"] * (t.train_rows - n_add)
    rng.shuffle(ops)
    problems = [draw_problem(rng, (op,), max_value=t.max_value) for op in ops]
    train = [_training_row(p, f"s{seed}-train-{i}") for i, p in enumerate(problems)]
    _corrupt(train, noise, random.Random(f"posttrain-study:{seed}:noise:{noise}"))
    varied_rng = random.Random(f"posttrain-study:{seed}:varied")
    varied = [{**row, "metadata": dict(row["metadata"]), "prompt": reword(p, DIVERSE_WORDINGS, varied_rng, DIVERSE_INSTRUCTIONS).prompt()}
              for p, row in zip(problems, train)]  # fmt: skip
    prompts = [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"],
                "metadata": {"task": "arithmetic", "op": r["metadata"]["op"]}} for r in train]  # fmt: skip
    seen = {(p.ops, p.start) for p in problems}
    return SeedData(train, varied, prompts, _eval_rows(t, seed, seen))


def _corrupt(rows: list[dict], noise: float, rng: random.Random) -> None:
    """Give round(noise * len(rows)) of the rows, drawn by `rng`, a wrong worked answer, in place."""
    wrong = rng.sample(range(len(rows)), round(noise * len(rows)))
    for i in sorted(wrong):
        rows[i]["completion"] = Arithmetic().rejected(rows[i], "wrong", rng)
        rows[i]["metadata"]["wrong"] = True


def _eval_rows(t: TaskSettings, seed: int, seen: set) -> list[dict]:
    rng = random.Random(f"posttrain-study:{seed}:eval")
    clean: list[tuple[Problem, dict]] = []
    while len(clean) < t.eval_problems:
        op = ("add", "sub")[len(clean) % 2]  # alternating: half additions, half subtractions
        p = draw_problem(rng, (op,), max_value=t.max_value)
        if (p.ops, p.start) in seen:  # never the numbers of a training problem (or of another eval problem)
            continue
        seen.add((p.ops, p.start))
        clean.append((p, _row(p, f"s{seed}-id-{len(clean)}", split="id", perturbs=None)))
    rows = [row for _, row in clean]
    by_id = {row["id"]: row for row in rows}
    task = Arithmetic(min_ops=1, max_ops=1, max_value=t.max_value)
    for v in make_perturbed(task, rows, seed=seed, kinds=VARIANTS):
        clean_row = by_id[v["perturbs"]]
        rows.append({"id": v["id"], "prompt": v["prompt"], "completion": v["completion"], "answer": v["answer"],
                     "op": clean_row["op"], "shortcut": clean_row["shortcut"], "split": v["kind"],
                     "perturbs": v["perturbs"]})  # fmt: skip
    for p, row in clean:
        if row["op"] == "sub":
            q = reword(p, RARE_OP_WORDINGS, random.Random(f"posttrain-study:{seed}:rare_op:{row['id']}"))
            rows.append(_row(q, f"{row['id']}~rare_op", split="rare_op", perturbs=row["id"]))
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(rows, key=lambda r: order[r["split"]])  # stable: each split in its problems' order
