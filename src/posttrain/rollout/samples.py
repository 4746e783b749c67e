"""`RUN/samples.jsonl`: a few sampled completions with their rewards, from every Nth rollout of a GRPO or PPO run.

Curves say that the mean reward rose; only the completions say how (the answer learned, or a format gamed, or a
length exploited). So the main process keeps `SAMPLES_PER_ROLLOUT` completions of the first rollout, of every
`sample_every(...)`-th one after it, and of the last, so that a run of any length keeps about `SAMPLED_ROLLOUTS`
rollouts' worth. One JSON object per line:

    {"step": 1, "rollout": 0, "sequence": 0, "prompt": "...", "completion": "...",
     "rewards": {"task": 1.0, "regex_format": 0.0}, "total": 1.0, "truncated": false, "length": 15}

`step` is the first optimisation step the rollout feeds, `sequence` the completion's position in this process's
rollout (`G` contiguous ones per prompt), `rewards` each function's unweighted value and `total` the reward the
algorithm used (weighted sum, after `rollout.overlong`). The samples are spread over the rollout (different
prompts where there are several), from the main process's share of it. A resumed run replaces the records of the
rollouts it samples (the stopped run may have logged them before it stopped); a rollout the checkpoint kept
(`rollout.source`: a checkpoint inside a rollout) keeps its records. `posttrain report` shows them.

It does not change training: it only reads what the rollout already computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from posttrain.data.order import total_steps
from posttrain.data.readers import truncate_step_records

SAMPLES_PER_ROLLOUT = 4
SAMPLED_ROLLOUTS = 15
"""About how many rollouts of a run keep samples (a short run keeps every rollout's)."""


def sample_every(rollouts: int, keep: int = SAMPLED_ROLLOUTS) -> int:
    """Every how many rollouts samples are kept, so that a run of `rollouts` keeps about `keep` of them.

    >>> sample_every(10), sample_every(15), sample_every(16), sample_every(100)
    (1, 1, 2, 7)
    """
    return max(1, math.ceil(rollouts / keep))


def spread(n: int, k: int) -> list[int]:
    """`k` positions spread evenly over `n` (all of them when n <= k): one per prompt group when G divides n / k.

    >>> spread(32, 4), spread(3, 4)
    ([0, 8, 16, 24], [0, 1, 2])
    """
    return list(range(n)) if n <= k else [i * n // k for i in range(k)]


class SampleLog:
    """Appends the chosen rollouts' samples to `RUN/samples.jsonl` (module docstring); a no-op off the main
    process."""

    def __init__(self, path: Path, *, every: int, last: int, steps_per_rollout: int, enabled: bool,
                 k: int = SAMPLES_PER_ROLLOUT):  # fmt: skip
        self.path, self.every, self.last, self.k = Path(path), every, last, k
        self.steps_per_rollout, self.enabled = steps_per_rollout, enabled
        self.fresh = True  # nothing written by this process yet: older records from here on are replaced

    @classmethod
    def for_run(cls, cfg, *, steps_per_rollout: int, steps_per_epoch: int, main_process: bool) -> SampleLog:
        run = cfg.run
        rollouts = math.ceil(total_steps(run.max_steps, run.epochs, steps_per_epoch) / steps_per_rollout)
        return cls(Path(run.output_dir) / "samples.jsonl", every=sample_every(rollouts), last=rollouts - 1,
                   steps_per_rollout=steps_per_rollout, enabled=main_process)  # fmt: skip

    def chosen(self, index: int) -> bool:
        return index % self.every == 0 or index == self.last

    def write(self, index: int, examples, rollout, result, rewards: torch.Tensor) -> None:
        """Record `k` samples of rollout `index`: `examples` (one per sequence), the engine's `Rollout`, the
        `RewardResult` (per-function values) and the (N,) rewards the algorithm uses."""
        if not self.enabled or not self.chosen(index):
            return
        step = index * self.steps_per_rollout + 1
        if self.fresh:  # a resumed run: this rollout and later ones were sampled before, by other weights
            truncate_step_records(self.path, step - 1)
            self.fresh = False
        lines = []
        for i in spread(len(rollout.texts), self.k):
            lines.append({
                "step": step,
                "rollout": index,
                "sequence": i,
                "prompt": examples[i].prompt,
                "completion": rollout.texts[i],
                "rewards": {name: values[i] for name, values in result.per_function.items()},
                "total": float(rewards[i]),
                "truncated": bool(rollout.truncated[i]),
                "length": int(rollout.lengths[i]),
            })  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
