"""Helpers shared by the built-in tasks: the split names and a per-(task, split, seed) random generator."""

from __future__ import annotations

import random

SPLITS = ("train", "heldout")


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
