"""The arms of the study, the data each trains on, and how each gets the same wall-clock budget.

Every arm starts from the warm start W (merged into its base, so an arm trains fresh LoRA adapters on W) and
trains through `posttrain.train.train` with a run config built from the setting's `runs` fragments:

| arm | trains | on |
|---|---|---|
| `sft-more` | SFT | the fixed-template pairs W was trained on |
| `sft-diverse` | SFT | the same problems and answers, prompts reworded (`data.varied`) |
| `grpo` | GRPO, reward: the task's verifier | the training prompts |
| `dpo-onpolicy` | DPO | pairs of W's own samples, a right one and a wrong one per prompt (`rollout.pairs`, as `posttrain data pairs`) |
| `sft-self` | SFT | W's own samples that the verifier accepts (on-policy data without RL) |
| `grpo-random` | GRPO, reward: `random` (1 with chance 1/2, whatever the answer) | the training prompts: the control for gains that do not come from the reward |

**Matching the budget.** Each arm gets `budget.seconds` of wall-clock on this machine: the seconds it spends
sampling its data before training (DPO's pairs, SFT-self's samples) plus its training steps, generation
included (a GRPO step's rollout is part of its `step_time_s`). Rather than stopping a run on a clock, which
would make the step count, hence the result, depend on the machine's load at that moment and break an exact
resume, the budget is turned into steps once: each arm first runs `budget.calibration_steps` steps (the start of
the real run, not thrown away), their mean `step_time_s` gives its steps, `steps_for_budget`, written to the
arm's `plan.json`; the run then continues (`resume`) to that count, checkpointing at every `steps /
budget.checkpoints` steps. The seconds the arm really took are measured and reported beside the budget, and the
tokens it trained on, so the match can be checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.algorithms import RunConfig, config_from_dict
from posttrain.data import TASKS, write_jsonl
from posttrain.evaluation import generate_answers
from posttrain.rollout.pairs import onpolicy_pairs, task_scorer
from posttrain.study.config import StudyConfig
from posttrain.study.scoring import verdicts

TASK_REWARD = [{"name": "task", "args": {"task": "arithmetic"}}]


@dataclass
class Prepared:
    """An arm's training file, its rows, the seconds spent making it (counted in its budget) and notes."""

    file: str
    rows: int
    seconds: float = 0.0
    stats: dict | None = None


@dataclass
class Condition:
    """One (seed, noise) cell of the study: its folder, its data files and W's merged model folder. `warm_model`
    loads W for sampling (once)."""

    seed: int
    noise: float
    folder: Path
    files: dict[str, Path]
    warm_dir: Path
    warm_model: Callable[[], tuple]


def _file(name: str) -> Callable:
    def prepare(cond: Condition, cfg: StudyConfig, arm_dir: Path, progress: bool) -> Prepared:
        return Prepared(str(cond.files[name]), _count(cond.files[name]))

    return prepare


def _count(path: Path) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def _sampled_rows(cond: Condition, cfg: StudyConfig) -> list[dict]:
    rows = [json.loads(line) for line in cond.files["prompts"].read_text(encoding="utf-8").splitlines()]
    return rows[: cfg.onpolicy.prompts]


def _dpo_pairs(cond: Condition, cfg: StudyConfig, arm_dir: Path, progress: bool) -> Prepared:
    """W's samples on the first `onpolicy.prompts` training prompts, paired (right, wrong) by the verifier."""
    model, tokenizer = cond.warm_model()
    clock = time.perf_counter()
    o = cfg.onpolicy
    pairs, stats = onpolicy_pairs(model, tokenizer, _sampled_rows(cond, cfg), n=o.samples,
                                  scorer=task_scorer(TASKS["arithmetic"]), max_new_tokens=cfg.evaluation.max_new_tokens,
                                  temperature=o.temperature, seed=cond.seed, batch_size=cfg.evaluation.batch_size,
                                  progress=progress)  # fmt: skip
    seconds = time.perf_counter() - clock
    path = write_jsonl(pairs, arm_dir / "pairs.jsonl")
    return Prepared(str(path), len(pairs), seconds, stats)


def _own_samples(cond: Condition, cfg: StudyConfig, arm_dir: Path, progress: bool) -> Prepared:
    """W's samples on the first `onpolicy.prompts` training prompts that the verifier accepts, each distinct
    (prompt, completion) once, as SFT rows (rejection-sampling fine-tuning)."""
    model, tokenizer = cond.warm_model()
    clock = time.perf_counter()
    o = cfg.onpolicy
    repeated = [r for r in _sampled_rows(cond, cfg) for _ in range(o.samples)]
    texts = generate_answers(model, tokenizer, repeated, max_new_tokens=cfg.evaluation.max_new_tokens,
                             batch_size=cfg.evaluation.batch_size, temperature=o.temperature, sample_seed=cond.seed,
                             progress="samples" if progress else None)  # fmt: skip
    right, _ = verdicts([{**r, "id": i} for i, r in enumerate(repeated)], texts)
    kept, seen = [], set()
    for i, (row, text) in enumerate(zip(repeated, texts)):
        if right[i] and (row["id"], text) not in seen:
            seen.add((row["id"], text))
            kept.append({"id": f"{row['id']}-{len(kept)}", "prompt": row["prompt"], "completion": text,
                         "answer": row["answer"]})  # fmt: skip
    seconds = time.perf_counter() - clock
    path = write_jsonl(kept, arm_dir / "own_samples.jsonl")
    return Prepared(str(path), len(kept), seconds, {"sampled": len(texts), "right": sum(right.values())})


@dataclass(frozen=True)
class Arm:
    """What an arm trains: `run` names its fragment in the setting's `runs` (sft, grpo, dpo), `prepare` makes
    its training file, `rewards(seed)` gives GRPO's reward specs."""

    name: str
    label: str
    run: str
    prepare: Callable[[Condition, StudyConfig, Path, bool], Prepared]
    rewards: Callable[[int], list] | None = None


ARMS: dict[str, Arm] = {
    "sft-more": Arm("sft-more", "SFT, more of the same fixed-template pairs", "sft", _file("train")),
    "sft-diverse": Arm("sft-diverse", "SFT, the same answers with reworded prompts", "sft", _file("varied")),
    "grpo": Arm("grpo", "GRPO, the verifier as reward", "grpo", _file("prompts"), lambda seed: TASK_REWARD),
    "dpo-onpolicy": Arm("dpo-onpolicy", "DPO on W's own samples paired by the verifier", "dpo", _dpo_pairs),
    "sft-self": Arm("sft-self", "SFT on W's own verified samples", "sft", _own_samples),
    "grpo-random": Arm("grpo-random", "GRPO, a random reward (control)", "grpo", _file("prompts"),
                       lambda seed: [{"name": "random", "args": {"seed": seed}}]),  # fmt: skip
}


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section.

    >>> deep_merge({"optim": {"lr": 1, "batch_size": 8}}, {"optim": {"lr": 2}, "run": {"seed": 1}})
    {'optim': {'lr': 2, 'batch_size': 8}, 'run': {'seed': 1}}
    """
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_config(cfg: StudyConfig, kind: str, *, model: str, train_file: str | Path, out: Path, seed: int, steps: int,
               save_every: int | None = None, keep: int = 2, rewards: list | None = None, progress: bool = False
               ) -> RunConfig:  # fmt: skip
    """A run config from the setting's `runs.common` and `runs.<kind>` fragments, with the study's own fields:
    the model, data file, run folder, seed, steps and checkpoints (and GRPO's rewards)."""
    ours = {"model": {"name": str(model)}, "data": {"train": str(train_file)},
            "run": {"output_dir": str(out), "seed": seed, "max_steps": steps, "save_every": save_every,
                    "keep_checkpoints": keep, "progress": progress, "report": False, "log_every": 1}}  # fmt: skip
    data = deep_merge(deep_merge(cfg.runs.common, getattr(cfg.runs, kind)), ours)
    if rewards:
        data = deep_merge(data, {"algorithm": {"rewards": list(rewards)}})
    return config_from_dict(data, source=f"study setting runs.common + runs.{kind}")


def steps_for_budget(seconds: float, step_seconds: float, checkpoints: int, calibration: int) -> int:
    """The most steps that take at most `seconds` at `step_seconds` each, rounded down to a multiple of
    `checkpoints` (evenly spaced checkpoints), and never fewer than the `calibration` steps already run, rounded
    up to such a multiple (then the arm overruns its budget, and the report shows by how much).

    Worked examples: 100 s at 7 s a step: 14 fit, 12 with 3 checkpoints; 10 s at 7 s: 1 fits, but 2 were run for
    calibration: 3.

    >>> steps_for_budget(100, 7, 3, 2), steps_for_budget(10, 7, 3, 2), steps_for_budget(100, 7, 1, 2), steps_for_budget(-5, 7, 3, 4)
    (12, 3, 14, 6)
    """
    fit = int(max(seconds, 0.0) // step_seconds) if step_seconds > 0 else calibration
    least = -(-calibration // checkpoints) * checkpoints  # calibration rounded up to a multiple
    return max(fit // checkpoints * checkpoints, least)
