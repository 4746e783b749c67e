"""Every setting is read by the run or refused: the table `config_rules.APPLIES`, one case per conditional row.

Each case gives a non-default value, a run that does not read the field (refused: the message names the field,
the value and the method) and, where one exists, a run that does (accepted, and its resolved config.yaml loads
again). A new field needs a row in APPLIES; a new conditional row needs a case here."""

import pytest

from posttrain.config import describe_fields, dump_config, load_config
from posttrain.config_rules import ALWAYS, APPLIES, default_of, value_of
from posttrain.errors import ConfigError

RL_REWARD = {"algorithm.rewards": "[task]"}
SFT = {"algorithm.name": "sft"}
REWARD = {"algorithm.name": "reward"}
DPO = {"algorithm.name": "dpo"}
GRPO = {"algorithm.name": "grpo", **RL_REWARD}
PPO = {"algorithm.name": "ppo", **RL_REWARD}
FULL, LORA, QLORA = ({"technique.name": t} for t in ("full", "lora", "qlora"))

# field: (non-default value, a run that does not read it, a run that does or None where no value but the default
# passes the other checks)
CASES = {
    "technique.r": (8, FULL, LORA),
    "technique.alpha": (8, FULL, QLORA),
    "technique.dropout": (0.1, FULL, LORA),
    "technique.target_modules": ("[q_proj, v_proj]", FULL, QLORA),
    "technique.quant_type": ("fp4", LORA, QLORA),
    "technique.double_quant": ("false", FULL, QLORA),
    "data.eval": ("held.jsonl", GRPO, REWARD),
    "data.train_on": ("all", DPO, SFT),
    "data.packing": ("true", REWARD, SFT),
    "algorithm.dpo.beta": (0.2, SFT, DPO),
    "algorithm.dpo.loss_type": ("ipo", REWARD, DPO),
    "algorithm.dpo.label_smoothing": (0.1, {**DPO, "algorithm.dpo.loss_type": "ipo"}, DPO),
    "algorithm.dpo.ipo_logps": ("sum", DPO, {**DPO, "algorithm.dpo.loss_type": "ipo"}),
    "algorithm.dpo.simpo_gamma": (1.0, {**DPO, "algorithm.dpo.loss_type": "hinge"},
                                  {**DPO, "algorithm.dpo.loss_type": "simpo"}),
    "algorithm.dpo.reference": ("copy", {**DPO, "algorithm.dpo.loss_type": "simpo"},
                                {**DPO, "algorithm.dpo.loss_type": "ipo"}),
    "algorithm.reward_margin": ("true", DPO, REWARD),
    "algorithm.rewards": ("[task]", SFT, {"algorithm.name": "grpo"}),
    "algorithm.reward_model": ("runs/rm/final", DPO, {"algorithm.name": "ppo"}),
    "algorithm.reward_fallback": (-1.0, SFT, GRPO),
    "algorithm.rollout.engine": ("vllm", SFT, None),  # vllm is refused for RL too: not implemented
    "algorithm.rollout.batch_size": (16, SFT, GRPO),
    "algorithm.rollout.epochs": (2, DPO, PPO),
    "algorithm.rollout.max_new_tokens": (64, SFT, GRPO),
    "algorithm.rollout.temperature": (0.7, REWARD, PPO),
    "algorithm.rollout.top_p": (0.9, SFT, None),  # top_p < 1 is refused for RL too (the loss scores softmax)
    "algorithm.rollout.stop": ("[END]", REWARD, GRPO),
    "algorithm.rollout.generation_batch_size": (4, SFT, PPO),
    "algorithm.rollout.overlong": ("filter", DPO, GRPO),
    "algorithm.rollout.overlong_reward": (0.0, GRPO, {**GRPO, "algorithm.rollout.overlong": "fixed"}),
    "algorithm.rollout.overlong_cache": (16, {**PPO, "algorithm.rollout.overlong": "fixed"},
                                         {**PPO, "algorithm.rollout.overlong": "soft"}),
    "algorithm.grpo.num_generations": (4, PPO, GRPO),
    "algorithm.grpo.loss_type": ("grpo", PPO, GRPO),
    "algorithm.grpo.scale": ("none", SFT, GRPO),
    "algorithm.grpo.beta": (0.04, PPO, GRPO),
    "algorithm.grpo.clip_eps": (0.1, PPO, GRPO),
    "algorithm.grpo.clip_eps_high": (0.28, DPO, GRPO),
    "algorithm.grpo.log_kl": ("false", {**GRPO, "algorithm.grpo.beta": 0.04}, GRPO),
    "algorithm.grpo.drop_uniform_groups": ("true", PPO, GRPO),
    "algorithm.ppo.kl_coef": (0.1, GRPO, PPO),
    "algorithm.ppo.adaptive_kl": ("true", GRPO, PPO),
    "algorithm.ppo.target_kl": (3.0, PPO, {**PPO, "algorithm.ppo.adaptive_kl": "true"}),
    "algorithm.ppo.kl_horizon": (500, PPO, {**PPO, "algorithm.ppo.adaptive_kl": "true"}),
    "algorithm.ppo.gamma": (0.99, GRPO, PPO),
    "algorithm.ppo.lam": (0.9, SFT, PPO),
    "algorithm.ppo.clip_eps": (0.1, GRPO, PPO),
    "algorithm.ppo.clip_eps_value": (0.1, GRPO, PPO),
    "algorithm.ppo.vf_coef": (0.5, GRPO, PPO),
    "algorithm.ppo.whiten_advantages": ("false", GRPO, PPO),
    "optim.min_lr_ratio": (0.1, {"optim.schedule": "constant"}, {"optim.schedule": "cosine"}),
    "optim.head_lr": (1e-3, DPO, REWARD),
    "run.epochs": (2, {"run.max_steps": 10}, {"run.max_steps": "null"}),
    "run.eval_every": (10, SFT, {"data.eval": "held.jsonl"}),
}  # fmt: skip


def _load(field, value, context):
    return load_config(None, [f"{k}={v}" for k, v in {**context, field: value}.items()])


def test_every_field_of_the_run_config_has_a_row():
    """A field added to RunConfig without a decision (read by all, or by whom) fails here."""
    assert {name for name, _, _ in describe_fields()} == set(APPLIES)


def test_every_conditional_row_has_a_case():
    assert {f for f, when in APPLIES.items() if when is not ALWAYS} == set(CASES)


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_setting_the_run_does_not_read_is_refused(field):
    value, refused, _ = CASES[field]
    with pytest.raises(ConfigError) as err:
        _load(field, value, refused)
    message = str(err.value)
    assert f"  {field} = " in message and "would be ignored: it is read only when" in message
    assert f"Remove {field} (or set it back to its default" in message
    method = refused.get("algorithm.name", "sft")
    assert f"this run has algorithm.name={method}, technique.name=" in message


@pytest.mark.parametrize("field", sorted(f for f, case in CASES.items() if case[2] is not None))
def test_the_same_setting_is_accepted_where_it_is_read_and_its_resolved_config_loads(field, tmp_path):
    value, _, accepted = CASES[field]
    cfg = _load(field, value, accepted)
    assert value_of(cfg, field) != default_of(cfg, field)  # the value took effect in the config
    dump_config(cfg, tmp_path / "config.yaml")  # every field written, defaults included
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_value_equal_to_the_default_is_never_refused():
    cfg = load_config(None, ["algorithm.name=dpo", "algorithm.dpo.loss_type=ipo", "algorithm.dpo.label_smoothing=0.0",
                             "technique.name=full", "technique.r=16", "algorithm.dpo.reference=precompute"])  # fmt: skip
    assert cfg.algorithm.dpo.loss_type == "ipo"


def test_every_refusal_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["technique.name=full", "technique.r=8", "algorithm.dpo.beta=0.5", "data.packing=true",
                           "algorithm.name=dpo"])  # fmt: skip
    message = str(err.value)
    assert "technique.r = 8 would be ignored" in message and "data.packing = true would be ignored" in message
    assert "algorithm.dpo.beta" not in message  # read by dpo


def test_help_config_says_which_runs_read_each_field(capsys):
    from posttrain.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "algorithm.dpo.label_smoothing = 0.0\n    Conservative DPO: the assumed share of flipped labels (sigmoid loss "
        "only).\n    read by: only when algorithm.name is dpo and algorithm.dpo.loss_type is sigmoid\n"
    ) in out
    assert "optim.lr = 0.0002\n    Peak learning rate.\n    read by: every method and technique\n" in out
    assert out.count("    read by: ") == len(APPLIES)
