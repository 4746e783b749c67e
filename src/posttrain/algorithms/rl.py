"""What the reinforcement-learning methods share besides their sections (`config.RLSection`): their data.

An RL run's data is prompts (`data.prompts`); its reward functions are built here once before the model loads,
so that a bad spec, a user file that does not import, a built-in's wrong argument or a column a reward needs
and the rows lack fails in seconds (`rewards.checks`), not hours into the run. The functions are built again,
cheaply, by the rollout source; a reward model loads on its first call.

Not a method (it defines no `ALGORITHM`): GRPO, PPO and RLOO use `prepare` as theirs.
"""

from __future__ import annotations

from posttrain.data.prepared import PreparedData
from posttrain.data.prompts import read_prompt_rows, render_prompts
from posttrain.rewards import build_reward_functions, parse_reward_specs
from posttrain.rewards.checks import check_reward_inputs


def prepare(cfg, tokenizer) -> PreparedData:
    """Read and render the prompts of `data.train` and check that the run's rewards can score them."""
    specs = parse_reward_specs(cfg.algorithm.reward_specs())
    build_reward_functions(specs)
    rows = read_prompt_rows(cfg)
    check_reward_inputs(specs, rows, cfg.data.train)
    return render_prompts(cfg, tokenizer, rows)


def reference_mode(cfg, needed: bool) -> str:
    """The reference of an RL run that needs one: the base with the adapter disabled under LoRA/QLoRA (no memory),
    else a frozen copy; "none" when the loss and the logs need no reference."""
    if not needed:
        return "none"
    return "adapter" if cfg.technique.name in ("lora", "qlora") else "copy"
