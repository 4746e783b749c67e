"""Helpers shared by the built-in tasks: the split names, the kinds of rejected answer, a seeded generator."""

from __future__ import annotations

import random

SPLITS = ("train", "heldout")
# What a built-in preference pair's rejected completion does wrong (see `make_pairs`): a wrong value in the
# right format; the right content in the wrong format; or a long-winded, padded answer that scores lower.
REJECTED_KINDS = ("wrong", "off_format", "rambling")


def task_rng(task: str, seed: int, split: str) -> random.Random:
    """A generator private to (task, split, seed): the two splits draw different values from one seed.

    >>> task_rng("t", 0, "train").random() == task_rng("t", 0, "train").random()
    True
    >>> task_rng("t", 0, "train").random() == task_rng("t", 0, "heldout").random()
    False
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"{task}:{split}:{seed}")  # str seeds hash with SHA-512: stable across runs
