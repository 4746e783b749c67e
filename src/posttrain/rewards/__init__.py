"""Rewards for RL (GRPO, PPO): plain functions ``fn(prompts, completions, **columns) -> list[float]``.

- `builtin`: the built-in rewards by name (`REWARDS`): numeric_answer, exact_match, regex_format,
  json_schema, length_penalty, task, reward_model, code_exec;
- `spec`: reward specs from ``algorithm.rewards`` -> checked `RewardSpec` -> `NamedReward`, including
  user functions loaded from ``path/to/file.py:function``;
- `compute`: call them on a batch, weight, sum, turn failures into a fallback and count them
  (`compute_rewards`, `reward_metrics`);
- `sandbox`: run generated code against tests in a limited child process (`run_code`, `run_many`).

Importing this package loads no model, no sympy and starts no process. See docs/rewards.md.
"""

from posttrain.rewards.builtin import REWARDS, RewardFn
from posttrain.rewards.compute import RewardResult, compute_rewards, reward_metrics, row_columns
from posttrain.rewards.spec import NamedReward, RewardSpec, build_reward_functions, parse_reward_specs

__all__ = [
    "REWARDS",
    "NamedReward",
    "RewardFn",
    "RewardResult",
    "RewardSpec",
    "build_reward_functions",
    "compute_rewards",
    "row_columns",
    "parse_reward_specs",
    "reward_metrics",
]
