"""Every setting is read by the run or refused: one case per conditional rule.

Shared sections: the table `config_rules.APPLIES` (a few fields are read by some methods only, as each method's
section declares in `run_fields`). A method's own section: its fields exist only there (another method's field is
an unknown key, named with the methods that do have it), and `Config.rules` holds those read only under a
condition. Each case gives a non-default value, a run that does not read the field (refused: the message names
the field, the value and the method) and, where one exists, a run that does (accepted, and its resolved
config.yaml loads again). A new shared field needs a row in APPLIES; a new conditional rule needs a case here."""

import re

import pytest

from posttrain.algorithms import ALGORITHMS, RunConfig, load_config
from posttrain.config import describe_fields, dump_config
from posttrain.config_rules import ALWAYS, APPLIES, default_of, value_of
from posttrain.errors import ConfigError

RL_REWARD = {"algorithm.rewards": "[task]"}
SFT = {"algorithm.name": "sft"}
REWARD = {"algorithm.name": "reward"}
DPO = {"algorithm.name": "dpo"}
GRPO = {"algorithm.name": "grpo", **RL_REWARD}
PPO = {"algorithm.name": "ppo", **RL_REWARD}
RLOO = {"algorithm.name": "rloo", **RL_REWARD}
SERVER = {"algorithm.rollout.engine": "vllm-server"}
SERVER_URL = {"algorithm.rollout.vllm_server_url": "http://127.0.0.1:8000"}
FULL, LORA, QLORA = ({"technique.name": t} for t in ("full", "lora", "qlora"))

# field: (non-default value, a run that does not read it, a run that does or None where no value but the default
# passes the other checks)
SHARED_CASES = {
    "technique.r": (8, FULL, LORA),
    "technique.alpha": (8, FULL, QLORA),
    "technique.dropout": (0.1, FULL, LORA),
    "technique.target_modules": ("[q_proj, v_proj]", FULL, QLORA),
    "technique.quant_type": ("fp4", LORA, QLORA),
    "technique.double_quant": ("false", FULL, QLORA),
    "data.eval": ("held.jsonl", GRPO, REWARD),
    "data.train_on": ("all", DPO, SFT),
    "data.packing": ("true", REWARD, SFT),
    "data.share_prompt": ("false", PPO, GRPO),
    "optim.min_lr_ratio": (0.1, {"optim.schedule": "constant"}, {"optim.schedule": "cosine"}),
    "optim.head_lr": (1e-3, DPO, REWARD),
    "run.epochs": (2, {"run.max_steps": 10}, {"run.max_steps": "null"}),
    "run.eval_every": (10, SFT, {"data.eval": "held.jsonl"}),
    "run.whole_checkpoints": ("true", SFT, {"run.sharding": "fsdp2"}),
    "model.compile_memory_budget": (0.5, SFT, {"model.compile": "true"}),
    "model.rebuild_pointwise": ("false", {"model.compile": "true"}, SFT),
}  # fmt: skip

# (method, field of its section): cases for `Config.rules`
OWN_CASES = {
    ("dpo", "algorithm.label_smoothing"): (0.1, {**DPO, "algorithm.loss_type": "ipo"}, DPO),
    ("dpo", "algorithm.ipo_logps"): ("sum", DPO, {**DPO, "algorithm.loss_type": "ipo"}),
    ("dpo", "algorithm.simpo_gamma"): (1.0, {**DPO, "algorithm.loss_type": "hinge"},
                                       {**DPO, "algorithm.loss_type": "simpo"}),
    ("dpo", "algorithm.reference"): ("copy", {**DPO, "algorithm.loss_type": "simpo"},
                                     {**DPO, "algorithm.loss_type": "ipo"}),
    ("grpo", "algorithm.log_kl"): ("false", {**GRPO, "algorithm.beta": 0.04}, GRPO),
    ("grpo", "algorithm.skip_zero_advantage"): ("false", {**GRPO, "algorithm.beta": 0.04}, GRPO),
    ("rloo", "algorithm.skip_zero_advantage"): ("false", RLOO, {**RLOO, "algorithm.beta": 0.0}),
    ("grpo", "algorithm.rollout.overlong_reward"): (0.0, GRPO, {**GRPO, "algorithm.rollout.overlong": "fixed"}),
    ("grpo", "algorithm.rollout.overlong_cache"): (16, {**GRPO, "algorithm.rollout.overlong": "fixed"},
                                                   {**GRPO, "algorithm.rollout.overlong": "soft"}),
    ("ppo", "algorithm.rollout.overlong_reward"): (0.0, PPO, {**PPO, "algorithm.rollout.overlong": "fixed"}),
    ("ppo", "algorithm.rollout.overlong_cache"): (16, {**PPO, "algorithm.rollout.overlong": "fixed"},
                                                  {**PPO, "algorithm.rollout.overlong": "soft"}),
    ("rloo", "algorithm.rollout.overlong_reward"): (0.0, RLOO, {**RLOO, "algorithm.rollout.overlong": "fixed"}),
    ("rloo", "algorithm.rollout.overlong_cache"): (16, {**RLOO, "algorithm.rollout.overlong": "fixed"},
                                                   {**RLOO, "algorithm.rollout.overlong": "soft"}),
    ("grpo", "algorithm.rollout.vllm_gpu_memory_utilization"): (0.5, GRPO, {**GRPO, "algorithm.rollout.engine": "vllm"}),
    ("grpo", "algorithm.rollout.vllm_sleep"): ("false", GRPO, {**GRPO, "algorithm.rollout.engine": "vllm"}),
    ("ppo", "algorithm.rollout.vllm_gpu_memory_utilization"): (0.5, PPO, {**PPO, "algorithm.rollout.engine": "vllm"}),
    ("ppo", "algorithm.rollout.vllm_sleep"): ("false", PPO, {**PPO, "algorithm.rollout.engine": "vllm"}),
    ("rloo", "algorithm.rollout.vllm_gpu_memory_utilization"): (0.5, RLOO, {**RLOO, "algorithm.rollout.engine": "vllm"}),
    ("rloo", "algorithm.rollout.vllm_sleep"): ("false", RLOO, {**RLOO, "algorithm.rollout.engine": "vllm"}),
    ("grpo", "algorithm.rollout.vllm_server_url"): ("http://127.0.0.1:8000", GRPO, {**GRPO, **SERVER}),
    ("grpo", "algorithm.rollout.vllm_server_timeout"): (10, GRPO, {**GRPO, **SERVER, **SERVER_URL}),
    ("ppo", "algorithm.rollout.vllm_server_url"): ("http://127.0.0.1:8000", PPO, {**PPO, **SERVER}),
    ("ppo", "algorithm.rollout.vllm_server_timeout"): (10, PPO, {**PPO, **SERVER, **SERVER_URL}),
    ("rloo", "algorithm.rollout.vllm_server_url"): ("http://127.0.0.1:8000", RLOO, {**RLOO, **SERVER}),
    ("rloo", "algorithm.rollout.vllm_server_timeout"): (10, RLOO, {**RLOO, **SERVER, **SERVER_URL}),
    ("grpo", "algorithm.rollout.merge_adapters"): ("true", {**GRPO, **FULL}, GRPO),
    ("ppo", "algorithm.rollout.merge_adapters"): ("false", {**PPO, **QLORA}, PPO),
    ("rloo", "algorithm.rollout.merge_adapters"): ("false", {**RLOO, **SERVER, **SERVER_URL}, RLOO),
    ("grpo", "algorithm.rollout.dtype"): ("bfloat16", {**GRPO, "model.dtype": "bfloat16"}, GRPO),
    ("ppo", "algorithm.rollout.dtype"): ("bfloat16", {**PPO, **QLORA}, PPO),
    ("rloo", "algorithm.rollout.dtype"): ("bfloat16", {**RLOO, **SERVER, **SERVER_URL}, RLOO),
    ("ppo", "algorithm.target_kl"): (3.0, PPO, {**PPO, "algorithm.adaptive_kl": "true"}),
    ("ppo", "algorithm.kl_horizon"): (500, PPO, {**PPO, "algorithm.adaptive_kl": "true"}),
    # one optimisation step per rollout (the default): the importance ratio is exactly 1 (an audit, nineteenth
    # session: clip_eps 0.2 and 0.01 trained the same weights, bit for bit)
    ("grpo", "algorithm.clip_eps"): (0.1, GRPO, {**GRPO, "algorithm.rollout.epochs": 2}),
    ("grpo", "algorithm.clip_eps_high"): (0.28, GRPO, {**GRPO, "algorithm.rollout.batch_size": 16}),
    ("rloo", "algorithm.clip_eps"): (0.1, RLOO, {**RLOO, "algorithm.rollout.epochs": 2}),
    ("ppo", "algorithm.clip_eps"): (0.1, PPO, {**PPO, "algorithm.rollout.epochs": 2}),
    ("ppo", "algorithm.clip_eps_value"): (0.1, {**PPO, "algorithm.rollout.epochs": 2, "algorithm.vf_coef": 0},
                                          {**PPO, "algorithm.rollout.epochs": 2}),
    ("ppo", "optim.head_lr"): (1e-3, {**PPO, "algorithm.vf_coef": 0}, PPO),  # `run_rules`: the head gets no gradient
    # a rollout of one group (8 sequences, num_generations 8): the batch's std is the group's
    ("grpo", "algorithm.scale"): ("batch", GRPO, {**GRPO, "optim.batch_size": 16}),
    ("grpo", "algorithm.rollout.generation_batch_size"): (4, {**GRPO, **SERVER, **SERVER_URL}, GRPO),
    ("ppo", "algorithm.rollout.generation_batch_size"): (4, {**PPO, **SERVER, **SERVER_URL}, PPO),
    ("rloo", "algorithm.rollout.generation_batch_size"): (4, {**RLOO, **SERVER, **SERVER_URL}, RLOO),
}  # fmt: skip

CASES = {**SHARED_CASES, **{field: case for (_, field), case in OWN_CASES.items()}}
CONTEXT = {"sft": SFT, "reward": REWARD, "dpo": DPO, "grpo": GRPO, "ppo": PPO, "rloo": RLOO}


def _load(field, value, context):
    return load_config(None, [f"{k}={v}" for k, v in {**context, field: value}.items()])


def test_every_shared_field_has_a_row():
    """A shared field added without a decision (read by all, or by whom) fails here."""
    shared = {name for name, _, _, method in describe_fields(RunConfig) if method is None}
    assert shared == set(APPLIES)


def test_every_conditional_rule_has_a_case():
    assert {f for f, when in APPLIES.items() if when is not ALWAYS} == set(SHARED_CASES)
    own = {(name, f"algorithm.{field}") for name, a in ALGORITHMS.items() for field in a.config.rules}
    own |= {(name, field) for name, a in ALGORITHMS.items() for field in a.config.run_rules}
    assert own == set(OWN_CASES)


@pytest.mark.parametrize("field", sorted(SHARED_CASES))
def test_a_shared_setting_the_run_does_not_read_is_refused(field):
    _assert_refused(field, *SHARED_CASES[field][:2])


@pytest.mark.parametrize("method,field", sorted(OWN_CASES))
def test_a_method_setting_the_run_does_not_read_is_refused(method, field):
    _assert_refused(field, *OWN_CASES[(method, field)][:2])


def _assert_refused(field, value, refused):
    with pytest.raises(ConfigError) as err:
        _load(field, value, refused)
    message = str(err.value)
    assert f"  {field} = " in message and "would be ignored: it is read only when" in message
    assert f"Remove {field} (or set it back to its default" in message
    method = refused.get("algorithm.name", "sft")
    assert f"this run has algorithm.name={method}, technique.name=" in message


@pytest.mark.parametrize("field", sorted(f for f, case in SHARED_CASES.items() if case[2] is not None))
def test_the_same_shared_setting_is_accepted_where_it_is_read_and_its_resolved_config_loads(field, tmp_path):
    _assert_accepted(field, SHARED_CASES[field][0], SHARED_CASES[field][2], tmp_path)


@pytest.mark.parametrize("method,field", sorted(OWN_CASES))
def test_the_same_method_setting_is_accepted_where_it_is_read(method, field, tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.config.vllm_available", lambda: True)  # engine=vllm runs; vllm is not installed
    _assert_accepted(field, OWN_CASES[(method, field)][0], OWN_CASES[(method, field)][2], tmp_path)


def _assert_accepted(field, value, accepted, tmp_path):
    cfg = _load(field, value, accepted)
    assert value_of(cfg, field) != default_of(cfg, field)  # the value took effect in the config
    dump_config(cfg, tmp_path / "config.yaml")  # every field written, defaults included
    assert load_config(tmp_path / "config.yaml") == cfg


METHOD_FIELDS = sorted(
    (name, field)
    for name, a in ALGORITHMS.items()
    for field in a.config.model_fields
    if field != "name" and any(field not in b.config.model_fields for b in ALGORITHMS.values())
)


@pytest.mark.parametrize("method,field", METHOD_FIELDS)
def test_another_methods_setting_is_an_unknown_key_that_names_its_methods(method, field):
    """Every field of a method's section is refused under each method that has no such field, and the message
    says which methods have it (so `algorithm.beta` under sft reads: belongs to dpo, grpo)."""
    owners = [n for n, a in ALGORITHMS.items() if field in a.config.model_fields]
    for other in ALGORITHMS:
        if other in owners:
            continue
        value = "x" if field != "rollout" else "{}"
        with pytest.raises(ConfigError) as err:
            _load(f"algorithm.{field}", value, CONTEXT[other])
        assert (f"algorithm.{field}: not a setting of algorithm.name={other}; it belongs to "
                f"{', '.join(owners)}") in str(err.value)  # fmt: skip


def test_a_value_equal_to_the_default_is_never_refused():
    cfg = load_config(None, ["algorithm.name=dpo", "algorithm.loss_type=ipo", "algorithm.label_smoothing=0.0",
                             "technique.name=full", "technique.r=16", "algorithm.reference=precompute"])  # fmt: skip
    assert cfg.algorithm.loss_type == "ipo"


def test_every_refusal_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["technique.name=full", "technique.r=8", "algorithm.beta=0.5", "data.packing=true",
                           "algorithm.name=dpo"])  # fmt: skip
    message = str(err.value)
    assert "technique.r = 8 would be ignored" in message and "data.packing = true would be ignored" in message
    assert "algorithm.beta" not in message  # read by dpo


def test_help_config_says_which_runs_read_each_field(capsys):
    from posttrain.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "# algorithm.name: dpo\n" in out
        and "algorithm.label_smoothing = 0.0\n    Conservative DPO: the assumed share of flipped labels (sigmoid loss "
        "only).\n    read by: algorithm.name=dpo, only when algorithm.loss_type is sigmoid\n"
    ) in out
    assert "optim.lr = 0.0002\n    Peak learning rate.\n    read by: every method and technique\n" in out
    assert "data.chat_template_kwargs = {}\n" in out and "PydanticUndefined" not in out  # a default_factory's value
    assert ("data.packing = False\n    Pack several examples into one row of `max_length` tokens; examples never "
            "attend to each other.\n    read by: only when algorithm.name is sft\n") in out
    assert "read by: only when algorithm.name is ppo (when algorithm.vf_coef is not 0.0) or reward\n" in out
    assert out.count("    read by: ") == len(describe_fields(RunConfig))
    headers = [line for line in out.splitlines() if re.match(r"[a-z_]+(\.[a-z_0-9]+)+ = ", line)]
    assert len(headers) == len(describe_fields(RunConfig))  # every other line is indented under its field
    assert all(line.startswith("    ") for line in out.splitlines() if line and line not in headers and line[0] != "#")


def test_the_clips_act_where_a_forward_of_their_own_keeps_dropout_apart():
    """PPO takes its old log-probs and values from an eval-mode forward, as RLOO does at beta > 0: with the
    model's dropout kept in training the first step's ratio is not 1, so one step per rollout is no reason to
    refuse the clips there (a review, nineteenth session). GRPO's ratio comes from the trained forward itself."""
    keep = {"model.dropout": "keep"}
    assert _load("algorithm.clip_eps", 0.1, {**PPO, **keep}).algorithm.clip_eps == 0.1
    assert _load("algorithm.clip_eps_value", 0.1, {**PPO, **keep}).algorithm.clip_eps_value == 0.1
    assert _load("algorithm.clip_eps", 0.1, {**RLOO, **keep, "algorithm.beta": 0.05}).algorithm.clip_eps == 0.1
    _assert_refused("algorithm.clip_eps", 0.1, {**RLOO, **keep, "algorithm.beta": 0.0})
    _assert_refused("algorithm.clip_eps", 0.1, {**GRPO, **keep})
