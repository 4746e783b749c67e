"""Advisor decisions, table-driven: each profile's pipeline, technique, and the inputs its reasons cite.

The first four rows are the examples the issue names: structured JSON output with examples -> SFT; a chatbot
made more helpful from human rankings -> DPO; reasoning with a verifiable reward and many samples -> GRPO;
a 7B model on a single 24 GB GPU -> LoRA (full fine-tuning needs ~127 GB; LoRA on a 16-bit base ~18 GB, of
21.6 GB usable).
"""

import pytest

from posttrain.advisor import advise
from posttrain.advisor.profile import KEYS
from posttrain.advisor.rules import load_rules
from posttrain.algorithms import config_from_dict
from posttrain.errors import UserError

CASES = [
    # (id, profile, pipeline, technique, fired rules, phrases the reasons must contain)
    (
        "json-sft",
        {"task": "Extract invoice fields as JSON", "demonstrations": 3000, "quality": "objective", "model": "7b", "gpu": "H100-80GB", "gpus": 8},
        ["sft"], "full",
        {"sft-demonstrations", "sft-format", "sft-objective", "full-fits"},
        ["3,000 demonstrations", "format compliance", "quality is objective"],
    ),
    (
        "chatbot-dpo",
        {"task": "make the support chatbot more helpful", "preference_pairs": 20000, "quality": "subjective", "format_ok": True, "model": "7b", "gpu": "H100-80GB", "gpus": 8},
        ["dpo"], "full",
        {"dpo-subjective", "dpo-rank-not-write", "dpo-no-reward"},
        ["subjective", "20,000 preference pairs"],
    ),
    (
        "reasoning-grpo",
        {"task": "grade-school math", "prompts": 7500, "verifiable": True, "multi_step": True, "model": "qwen2.5-1.5b", "gpu": "H100-80GB"},
        ["grpo"], "full",
        {"grpo-verifiable", "grpo-multi-step"},
        ["program can check answers", "7,500 prompts", "multi-step"],
    ),
    (
        "7b-on-24gb-lora",
        {"task": "reply to customer emails", "demonstrations": 5000, "model": "7b", "gpu_memory_gb": 24},
        ["sft"], "lora",
        {"sft-demonstrations", "lora-when-full-does-not-fit"},
        ["5,000 demonstrations", "more than custom-24GB's 24 GB"],
    ),
    (
        "70b-on-48gb-qlora",
        {"demonstrations": 2000, "model": "llama-2-70b", "gpu": "RTXA6000-48GB"},
        ["sft"], "qlora",
        {"qlora-when-lora-does-not-fit"},
        ["QLoRA's 4-bit base"],
    ),
    (
        "demos-then-dpo",
        {"demonstrations": 2000, "preference_pairs": 10000, "quality": "subjective", "model": "qwen2.5-0.5b", "gpu": "A100-80GB"},
        ["sft", "dpo"], "full",
        {"dpo-subjective", "sft-before-preference-or-rl"},
        ["2,000 demonstrations", "10,000 preference pairs"],
    ),
    (
        # A model that rarely passes gets SFT first (a model that never passes gets no RL stage at all: see
        # test_advisor_pipelines.py).
        "rl-needs-success",
        {"demonstrations": 300, "prompts": 5000, "verifiable": True, "format_ok": True, "success_rate": 0.02, "model": "qwen2.5-1.5b", "gpu": "H100-80GB"},
        ["sft", "grpo"], "full",
        {"sft-before-rl-no-success", "grpo-verifiable"},
        ["solves only 2% of prompts"],
    ),
    (
        "reward-model-ppo",
        {"prompts": 20000, "reward_model": True, "quality": "subjective", "format_ok": True, "model": "qwen2.5-1.5b", "gpu": "H100-80GB", "gpus": 8},
        ["ppo"], "full",
        {"ppo-learned-reward", "ppo-critic-affordable"},
        ["trained reward model exists", "PPO is affordable"],
    ),
    (
        "reward-model-no-critic-grpo",
        {"prompts": 20000, "reward_model": True, "format_ok": True, "model": "7b", "gpu_memory_gb": 24},
        ["grpo"], "qlora",
        {"grpo-learned-reward-no-critic", "ppo-critic-unaffordable"},
        ["does not fit"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, profile, pipeline, technique, rules, phrases", CASES, ids=[c[0] for c in CASES]
)
def test_profiles(name, profile, pipeline, technique, rules, phrases):
    a = advise(profile, what_if=False)
    assert (a.pipeline, a.technique) == (pipeline, technique)
    fired = {x["rule"] for x in a.fired}
    assert rules <= fired
    text = " ".join(a.reasons)
    for phrase in phrases:
        assert phrase in text
    # Every rule that fired names the inputs that triggered it, with their values.
    for x in a.fired:
        assert set(x["inputs"]) == set(next(r for r in load_rules().rules if r["id"] == x["rule"])["when"])


def test_issue_examples_name_their_triggering_inputs():
    a = advise(CASES[2][1], what_if=False)
    inputs = {k: v for x in a.fired if x["rule"] == "grpo-verifiable" for k, v in x["inputs"].items()}
    assert inputs == {"verifiable": True, "prompts": 7500}


def test_sft_config_validates_under_the_run_config():
    a = advise(CASES[0][1], what_if=False)
    cfg = config_from_dict(a.config)
    assert cfg.algorithm.name == "sft" and cfg.technique.name == "full"
    assert cfg.optim.batch_size % cfg.optim.micro_batch_size == 0
    lora = advise(CASES[3][1], what_if=False)
    assert config_from_dict(lora.config).technique.name == "lora"


@pytest.mark.parametrize("profile", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_every_stage_config_validates(profile):
    # GRPO and PPO stages name their reward (the verifier's placeholder or a reward model), or would not load.
    for stage in advise(profile, what_if=False).configs:
        assert config_from_dict(stage["config"]).algorithm.name == stage["stage"]


def test_multi_stage_configs_chain_their_outputs():
    a = advise(CASES[5][1], what_if=False)  # sft -> dpo, full
    first, second = a.configs
    assert second["config"]["algorithm"] == {"name": "dpo"} and second["note"] is None
    assert second["config"]["model"]["name"] == first["config"]["run"]["output_dir"] + "/final"
    for stage in a.configs:
        assert config_from_dict(stage["config"]).algorithm.name == stage["stage"]


def test_several_gpus_give_sharded_configs_that_split_over_them():
    """The estimate sizes FSDP full shard over several GPUs, so every stage's config shards (run.sharding: fsdp2)
    and says how to launch it; each process's share of a step is a whole number of micro-batches (GRPO: of
    whole groups). A config that did not shard held the whole 6B model per process: 129-157 GB for a stage
    advised at 22.6 GB per GPU."""
    profile = {"demonstrations": 13000, "preference_pairs": 33000, "prompts": 31000, "quality": "subjective",
               "model": "6b", "gpu": "H100-80GB", "gpus": 8}  # fmt: skip
    for gpus in (8, 3):
        a = advise({**profile, "gpus": gpus}, what_if=False)
        assert any(f"torchrun --nproc_per_node {gpus} -m posttrain.cli train" in n for n in a.assumptions)
        for stage in a.configs:
            cfg = config_from_dict(stage["config"])
            share, per = cfg.optim.batch_size // gpus, stage["config"]["algorithm"].get("num_generations", 1)
            assert cfg.run.sharding == "fsdp2" and cfg.optim.batch_size % (gpus * per) == 0
            assert share % cfg.optim.micro_batch_size == 0
    one = advise({**profile, "gpus": 1, "gpu": "H200-141GB"}, what_if=False)
    assert all("sharding" not in s["config"]["run"] for s in one.configs)


def test_ppo_is_sized_as_posttrain_runs_it():
    """posttrain's PPO puts a value head on the policy (no separate critic): the advice sizes that, as the config it
    writes trains it. With a 7B policy and a reward model on a 48 GB GPU PPO with LoRA needs ~30 GB (a separate
    critic made it 45 GB and the advice fell back to DPO)."""
    from posttrain.estimator import estimate

    a = advise({"demonstrations": 2000, "preference_pairs": 5000, "prompts": 2000, "quality": "subjective",
                "model": "7b", "gpu": "L40S-48GB"}, what_if=False)  # fmt: skip
    assert a.pipeline == ["sft", "reward", "ppo"] and a.technique == "lora"
    head = estimate("7b", method="ppo", technique="lora", reward_model="7b", value_model="head", seq_len=1024,
                    batch_size=4, completion_len=512, gradient_checkpointing=True, gpu="L40S-48GB")  # fmt: skip
    fired = next(x for x in a.fired if x["rule"] == "ppo-critic-affordable")
    assert f"({head.peak_memory_gb:.0f} GB per GPU with lora)" in fired["reason"]
    # Time and cost count what each config trains on: SFT 2 epochs of 2000 x 512 tokens (avg_tokens: half of the
    # 1,024 seq_len), the reward model 5000 pairs x chosen and rejected, PPO one 1,024-token sample per prompt
    # (GRPO's group of 8 was counted for PPO's prompts too: 8x its hours).
    tokens = {s["method"]: s["tokens"] for s in a.estimate["stages"]}
    assert tokens == {"sft": 2000 * 512 * 2, "reward": 5000 * 2 * 512, "ppo": 2000 * 1 * 1024}
    assert [s["config"]["run"]["epochs"] for s in a.configs] == [2.0, 1.0, 1.0]


def test_risks_follow_the_pipeline():
    risks = " ".join(advise(CASES[2][1], what_if=False).risks)
    assert "reward hacking" in risks and "zero advantage" in risks
    assert "over-optimisation" in " ".join(advise(CASES[1][1], what_if=False).risks)
    assert "imitates noise" in " ".join(advise(CASES[0][1], what_if=False).risks)


def test_what_would_change_it():
    a = advise(CASES[3][1])  # 7B SFT with LoRA on one 24 GB GPU
    assert "if you had 8 x H100-80GB: sft with full" in a.would_change
    assert any(c.startswith("if a program could check answers") and "grpo" in c for c in a.would_change)


def test_estimate_and_budget():
    profile = dict(CASES[3][1], budget_usd=0.01)
    a = advise(profile, what_if=False)
    assert a.estimate["cost_usd"] > 0.01 and a.estimate["peak_memory_gb"] <= 24
    assert any("over the budget" in r for r in a.risks)


def test_missing_keys_are_stated_assumptions():
    a = advise({"demonstrations": 1000}, what_if=False)
    joined = " | ".join(a.assumptions)
    for phrase in ("model not stated", "gpu not stated", "prompts not stated", "seq_len not stated"):
        assert phrase in joined


@pytest.mark.parametrize(
    "profile, fragment",
    [
        ({"task": "anything"}, "states no data"),
        ({"prompts": 5000}, "Prompts alone need a reward (set verifiable: true"),
        ({"demonstrations": -3}, "demonstrations: must be non-negative"),
        ({"demonstration": 30}, "unknown profile key (did you mean demonstrations"),
        ({"demonstrations": 10, "gpu": "A1000"}, "unknown GPU"),
        ({"demonstrations": 10, "model": "lama-3-8b"}, "Did you mean: llama-3-8b"),
        ({"demonstrations": 10, "quality": "great"}, "must be one of objective, subjective"),
    ],
)
def test_bad_profiles(profile, fragment):
    with pytest.raises(UserError) as err:
        advise(profile)
    assert fragment in str(err.value)


def test_rules_refer_only_to_known_facts():
    table = load_rules()
    stages = {m for slot in table.slots for m in slot["methods"]}
    derived = {"final", "technique", "ppo_fits", "over_budget", "has_rl"}
    derived |= {f"{t}_fits" for t in ("full", "lora", "qlora")}
    derived |= {f"has_{m}" for m in stages} | {f"{slot['name']}_stage" for slot in table.slots}
    known = {k.name for k in KEYS} | derived
    for r in table.rules:
        assert set(r["when"]) <= known, r["id"]
    for f in table.flips:
        assert set(f["set"]) <= {k.name for k in KEYS}


def test_technique_choice_keeps_the_estimators_headroom():
    """LoRA whose estimate fills 95% of the GPU does not fit (at most 90% may be used): QLoRA is chosen, and the
    reason gives the usable memory."""
    from posttrain.estimator import estimate

    profile = {"demonstrations": 5000, "model": "7b"}  # seq_len 1024; the advisor tries micro-batch 4, 2, 1
    lora = estimate("7b", technique="lora", batch_size=1, seq_len=1024, gradient_checkpointing=True)
    gpu_gb = round(lora.peak_memory_gb / 0.95, 2)
    a = advise(dict(profile, gpu_memory_gb=gpu_gb), what_if=False)
    assert (a.pipeline, a.technique, a.fits) == (["sft"], "qlora", True)
    assert any(
        f"custom-{gpu_gb:g}GB's {gpu_gb:g} GB allows ({0.9 * gpu_gb:.1f} GB usable)" in r for r in a.reasons
    )
    assert (
        advise(dict(profile, gpu_memory_gb=round(lora.peak_memory_gb / 0.89, 2)), what_if=False).technique
        == "lora"
    )


def test_when_nothing_fits_the_advice_says_so_first():
    from posttrain.cli.advise import format_advice

    a = advise({"demonstrations": 2000, "model": "70b", "gpu_memory_gb": 24}, what_if=False)
    assert (a.technique, a.fits) == ("qlora", False)
    assert a.estimate["hours"] is None and a.estimate["cost_usd"] is None
    assert {"num_gpus": 4, "sharding": "fsdp"} in [w["change"] for w in a.estimate["would_fit"]]
    text = format_advice(a)
    first, second = text.splitlines()[:2]
    assert first.startswith(
        "Does not fit: sft with qlora needs 44.1 GB per GPU, more than the 21.6 GB usable"
    )
    assert second.startswith("It would fit with: 4 x custom-24GB with fsdp sharding (")
    assert "Estimate: peak 44.1 GB per GPU on 1 x custom-24GB: does not fit, so no time or cost" in text
    assert "$" not in text.split("Estimate:")[1].split("\n")[0]
    fitting = format_advice(advise(CASES[3][1], what_if=False))
    assert fitting.startswith("Recommendation: sft, technique lora") and "Does not fit" not in fitting


@pytest.mark.parametrize("value", ["inf", "nan", float("inf")])
def test_a_count_that_is_not_finite_is_refused(value):
    """`advise --demonstrations inf` raised OverflowError, nan a ValueError (an audit, nineteenth session)."""
    from posttrain.advisor.profile import coerce
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="demonstrations: must be a finite number"):
        coerce("demonstrations", value, "--demonstrations")
