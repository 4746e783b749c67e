"""Score one model on one seed's evaluation rows: greedy verdicts per row, the shortcut answers, pass@k samples
and the drift from the base (through `posttrain.evaluation` and `posttrain.diagnose`'s probes).

What counts as right is the arithmetic task's verifier (`Arithmetic.verify`: the marked answer, else the last
number, equals the answer). A subtraction answered with start + k is a shortcut error, counted apart (it is also
wrong). Drift is `diagnose.drift.compare`: forward and reverse KL from the base, token means over the model's
greedy completions of the in-distribution prompts, and top-1 agreement with the base on its own continuations of
the unrelated `drift.PROBES`.

`load_checkpoint_model` builds a checkpoint's model for scoring (the run's base with its trained adapters).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.data.tasks.arithmetic import Arithmetic, extract_answer
from posttrain.diagnose.drift import PROBES, compare
from posttrain.evaluation import generate_answers
from posttrain.models import load_model
from posttrain.study.config import EvalSettings
from posttrain.trainer.checkpoint import load_trainable

VERIFIER = Arithmetic()


@dataclass
class Scores:
    """One model on one seed's rows. `correct`: row id -> 1 right, 0 wrong (greedy); `shortcut`: subtraction row
    id -> 1 when the greedy answer is start + k; `sampled`: sampled row id -> how many of its `samples` were
    right; `drift`: {"task": ..., "probe": ...} (`diagnose.drift.Comparison` fields) or None."""

    correct: dict[str, int]
    shortcut: dict[str, int]
    samples: int = 0
    sampled: dict[str, int] = field(default_factory=dict)
    drift: dict | None = None
    seconds: float = 0.0
    completions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        return cls(**d)


def verdicts(rows: Sequence[dict], completions: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(right, shortcut) per row id: right by the task's verifier; shortcut for rows with a `shortcut` number,
    1 when the answer found is that number.

    >>> verdicts([{"id": "a", "answer": 5, "shortcut": 13}, {"id": "b", "answer": 7, "shortcut": None}],
    ...          ["9 + 4 = 13.\\nAnswer: 13", "Answer: 7"])
    ({'a': 0, 'b': 1}, {'a': 1})
    """
    right, shortcut = {}, {}
    for row, text in zip(rows, completions, strict=True):
        right[row["id"]] = int(VERIFIER.score(text, row["answer"]) >= 1.0)
        if row.get("shortcut") is not None:
            got, _ = extract_answer(text)
            shortcut[row["id"]] = int(got is not None and abs(got - row["shortcut"]) < 1e-6)
    return right, shortcut


def score_model(
    model, tokenizer, rows: Sequence[dict], ev: EvalSettings, *, seed: int, sample_rows: Sequence[dict] = (),
    base=None, probe_texts: Sequence[str] = (), progress: bool = False,
) -> Scores:  # fmt: skip
    """Greedy answers to `rows`; `ev.samples` samples at `ev.temperature` of each of `sample_rows`; with a
    `base`, the drift from it on the greedy completions of the `id` rows and on `probe_texts` (the base's own
    continuations of `PROBES`)."""
    clock = time.perf_counter()
    was = model.training
    model.eval()
    greedy = generate_answers(model, tokenizer, rows, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                              progress="greedy" if progress else None)  # fmt: skip
    right, shortcut = verdicts(rows, greedy)
    scores = Scores(right, shortcut, completions={r["id"]: c for r, c in zip(rows, greedy)})
    if sample_rows:
        repeated = [r for r in sample_rows for _ in range(ev.samples)]  # each prompt's samples side by side
        texts = generate_answers(model, tokenizer, repeated, max_new_tokens=ev.max_new_tokens,
                                 batch_size=ev.batch_size, temperature=ev.temperature, sample_seed=seed,
                                 progress="samples" if progress else None)  # fmt: skip
        ok, _ = verdicts([{**r, "id": i} for i, r in enumerate(repeated)], texts)
        scores.samples = ev.samples
        scores.sampled = {r["id"]: sum(ok[i * ev.samples + j] for j in range(ev.samples))
                          for i, r in enumerate(sample_rows)}  # fmt: skip
    if base is not None:
        task = [r for r in rows if r["split"] == "id"]
        scores.drift = {"task": asdict(compare(model, base, tokenizer, [r["prompt"] for r in task],
                                               [scores.completions[r["id"]] for r in task])),
                        "probe": asdict(compare(model, base, tokenizer, list(PROBES), list(probe_texts)))}  # fmt: skip
    model.train(was)
    scores.seconds = time.perf_counter() - clock
    return scores


def load_checkpoint_model(base: str | Path, technique: TechniqueConfig, checkpoint: str | Path):
    """The model of a run's checkpoint, for scoring: `base` with fresh adapters of `technique`, then the
    checkpoint's trained parameters (`trainer.checkpoint.load_trainable`); frozen, in eval mode."""
    model = load_model(ModelConfig(name=str(base)), technique, train=True)
    load_trainable(model, Path(checkpoint))
    model.requires_grad_(False)
    model.eval()
    return model
