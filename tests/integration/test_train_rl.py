"""GRPO and PPO end to end on the tiny model: what trains, what they log, that they learn a toy reward, the
reference and old log-probs they use, dropped groups, and that `final/` loads as a plain model or adapter.

The toy reward `letters` is the share of lowercase ASCII letters in an 8-token completion: the random tiny model
writes ~10% letters, and a policy can raise that to 100% by reshaping its output distribution, so a rising
reward means the policy gradient points the right way. Learning runs put LoRA on the LM head (`lm_head`):
the tiny model's LM head weights are so small (std 0.02) that adapters on the attention and MLP layers alone
move its logits only slowly."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.train import train
from posttrain.trainer.metrics import read_metrics

# LoRA on lm_head makes peft save that layer's base weights with the adapter, and say so.
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")

# `sampling_entropy` estimates the entropy from the 128 sampled tokens of a step (16 completions of 8): the tiny
# model's varentropy is 0.0128 nats^2 per token, so one standard error is sqrt(0.0128 / 128) = 0.01 (measured
# differences from the exact `entropy`: 0.003-0.019). Five standard errors; a wrong temperature, sign or
# per-sequence mean would be off by whole nats.
SAMPLED_ENTROPY_TOLERANCE = 0.05
PROMPTS = [{"prompt": f"add {a} {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]

REWARDS = '''
def letters(prompts, completions, **kwargs):
    return [sum("a" <= ch <= "z" for ch in c) / 8 for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def truncated_flag(prompts, completions, truncated, **kwargs):
    return [float(t) for t in truncated]


def broken(prompts, completions, **kwargs):
    scale = 0
    return [len(c) / scale for c in completions]  # ZeroDivisionError


def even_first_is_uniform(prompts, completions, **kwargs):
    """1.0 for every sample of the prompts "add a b" with an even a (uniform groups), letters otherwise."""
    return [1.0 if int(p.split()[1]) % 2 == 0 else s for p, s in zip(prompts, letters(prompts, completions))]
'''


@pytest.fixture()
def rl(make_cfg, tmp_path):
    """make_cfg for RL runs: the prompts file, a reward file, 8-token completions; `reward=` picks a function."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    (tmp_path / "rewards.py").write_text(REWARDS, encoding="utf-8")

    def make(name, algorithm="grpo", reward="letters", **overrides):
        base = {
            "algorithm.name": algorithm,
            "algorithm.rewards": f"[{tmp_path / 'rewards.py'}:{reward}]",
            "data.train": str(prompts),
            "technique.name": "lora",
            "algorithm.rollout.max_new_tokens": 8,
            "optim.batch_size": 16,
            "optim.schedule": "constant",
            "run.max_steps": 3,
        }
        if algorithm in ("grpo", "rloo"):  # a group setting under ppo would be refused (not read there)
            base["algorithm.num_generations"] = 4
        base.update(overrides)
        return make_cfg(name, **base)

    return make


def _frozen_base_unchanged(model, tiny_model_dir, prefix=""):
    from posttrain.testing import assert_base_unchanged

    assert_base_unchanged(model, tiny_model_dir, prefix)


def _same_logits(a, b):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- GRPO
def test_grpo_lora_trains_adapters_only_logs_its_metrics_and_saves_an_adapter(rl, tiny_model_dir, tmp_path):
    (tmp_path / "more.py").write_text(
        "def short(prompts, completions, **kwargs):\n    return [-len(c) / 8 for c in completions]\n"
    )
    rewards = f"[{tmp_path / 'rewards.py'}:letters, {{name: {tmp_path / 'more.py'}:short, weight: 0.5}}]"
    result = train(rl("grpo", **{"algorithm.rewards": rewards}), return_model=True)
    model, hist = result.model, read_metrics(result.run_dir / "metrics.jsonl")
    assert len(hist) == 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved
    _frozen_base_unchanged(model, tiny_model_dir)
    for h in hist:
        for key in ("reward/letters_mean", "reward/letters_std", "reward/short_mean", "reward/short_std",
                    "reward/failures_letters", "reward/total_mean", "completion_length_mean", "clip_fraction",
                    "entropy", "ratio_mean", "gen_time_s", "train_time_s", "uniform_group_fraction"):  # fmt: skip
            assert math.isfinite(h[key]), key
        assert h["kl"] >= 0.0  # beta = 0, but the KL to the base is still logged (log_kl, the default)
        assert h["data_time_s"] >= h["gen_time_s"] > 0 and h["train_time_s"] > 0  # generation timed apart
        assert 0 < h["entropy"] <= math.log(259) + 1e-4
        # the sampler's Monte Carlo estimate of the same entropy: the random tiny model's distributions are near
        # uniform, so -log p of a sampled token is close to the entropy at every position
        assert h["sampling_entropy"] == pytest.approx(h["entropy"], abs=SAMPLED_ENTROPY_TOLERANCE)
        assert h["reward/total_mean"] == pytest.approx(
            h["reward/letters_mean"] + 0.5 * h["reward/short_mean"]
        )
        # one rollout per step: the loss's old log-probs are its own, so the ratio is exactly 1
        assert h["ratio_mean"] == 1.0 and h["clip_fraction"] == 0.0

    from posttrain.evaluation import load_for_inference

    loaded, tokenizer = load_for_inference(str(result.final_dir))
    assert (result.final_dir / "adapter_config.json").is_file()
    _same_logits(loaded, model.eval())
    assert hist[0]["kl"] == 0.0  # step 1: the adapter is a no-op, so the policy is exactly the base


def test_grpo_learns_a_toy_reward_through_the_cli(rl, tmp_path, capsys):
    from posttrain.cli import main

    cfg = rl("learn", **{"technique.target_modules": "[lm_head]", "optim.lr": 3e-2, "run.max_steps": 12})
    path = tmp_path / "grpo.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")  # JSON is YAML
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    hist = read_metrics(tmp_path / "learn" / "metrics.jsonl")
    # The end-of-run summary shows GRPO's key metric, the mean total reward, of the last step.
    last = hist[-1]
    assert (
        f"  last step:    loss {last['loss']:.4f}, reward/total_mean {last['reward/total_mean']:.4g}\n"
        in (capsys.readouterr().out)
    )
    rewards = [h["reward/letters_mean"] for h in hist]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.2 and last > 0.6, rewards  # ~10% letters at random; most of them after training
    # the policy sharpened: the entropy of the last step that trained a completion (once every group scores 1.0,
    # every advantage is 0 and no completion trains: `skip_zero_advantage`)
    entropies = [h["entropy"] for h in hist if "entropy" in h]
    assert entropies[-1] < entropies[0] - 1.0


@pytest.mark.parametrize("technique", ["lora", "full"])
def test_grpo_kl_reference_is_the_starting_model(rl, technique):
    """LoRA: the base with the adapter disabled; full: a frozen copy loaded on the first use."""
    cfg = rl(f"kl-{technique}", **{"algorithm.beta": 0.1, "technique.name": technique})
    hist = read_metrics(train(cfg).run_dir / "metrics.jsonl")
    # step 1: the policy is still the starting model (LoRA: the adapter is zero), and its reference forward
    # gives the same log-probs to the bit
    assert hist[0]["kl"] == 0.0
    assert all(h["kl"] > 0 for h in hist[1:])  # the policy moved away from the reference


@pytest.mark.parametrize(
    "rollout_size,epochs", [(32, 1), (16, 2)], ids=["rollout-of-two-steps", "two-epochs"]
)
def test_old_logps_are_fixed_when_a_rollout_feeds_several_steps(rl, rollout_size, epochs):
    """Steps after the first of a rollout are off-policy: the ratio to the sampler's log-probs is no longer 1
    (the bug: with epochs == 1 the loss used its own detached log-probs, ratio 1, whatever the rollout size)."""
    cfg = rl(
        f"old-{rollout_size}-{epochs}",
        **{"algorithm.rollout.batch_size": rollout_size, "algorithm.rollout.epochs": epochs,
           "technique.target_modules": "[lm_head]", "optim.lr": 3e-2, "run.max_steps": 4},
    )  # fmt: skip
    hist = read_metrics(train(cfg).run_dir / "metrics.jsonl")
    assert [h["rollout"] for h in hist] == [0, 0, 1, 1]
    for h in hist[0::2]:  # first step of each rollout: the policy is still the sampler
        assert h["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and h["clip_fraction"] == 0.0
    for h in hist[1::2]:  # after an update
        assert abs(h["ratio_mean"] - 1.0) > 1e-3


def test_drop_uniform_groups_trains_only_on_groups_with_signal(rl, tiny_model_dir):
    overrides = {"algorithm.drop_uniform_groups": "true", "algorithm.loss_type": "grpo"}
    hist = read_metrics(
        train(rl("drop", reward="even_first_is_uniform", **overrides)).run_dir / "metrics.jsonl"
    )
    for h in hist:  # "grpo" loss units are sequences: only the kept ones count
        assert h["loss_units"] == 16 * (1 - h["uniform_group_fraction"])
    assert any(0 < h["uniform_group_fraction"] < 1 for h in hist)  # some steps mix both kinds of group

    result = train(rl("all-uniform", reward="constant", **overrides), return_model=True)
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert [(h["uniform_group_fraction"], h["loss"], h["loss_units"]) for h in hist] == [(1.0, 0.0, 0.0)] * 3
    assert all(
        torch.all(p == 0) for n, p in result.model.named_parameters() if "lora_B" in n
    )  # nothing trained


@pytest.mark.parametrize(
    "algorithm,rollout_size",
    [("grpo", 16), ("grpo", 32), ("rloo", 32)],
    ids=["grpo-one-step-rollouts", "grpo-rollout-of-two-steps", "rloo-rollout-of-two-steps"],
)
def test_skipping_zero_advantage_rows_gives_the_same_losses_and_weights(rl, algorithm, rollout_size):
    """`skip_zero_advantage` (beta 0) leaves the completions with advantage 0 untrained and counts their loss units:
    every step's loss, loss units and the final adapters match the run that trains them. In file order (no
    shuffle), rollouts of 4 prompts alternate between "add 0 b" and "add 2 b" (rewards all 1.0: uniform groups)
    and "add 1 b" and "add 3 b" (letters: groups with signal), so steps 1 and 3 skip every row: the optimiser then
    steps on a zero gradient, and at step 3 AdamW's moments still move the weights, as in the run that trains them.
    With a rollout of two steps, the old log-probs (and the KL log's reference log-probs) are computed for the
    trained rows only. The two runs score different sets of rows, which may be laid out differently (a group's
    rows in one row, or a masked row per group: `logprobs._one_row_pays`), so their log-probs agree to float
    rounding; AdamW eps 1 keeps the step nearly linear in the gradient, so last-bit differences of near-zero
    gradients stay last-bit (as in the resume tests; at eps 1e-8 one element of 4,144 moved 2e-6 after 4 steps)."""
    overrides = {"algorithm.rollout.batch_size": rollout_size, "data.shuffle": "false", "run.max_steps": 4,
                 "technique.target_modules": "[lm_head]", "optim.lr": 3e-2, "algorithm.beta": 0,
                 "optim.eps": 1.0}  # fmt: skip
    runs = {}
    for skip in (True, False):
        cfg = rl(f"{algorithm}-{rollout_size}-skip-{skip}", algorithm=algorithm, reward="even_first_is_uniform",
                 **{**overrides, "algorithm.skip_zero_advantage": str(skip).lower()})  # fmt: skip
        result = train(cfg, return_model=True)
        lora = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
        runs[skip] = (read_metrics(result.run_dir / "metrics.jsonl"), lora)
    (skipped, lora_skipped), (trained, lora_trained) = runs[True], runs[False]
    fractions = [h["skipped_fraction"] for h in skipped]
    assert fractions[0] == fractions[2] == 1.0 and fractions[1] < 1.0 and fractions[3] < 1.0
    if algorithm == "grpo" and rollout_size == 16:  # one rollout a step: every row of a uniform group is skipped
        assert all(h["skipped_fraction"] >= h["uniform_group_fraction"] for h in skipped)
    assert all("skipped_fraction" not in h for h in trained)
    assert [h["loss_units"] for h in skipped] == [h["loss_units"] for h in trained]
    # the loss forward's entropy is absent where no completion trained; the sampler's estimate is there every step
    assert "entropy" not in skipped[0] and "entropy" not in skipped[2] and all("entropy" in h for h in trained)
    assert [h["sampling_entropy"] for h in skipped] == pytest.approx([h["sampling_entropy"] for h in trained],
                                                                     rel=1e-5)  # fmt: skip
    # on-policy (ratio 1) the loss is minus the advantages' token mean, ~0 here up to rounding (1e-9): the gradient
    # norms and the weights are the real check
    assert [h["loss"] for h in skipped] == pytest.approx([h["loss"] for h in trained], rel=1e-6, abs=1e-7)
    assert [h["grad_norm"] for h in skipped] == pytest.approx([h["grad_norm"] for h in trained], rel=1e-5)
    assert skipped[0]["grad_norm"] == skipped[2]["grad_norm"] == 0.0 and skipped[1]["grad_norm"] > 0
    for name, p in lora_trained.items():
        torch.testing.assert_close(lora_skipped[name], p, rtol=1e-5, atol=1e-7)
    # the adapters moved at step 3, on AdamW's moments alone (a skipped step that left the optimiser out would not)
    assert any(not torch.all(p == 0) for n, p in lora_skipped.items() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------------------- RLOO
def test_rloo_learns_a_toy_reward_with_its_kl_penalty_in_the_reward(rl, tiny_model_dir):
    """RLOO on the shared loop: k = 4 completions per prompt, the KL penalty taken off the reward (step 1: the
    adapter is a no-op, so KL 0 and the penalised reward is the raw reward), one loss unit per completion, ratio
    1 on-policy, and the letters reward rises as it does for GRPO."""
    cfg = rl("rloo", algorithm="rloo", **{"algorithm.beta": 0.01, "technique.target_modules": "[lm_head]",
                                          "optim.lr": 3e-2, "run.max_steps": 12})  # fmt: skip
    result = train(cfg, return_model=True)
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert hist[0]["kl"] == 0.0
    assert hist[0]["penalised_reward_mean"] == pytest.approx(hist[0]["reward/total_mean"], abs=1e-6)
    for h in hist:
        assert h["loss_units"] == 16  # completions, whatever their lengths
        assert h["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and h["clip_fraction"] == 0.0
        assert h["penalised_reward_mean"] == pytest.approx(h["reward/total_mean"] - 0.01 * h["kl"], abs=1e-4)
    assert any(h["kl"] > 0 for h in hist[1:])
    rewards = [h["reward/letters_mean"] for h in hist]
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.6, rewards
    _frozen_base_unchanged(result.model, tiny_model_dir)


def test_rloo_without_penalty_needs_no_reference_and_ties_train_nothing(rl):
    """beta 0: no reference forward; a constant reward gives every group equal rewards, advantages exactly 0,
    so the loss is 0 and the adapters stay where they started."""
    result = train(
        rl("rloo-tie", algorithm="rloo", reward="constant", **{"algorithm.beta": 0}), return_model=True
    )
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert [h["loss"] for h in hist] == [0.0] * 3
    assert "kl" not in hist[0]  # no reference forward, so no KL to log
    assert all(torch.all(p == 0) for n, p in result.model.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------------------------------------------------- PPO
def test_ppo_lora_trains_adapters_and_value_head_and_the_value_loss_falls(rl, tiny_model_dir):
    """Reward 1 for every completion, no KL penalty, lam = 1: every token's return is exactly 1. The value head
    starts at 0, so the first value loss is 0.5 (1 - 0)^2 = 0.5; then the head learns the returns."""
    cfg = rl(
        "ppo",
        algorithm="ppo",
        reward="constant",
        **{"algorithm.kl_coef": 0, "algorithm.lam": 1.0, "algorithm.rollout.batch_size": 16,
           "optim.batch_size": 8, "technique.target_modules": "[lm_head]", "run.max_steps": 10},
    )  # fmt: skip
    result = train(cfg, return_model=True)
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert result.key_metric == "reward/total_mean" and hist[-1][result.key_metric] == 1.0  # the summary's
    for h in hist:
        for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "kl_coef", "returns_mean"):
            assert math.isfinite(h[key]), key
        assert "explained_variance" in h and h["returns_mean"] == pytest.approx(1.0, abs=1e-6)
        # the policy's entropy at the completion tokens, logged as GRPO and RLOO log it (the README says so); at
        # a step's first update the loss forward is the sampler's, so the sampler's estimate is close
        assert 0 < h["entropy"] <= math.log(259) + 1e-4
    assert hist[0]["sampling_entropy"] == pytest.approx(hist[0]["entropy"], abs=SAMPLED_ENTROPY_TOLERANCE)
    assert hist[0]["value_loss"] == pytest.approx(0.5, abs=1e-6)
    assert sum(h["value_loss"] for h in hist[-3:]) / 3 < 0.2
    assert hist[0]["approx_kl"] == 0.0 and any(h["approx_kl"] > 0 for h in hist[1::2])  # 2nd steps off-policy

    model = result.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert not torch.all(model.head.weight == 0)  # the value head moved from its zero init
    _frozen_base_unchanged(model, tiny_model_dir, prefix="policy.")

    from posttrain.evaluation import load_for_inference

    loaded, _ = load_for_inference(str(result.final_dir))  # the policy alone, as a plain adapter
    assert (result.final_dir / "score_head.safetensors").is_file()
    _same_logits(loaded, model.policy.eval())


def test_ppo_learns_a_toy_reward_with_its_kl_reference(rl):
    cfg = rl(
        "ppo-learn",
        algorithm="ppo",
        **{"algorithm.kl_coef": 0.01, "technique.target_modules": "[lm_head]", "optim.lr": 3e-2,
           "run.max_steps": 16},
    )  # fmt: skip
    hist = read_metrics(train(cfg).run_dir / "metrics.jsonl")
    rewards = [h["reward/letters_mean"] for h in hist]
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-3:]) / 3 > 0.5, rewards
    assert hist[0]["kl"] == 0.0 and hist[-1]["kl"] > 0  # reference: the base, adapter disabled
    assert all(math.isfinite(h["explained_variance"]) for h in hist)


TIMES = ("tokens_per_s", "step_time_s", "data_time_s", "train_time_s", "elapsed_s", "peak_rss_gb", "gen_time_s",
         "reward_time_s", "prepare_time_s")  # what a resumed run logs otherwise: the rest it logs as the one


def _untimed(run_dir):
    return [{k: v for k, v in h.items() if k not in TIMES} for h in read_metrics(run_dir / "metrics.jsonl")]


def _same_final_weights(a, b):
    from safetensors.torch import load_file

    for name in sorted(p.name for p in (a / "final").glob("*.safetensors")):
        wa, wb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_ppo_resumed_mid_rollout_ends_as_the_uninterrupted_run(rl):
    """Stopped after step 3 (the first step of rollout 1), resumed to 4: step 4 trains on rollout 1 as the
    checkpoint kept it (the samples, old log-probs, values and returns the value head made then), not on a rollout
    sampled anew from weights it was not sampled from; metrics and weights equal a run never stopped. The value
    head comes back too: a fresh zero head would score this step's returns (all exactly 1) with a value loss of
    exactly 0.5."""
    overrides = {"algorithm.kl_coef": 0, "algorithm.lam": 1.0, "algorithm.rollout.batch_size": 16,
                 "optim.batch_size": 8, "technique.target_modules": "[lm_head]", "run.save_every": 1}  # fmt: skip
    whole = train(rl("whole", algorithm="ppo", reward="constant", **overrides, **{"run.max_steps": 4}))
    first = train(rl("resume", algorithm="ppo", reward="constant", **overrides))
    assert (first.run_dir / "checkpoints" / "step-000003" / "source_state_0.pt").is_file()  # inside rollout 1
    assert not (first.run_dir / "checkpoints" / "step-000002" / "source_state_0.pt").exists()  # at its end
    resumed = train(
        rl("resume", algorithm="ppo", reward="constant", **overrides, **{"run.max_steps": 4}), resume=True
    )
    hist = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert first.run_dir == resumed.run_dir and [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h["rollout"] for h in hist] == [0, 0, 1, 1]
    assert "gen_time_s" in hist[2] and "gen_time_s" not in hist[3]  # rollout 1 was not sampled again
    assert hist[0]["value_loss"] == pytest.approx(0.5, abs=1e-6)
    assert abs(hist[3]["value_loss"] - 0.5) > 0.05
    assert _untimed(resumed.run_dir) == _untimed(whole.run_dir)
    _same_final_weights(resumed.run_dir, whole.run_dir)
    # a cut rollout file is damage named before any model loads, like the checkpoint's other files
    from posttrain.trainer.checkpoint import checkpoint_problem

    kept = first.run_dir / "checkpoints" / "step-000003"
    assert checkpoint_problem(kept) is None
    (kept / "source_state_0.pt").write_bytes((kept / "source_state_0.pt").read_bytes()[:200])
    assert checkpoint_problem(kept) == "source_state_0.pt is cut short or corrupt"


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_resumed_inside_a_rollout_end_as_the_uninterrupted_run(rl, algorithm):
    """Sampling at T = 1, 4 optimisation steps per rollout (2 steps x rollout.epochs 2, the second pass shuffled),
    the ratio clip acting: stopped after step 2 (inside rollout 0) and resumed to step 6 (into rollout 1), the run
    logs what the run never stopped logs, step for step, and saves the same weights bit for bit. Before the
    checkpoint kept the rollout in progress, the resumed steps 3-4 trained on a rollout sampled anew from the
    step-2 weights: other samples, a ratio of 1, and other weights from there on."""
    overrides = {"algorithm.rollout.batch_size": 16, "algorithm.rollout.epochs": 2, "optim.batch_size": 8,
                 "run.save_every": 2, "algorithm.rollout.temperature": 1.0}  # fmt: skip
    whole = train(rl(f"{algorithm}-whole", algorithm, **overrides, **{"run.max_steps": 6}))
    train(rl(f"{algorithm}-resume", algorithm, **overrides, **{"run.max_steps": 2}))
    resumed = train(rl(f"{algorithm}-resume", algorithm, **overrides, **{"run.max_steps": 6}), resume=True)
    hist = _untimed(resumed.run_dir)
    assert [h["rollout"] for h in hist] == [0, 0, 0, 0, 1, 1]
    assert hist == _untimed(whole.run_dir)
    if algorithm == "grpo":
        assert any(h["clip_fraction"] > 0 for h in hist[2:4])  # the old log-probs the resumed steps used matter
    _same_final_weights(resumed.run_dir, whole.run_dir)


def test_ppo_adaptive_kl_coefficient_survives_a_resume(rl):
    """Rollout 0 (steps 1-2) has KL exactly 0 (policy = reference: LoRA's B matrices start at zero), so the
    controller moves the coefficient 0.1 -> 0.1 x (1 + clip((0 - 1) / 1, -0.2, 0.2) x 16 / 100) = 0.0968 for
    rollout 1. A run stopped after step 2 and resumed must use 0.0968 at step 3, not restart from ppo.kl_coef."""
    overrides = {"algorithm.adaptive_kl": True, "algorithm.kl_coef": 0.1, "algorithm.target_kl": 1.0,
                 "algorithm.kl_horizon": 100, "algorithm.rollout.batch_size": 16, "algorithm.rollout.epochs": 1,
                 "optim.batch_size": 8, "run.save_every": 1, "run.max_steps": 2}  # fmt: skip
    first = train(rl("adaptive", algorithm="ppo", **overrides))
    saved = json.loads((first.run_dir / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert {k: v for k, v in saved.items() if k != "source"} == {"step": 2, "layout": "whole", "world_size": 1}
    assert saved["source"]["kl_coef"] == pytest.approx(0.0968)
    assert saved["source"]["rollout_start"] == {"rollout": 0, "state": {"kl_coef": 0.1}, "dead_rewards": []}
    resumed = train(rl("adaptive", algorithm="ppo", **{**overrides, "run.max_steps": 3}), resume=True)
    hist = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [h["step"] for h in hist] == [1, 2, 3] and [h["rollout"] for h in hist] == [0, 0, 1]
    assert [h["kl_coef"] for h in hist] == pytest.approx([0.1, 0.1, 0.0968], abs=1e-12)


def test_a_rollout_sampled_anew_on_resume_counts_once(rl, tmp_path):
    """Resumed where the checkpoint's rollout cannot be read back (another number of processes: here its file is
    removed), the rollout is sampled anew, from the state it began with: PPO's adaptive coefficient is not updated
    by it twice, and a dead-reward streak does not count it twice (a review: "rollouts 0, 1, 1")."""
    import shutil

    from posttrain.cli import main
    from posttrain.errors import NoRewardSignal

    overrides = {"algorithm.adaptive_kl": True, "algorithm.kl_coef": 0.1, "algorithm.target_kl": 1.0,
                 "algorithm.kl_horizon": 100, "algorithm.rollout.batch_size": 16, "algorithm.rollout.epochs": 1,
                 "optim.batch_size": 8, "run.save_every": 1}  # fmt: skip
    whole = read_metrics(train(rl("kl-whole", algorithm="ppo", **overrides, **{"run.max_steps": 4})).run_dir
                         / "metrics.jsonl")  # fmt: skip
    cut = train(rl("kl-cut", algorithm="ppo", **overrides, **{"run.max_steps": 3})).run_dir
    (cut / "checkpoints" / "step-000003" / "source_state_0.pt").unlink()  # inside rollout 1: not kept
    hist = read_metrics(train(rl("kl-cut", algorithm="ppo", **overrides, **{"run.max_steps": 4}), resume=True).run_dir
                        / "metrics.jsonl")  # fmt: skip
    assert [h["kl_coef"] for h in hist] == [h["kl_coef"] for h in whole] == pytest.approx([0.1, 0.1, 0.0968, 0.0968])
    # every reward fails, 2 steps a rollout: rollouts 0 and 1 train steps 1-4, rollout 2 stops the run
    dead = {"algorithm.rollout.epochs": 2, "run.save_every": 1, "run.max_steps": 8, "run.keep_checkpoints": 9}
    cfg = rl("dead2", reward="broken", **dead)
    path = tmp_path / "dead2.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    run_dir = tmp_path / "dead2"
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    (run_dir / "checkpoints" / "step-000003" / "source_state_0.pt").unlink()
    with pytest.raises(NoRewardSignal, match=r"3 rollouts in a row \(rollouts 0, 1, 2\)"):
        train(cfg, resume=True)
    assert [h["step"] for h in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_bad_reward_spec_fails_before_the_model_loads(rl, tmp_path, monkeypatch):
    """A misspelt reward or a broken reward file is a ConfigError naming the spec, raised before any model load."""
    import posttrain.train as train_module
    from posttrain.errors import ConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward specs were checked")

    monkeypatch.setattr(train_module, "load_model", no_load)
    with pytest.raises(ConfigError, match=r"algorithm.rewards\[0\]: unknown reward 'numeric_answr'"):
        train(rl("bad-name", **{"algorithm.rewards": "[numeric_answr]"}))
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(
        ConfigError, match=r"algorithm.rewards\[0\]: importing .*broken.py.* RuntimeError: boom"
    ):
        train(rl("bad-file", **{"algorithm.rewards": f"[{tmp_path / 'broken.py'}:f]"}))


def test_the_summary_counts_the_steps_whose_groups_all_scored_alike(rl, tmp_path, capsys):
    """A reward that cannot tell completions apart gives every completion advantage 0: those steps are skipped
    whole and the run ends without a word about it. The summary counts them (steps_without_signal)."""
    from posttrain.trainer.summary import format_summary, run_summary

    (tmp_path / "flat.py").write_text("def flat(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                                      "def odd(prompts, completions, **kw):\n"
                                      "    return [float(len(c) % 2) for c in completions]\n")  # fmt: skip
    flat = run_summary(train(rl("flat", **{"algorithm.rewards": f"[{tmp_path / 'flat.py'}:flat]",
                                           "run.max_steps": 2})))  # fmt: skip
    assert flat["steps_without_signal"] == 2
    assert ("  no signal:    2 of these 2 steps had none: every completion of every group scored alike "
            "(uniform_group_fraction 1.0)") in format_summary(flat)
    # a function returning one value for the batch is called per sample: said as such, not as "failed on 0"
    (tmp_path / "one.py").write_text("def one(prompts, completions, **kw):\n    return [1.0]\n")
    capsys.readouterr()
    one = run_summary(train(rl("one", **{"algorithm.rewards": f"[{tmp_path / 'one.py'}:one]", "run.max_steps": 2})))
    out = capsys.readouterr().out
    assert ("warning: reward 'one': its call on the 16 samples of rollout 0 failed (returned 1 values for 16 samples"
            in out and "so it is called once per sample" in out and "failed on 0" not in out)  # fmt: skip
    assert one["steps_without_signal"] == 2
    # ... and a real failure of that function later is still said (the per-sample note used up its one warning)
    (tmp_path / "later.py").write_text(
        "calls = [0]\n"
        "def later(prompts, completions, **kw):\n"
        "    calls[0] += 1\n"
        "    if len(completions) > 1:\n        return [1.0]\n"
        "    if calls[0] == 19:\n        raise ValueError('boom')\n"  # rollout 1's first sample (17 calls a rollout)
        "    return [float(len(completions[0]) % 2)]\n")  # fmt: skip
    capsys.readouterr()
    train(rl("later", **{"algorithm.rewards": f"[{tmp_path / 'later.py'}:later]", "run.max_steps": 2}))
    out = capsys.readouterr().out
    assert "warning: reward 'later': its call on the 16 samples of rollout 0 failed" in out
    assert "warning: reward 'later' failed on 1 of 16 samples of rollout 1" in out  # (naming the batch's error)
    odd = train(rl("odd", **{"algorithm.rewards": f"[{tmp_path / 'flat.py'}:odd]", "run.max_steps": 2}))
    skipped = [h["skipped_fraction"] for h in odd.history if "loss" in h]
    uniform = [h["uniform_group_fraction"] for h in odd.history if "loss" in h]
    assert run_summary(odd)["steps_without_signal"] == sum(x >= 1.0 for x in skipped) == sum(x >= 1.0 for x in uniform) < 2
    # with a KL penalty nothing is skipped (the penalty has a gradient), and the steps still had no reward signal;
    # so for RLOO, whose penalty is in the rewards
    for method in ("grpo", "rloo"):
        kl = run_summary(train(rl(f"flat-kl-{method}", method, **{"algorithm.beta": 0.1, "run.max_steps": 2,
                                                                  "algorithm.rewards": f"[{tmp_path / 'flat.py'}:flat]"})))  # fmt: skip
        assert kl["steps_without_signal"] == 2, method


def test_what_a_reward_counts_of_its_own_is_said_once_and_logged_per_rollout(rl, tmp_path, capsys):
    """A reward function with `events()` (code_exec's timeouts): its counts are logged per rollout as
    reward/EVENT_NAME and the first non-zero count is said once, with the function's note."""
    (tmp_path / "counting.py").write_text(
        "seen = [0]\n"
        "def counting(prompts, completions, **kwargs):\n"
        "    seen[0] += 2\n"
        "    return [float(len(c) % 2) for c in completions]\n"
        "def events():\n"
        "    n, seen[0] = seen[0], 0\n"
        "    return {'slow': n}\n"
        "counting.events = events\n"
        "counting.event_notes = {'slow': 'two samples were slow'}\n"
    )
    result = train(rl("counting", **{"algorithm.rewards": f"[{tmp_path / 'counting.py'}:counting]",
                                     "run.max_steps": 3}))  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("warning: reward 'counting': 2 of 16 samples of rollout 0: two samples were slow; further ones "
                     "are only counted (reward/slow_counting in metrics.jsonl)") == 1  # fmt: skip
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert [h["reward/slow_counting"] for h in hist] == [2.0, 2.0, 2.0]


def test_a_failing_reward_is_reported_once_and_the_run_goes_on(rl, tmp_path, capsys):
    """The first sample of every call is NaN: it gets the fallback and is counted each rollout; the reason is
    printed once; the run finishes."""
    (tmp_path / "flaky.py").write_text(
        "def flaky(prompts, completions, **kwargs):\n"
        "    return [float('nan')] + [1.0] * (len(completions) - 1)\n"
    )
    result = train(
        rl("flaky", **{"algorithm.rewards": f"[{tmp_path / 'flaky.py'}:flaky]", "run.max_steps": 3})
    )
    out = capsys.readouterr().out
    assert (
        out.count("warning: reward 'flaky' failed on 1 of 16 samples") == 1 and "not a finite number" in out
    )
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert [h["reward/failures_flaky"] for h in hist] == [1.0, 1.0, 1.0]
    assert [h["reward/flaky_mean"] for h in hist] == [15 / 16] * 3  # the fallback 0 counted in the mean


def test_grpo_log_kl_false_skips_the_reference_forward_at_beta_zero(rl, monkeypatch):
    from posttrain.models.reference import Reference

    calls = []
    real = Reference.logps
    monkeypatch.setattr(Reference, "logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    hist = read_metrics(train(rl("nokl", **{"algorithm.log_kl": "false"})).run_dir / "metrics.jsonl")
    assert calls == [] and all("kl" not in h for h in hist)
    train(rl("kl", **{"run.max_steps": 1}))
    assert calls == [1]  # log_kl (the default): one reference forward per rollout


def test_reward_inputs_are_checked_before_the_model_loads(rl, tmp_path, monkeypatch):
    """A column a built-in reward reads, a task the `task` reward cannot find, and a reward-model folder that is not
    one are errors naming the file, line and field, before any model loads (else every sample would silently
    get the fallback and the run would learn nothing)."""
    import posttrain.train as train_module
    from posttrain.errors import ConfigError, DataError

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(DataError) as err:  # the rows have `answer` but no `tests`, and no task anywhere
        train(rl("cols", **{"algorithm.rewards": "[code_exec, task]"}))
    n = len(PROMPTS)
    assert [str(p) for p in err.value.problems] == [  # every row, not the first one only
        *(f"{tmp_path / 'prompts.jsonl'}:{i}: tests: missing: reward 'code_exec' (algorithm.rewards[0]) reads it; "
          "this row has: answer" for i in range(1, n + 1)),
        *(f"{tmp_path / 'prompts.jsonl'}:{i}: metadata.task: reward 'task' (algorithm.rewards[1]) scores the rows of "
          "posttrain's built-in tasks, each naming its task in a `task` column or metadata.task (as `posttrain data "
          "make arithmetic --kind prompts` writes them), and this row names none. For a file of your own with numeric "
          "answers, algorithm.rewards=[numeric_answer] compares the completion's final answer with the number in "
          "`answer` (in a text, its last: GSM8K's `#### 72`); for a built-in task's rows without their metadata, "
          "name the task: {name: task, args: {task: arithmetic}} in algorithm.rewards" for i in range(1, n + 1)),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"algorithm.reward_model \(reward_model\): .* is not a folder"):
        train(rl("rm", **{"algorithm.reward_model": str(tmp_path / "nowhere")}))
    (tmp_path / "lm").mkdir()
    with pytest.raises(ConfigError, match="is neither a saved model"):
        train(rl("rm2", **{"algorithm.reward_model": str(tmp_path / "lm")}))
    (tmp_path / "lm" / "config.json").write_text("{}")  # a plain model folder: no head
    with pytest.raises(ConfigError, match="has no score_head.safetensors: it is not a reward model"):
        train(rl("rm3", **{"algorithm.reward_model": str(tmp_path / "lm")}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm.rollout.top_p": 0.9}, "top_p < 1 is not supported for grpo"),
        ({"technique.dropout": 0.05}, r"technique.dropout \(0.05\) must be 0 for grpo"),
        ({"algorithm.rollout.engine": "vllm"}, "engine=vllm needs the vllm package"),
        (
            {"data.eval": "x.jsonl"},
            "data.eval = x.jsonl would be ignored: .* this run has algorithm.name=grpo",
        ),
    ],
)
def test_rl_settings_that_cannot_work_are_config_errors(rl, overrides, message):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        rl("bad", **overrides)


def test_rewards_in_a_non_rl_config_are_an_error(make_cfg):
    from posttrain.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"algorithm.rewards: not a setting of algorithm.name=sft; it belongs to "
        "grpo, ppo",
    ):
        make_cfg("sft", **{"algorithm.rewards": "[task]"})


@pytest.mark.parametrize(
    "algorithm,overrides",
    [
        ("grpo", {}),
        ("grpo", {"algorithm.rollout.batch_size": 32}),
        ("ppo", {"algorithm.rollout.batch_size": 16}),
    ],
    ids=["grpo-one-step-rollouts", "grpo-rollout-of-two-steps", "ppo"],
)
def test_the_sampler_trainer_logp_gap_is_logged_and_shows_a_sampler_that_differs(
    rl, monkeypatch, algorithm, overrides
):
    """Every step logs the mean |sampler - trainer| log-prob of the completion tokens, measured against the
    trainer's log-probs under the sampling weights: the loss forward's own (GRPO, one-step rollouts) or the old
    log-probs computed before any update (GRPO rollouts of several steps; PPO). The same distribution gives a
    float-rounding gap; a repetition penalty slipped into the sampler (as Qwen2.5-Instruct's generation_config
    would have done) gives a clear one."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from posttrain.rollout import engine

    overrides = {"optim.batch_size": 16 if algorithm == "grpo" else 8, "run.max_steps": 2, **overrides}
    hist = read_metrics(train(rl(f"gap-{algorithm}", algorithm, **overrides)).run_dir / "metrics.jsonl")
    assert len(hist) == 2 and all(0 <= h["logp_gap_sampler_trainer"] < 1e-5 for h in hist)  # measured ~2e-7

    real = engine.sampling_processors
    monkeypatch.setattr(
        engine, "sampling_processors", lambda *a: [RepetitionPenaltyLogitsProcessor(2.0), *real(*a)]
    )
    hist = read_metrics(
        train(rl(f"gap-{algorithm}-skewed", algorithm, **overrides)).run_dir / "metrics.jsonl"
    )
    # The tiny random model's logits are all near 0, so a penalty that scales them moves each token's log-prob
    # only a little (measured ~7e-3 here): still four orders of magnitude above the float rounding.
    assert all(h["logp_gap_sampler_trainer"] > 1e-3 for h in hist)


def test_bfloat16_sampling_trains_in_float32_and_logs_the_precision_gap(rl, monkeypatch, capsys):
    """`rollout.dtype: bfloat16` (GRPO, LoRA merged for sampling): the adapters train and stay float32, and every
    step logs a sampler/trainer gap far above the float32 rounding the test above measures (< 1e-5): the samples
    came from bfloat16 weights, scored by the float32 ones. On a CPU without bfloat16 instructions the launch says
    that sampling is likely slower."""
    import posttrain.train

    monkeypatch.setattr(posttrain.train, "cpu_has_bf16", lambda: False)
    result = train(rl("bf16-sampling", **{"algorithm.rollout.dtype": "bfloat16", "run.max_steps": 2}),
                   return_model=True)  # fmt: skip
    hist = read_metrics(result.run_dir / "metrics.jsonl")
    assert len(hist) == 2 and all(h["logp_gap_sampler_trainer"] > 1e-4 for h in hist)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert ("note: algorithm.rollout.dtype=bfloat16 samples in bfloat16, but this CPU has no bfloat16 instructions"
            in capsys.readouterr().out)  # fmt: skip


def test_bfloat16_sampling_is_refused_where_the_run_computes_in_bfloat16_already(rl, monkeypatch):
    """`model.dtype: auto` resolves to bfloat16 on a GPU that has it: the run samples in bfloat16 already, so
    `rollout.dtype` would do nothing; refused before the run folder is written (here the GPU's answer is faked)."""
    import posttrain.train
    from posttrain.errors import ConfigError

    monkeypatch.setattr(posttrain.train, "resolve_dtype", lambda dtype, device=None: torch.bfloat16)
    cfg = rl("bf16-refused", **{"algorithm.rollout.dtype": "bfloat16"})
    with pytest.raises(ConfigError, match=r"computes in bfloat16 already \(model.dtype=auto on cpu\)"):
        train(cfg)
    assert not (Path(cfg.run.output_dir) / "config.yaml").exists()


# ------------------------------------------------------------------------------------------ truncated completions
# max_new_tokens 2: every completion of these runs is truncated (the tiny model almost never samples EOS; each
# test checks truncated_fraction == 1 first, so a seed that changes that fails loudly rather than passing).
SHORT = {"algorithm.rollout.max_new_tokens": 2, "run.max_steps": 2}


def test_reward_functions_see_which_completions_were_truncated(rl):
    hist = read_metrics(train(rl("flag", reward="truncated_flag", **SHORT)).run_dir / "metrics.jsonl")
    assert (
        [h["reward/truncated_flag_mean"] for h in hist]
        == [h["truncated_fraction"] for h in hist]
        == [1.0, 1.0]
    )
    assert [h["reward/failures_truncated_flag"] for h in hist] == [0.0, 0.0]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_overlong_fixed_replaces_the_reward_of_truncated_completions(rl, algorithm):
    overrides = {**SHORT, "algorithm.rollout.overlong": "fixed", "algorithm.rollout.overlong_reward": -0.5}
    if algorithm == "ppo":
        overrides.update({"optim.batch_size": 8, "algorithm.kl_coef": 0})
    hist = read_metrics(
        train(rl(f"fixed-{algorithm}", algorithm, "constant", **overrides)).run_dir / "metrics.jsonl"
    )
    for h in hist:
        assert h["truncated_fraction"] == 1.0
        assert h["reward/constant_mean"] == 1.0  # the function's own score, as it scored it
        assert h["reward/total_mean"] == -0.5 and h["reward/total_std"] == 0.0  # what the algorithm uses
        if algorithm == "ppo":
            assert h["score_mean"] == -0.5


def test_overlong_soft_adds_dapos_penalty(rl):
    """Every completion reaches L_max = max_new_tokens, so DAPO's penalty is -1 for each: total = letters - 1."""
    hist = read_metrics(
        train(rl("soft", **SHORT, **{"algorithm.rollout.overlong": "soft"})).run_dir / "metrics.jsonl"
    )
    for h in hist:
        assert h["truncated_fraction"] == 1.0
        assert h["reward/total_mean"] == pytest.approx(h["reward/letters_mean"] - 1.0, abs=1e-6)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_overlong_filter_leaves_truncated_completions_without_loss(rl, algorithm, capsys):
    """Every completion truncated: no loss unit, no gradient, nothing moves (LoRA's B matrices stay 0, PPO's value
    head stays at its zero init); the same run with `score` does train. The run says so (a warning once, the
    summary's count) and logs no token mean over the tokens it did not have: PPO logged a sampler/trainer gap,
    entropy, clip fraction and KL of exactly 0, a perfect match and a collapsed policy to the eye."""
    from posttrain.trainer.summary import format_summary, run_summary

    overrides = {
        **SHORT,
        "technique.target_modules": "[lm_head]",
        "optim.lr": 3e-2,
    }
    if algorithm == "ppo":
        overrides.update({"optim.batch_size": 8, "algorithm.rollout.batch_size": 16})
    else:
        overrides["algorithm.loss_type"] = "grpo"
    runs, said = {}, {}
    for overlong in ("filter", "score"):
        cfg = rl(
            f"{overlong}-{algorithm}", algorithm, **overrides, **{"algorithm.rollout.overlong": overlong}
        )
        capsys.readouterr()
        runs[overlong] = train(cfg, return_model=True)
        said[overlong] = capsys.readouterr().out
    hist = read_metrics(runs["filter"].run_dir / "metrics.jsonl")
    assert all(h["truncated_fraction"] == 1.0 for h in hist)
    assert [(h["loss_units"], h["loss"], h["grad_norm"]) for h in hist] == [(0.0, 0.0, 0.0)] * 2
    token_means = {"logp_gap_sampler_trainer", "entropy", "clip_fraction", "approx_kl"}
    assert not token_means & {k for h in hist for k in h}
    assert token_means & set(read_metrics(runs["score"].run_dir / "metrics.jsonl")[0]) >= {"entropy"}
    assert said["filter"].count("warning: every completion of rollout") == 1
    assert "warning: every completion of rollout 0 reached algorithm.rollout.max_new_tokens (2)" in said["filter"]
    assert "every completion of rollout" not in said["score"]
    summaries = {k: run_summary(r) for k, r in runs.items()}
    assert (summaries["filter"]["steps_without_tokens"], summaries["score"]["steps_without_tokens"]) == (2, 0)
    assert "  nothing trained: 2 of these 2 steps had no token in the loss" in format_summary(summaries["filter"])
    assert "nothing trained" not in format_summary(summaries["score"])
    for overlong, moved in (("filter", False), ("score", True)):
        model = runs[overlong].model
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert any(bool(torch.any(p != 0)) for p in lora_b) == moved, overlong
        if algorithm == "ppo":
            assert bool(torch.any(model.head.weight != 0)) == moved, overlong
    assert all(h["loss_units"] > 0 for h in read_metrics(runs["score"].run_dir / "metrics.jsonl"))


# ------------------------------------------------------------------------------------ a reward with no signal left
def test_a_run_whose_rewards_all_fail_stops_with_exit_2_and_keeps_its_checkpoints(
    rl, tmp_path, capsys, monkeypatch
):
    """Every reward fails on every sample: after 3 rollouts in a row the run stops (exit 2) naming the function,
    the file and line of its first failure, and the error; the checkpoints written before stay loadable and no
    final model appears. (One step per rollout: steps 1 and 2 train and are saved; rollout 2 stops the run.)"""
    from posttrain.cli import main
    from posttrain.trainer.checkpoint import latest_checkpoint

    cfg = rl("dead", reward="broken", **{"run.save_every": 1, "run.max_steps": 6})
    path = tmp_path / "dead.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "every reward function failed on every sample of 3 rollouts in a row (rollouts 0, 1, 2)" in err
    line = next(i for i, text in enumerate(REWARDS.split("\n"), 1) if "/ scale" in text)  # the raising line
    assert f"'broken' at {tmp_path / 'rewards.py'}:{line}: ZeroDivisionError: division by zero" in err
    assert "Traceback" not in err and "No final model was written" in err
    run_dir = tmp_path / "dead"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step-000002" and str(ckpt) in err
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert not (run_dir / "final").exists() and not (run_dir / ".tmp-final").exists()
    assert [h["step"] for h in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    # Resumed unfixed, the run stops where it stopped: the checkpoint kept the streak of rollouts 0 and 1 (a count
    # that started again at the resume let one more step train and be saved).
    assert [i for i, _ in state["source"]["dead_rewards"]] == [0, 1]
    assert main(["train", str(path), "--resume"]) == 2
    assert "failed on every sample of 3 rollouts in a row (rollouts 0, 1, 2)" in capsys.readouterr().err
    assert latest_checkpoint(run_dir).name == "step-000002"
    assert [h["step"] for h in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    # The user fixes the function and resumes, as the message says (a new process would import the file anew).
    fixed = (tmp_path / "rewards.py").read_text().replace("scale = 0", "scale = 1")
    (tmp_path / "rewards.py").write_text(fixed, encoding="utf-8")
    ours = [m for m, mod in sys.modules.items() if m.startswith("posttrain_user_rewards.")
            and getattr(mod, "__file__", None) == str(tmp_path / "rewards.py")]  # fmt: skip
    assert ours  # (the first such module may be another test's file)
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    result = train(rl("dead", reward="broken", **{"run.save_every": 1, "run.max_steps": 3}), resume=True)
    assert [h["step"] for h in read_metrics(result.run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_where_some_reward_still_scores_goes_on(rl, tmp_path):
    rewards = f"[{tmp_path / 'rewards.py'}:broken, {tmp_path / 'rewards.py'}:constant]"
    hist = read_metrics(
        train(rl("half", **{"algorithm.rewards": rewards, "run.max_steps": 4})).run_dir / "metrics.jsonl"
    )
    assert [h["reward/failures_broken"] for h in hist] == [16.0] * 4
    assert [h["reward/constant_mean"] for h in hist] == [1.0] * 4


def test_a_prompts_column_named_like_one_the_rollout_adds_is_an_error(rl, tmp_path, monkeypatch):
    import posttrain.train as train_module
    from posttrain.errors import DataError

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    rows = tmp_path / "clash.jsonl"
    rows.write_text(json.dumps({"prompt": "add 1 2", "truncated": False}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"clash.jsonl:1: truncated: this column name is reserved"):
        train(rl("clash", **{"data.train": str(rows)}))


def test_prompts_that_no_step_can_use_are_named_before_training(rl, tmp_path, capsys):
    """PPO, rollouts of 8 prompts cut into 2 steps of 4: of 17 prompts the 17th of each epoch's order cannot fill
    both steps of a third rollout; the run says so, naming the line, before it trains."""
    from posttrain.data.order import epoch_order

    prompts = tmp_path / "prompts17.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"add {i} 1", "answer": str(i + 1)}) + "\n" for i in range(17))
    )
    cfg = rl("skip", algorithm="ppo", **{"data.train": str(prompts), "algorithm.rollout.batch_size": 8,
                                         "optim.batch_size": 4, "run.max_steps": 4})  # fmt: skip
    result = train(cfg)
    line = epoch_order(17, seed=0, epoch=0)[-1] + 1
    assert (
        f"warning: {prompts}: 1 of 17 examples are not trained in each epoch (after 2 rollouts of 8 prompts, the 1 "
        f"left would give 1 sequence, fewer than the 2 optimisation steps of a pass over a rollout): line {line}\n"
    ) in capsys.readouterr().out
    assert result.steps_trained == 4


def test_bad_reward_args_are_refused_before_the_run_folder_is_written(rl):
    from pathlib import Path

    from posttrain.errors import ConfigError

    cfg = rl("bad-args", **{"algorithm.rewards": "[regex_format]"})  # regex_format needs args.pattern
    with pytest.raises(ConfigError, match=r"algorithm.rewards\[0\]: bad args for 'regex_format'"):
        train(cfg)
    assert not Path(cfg.run.output_dir).exists()


def test_a_resume_says_a_rewritten_reward_file_and_refuses_an_edited_tokenizer(rl, make_cfg, tiny_model_dir, tmp_path,
                                                                               capsys):
    """--resume accepted a rewritten reward function (a resumed run's rewards went from 0.1 to 92 at its first new
    step) and an edited chat template (other tokens for the same rows), both silently: the run's fingerprint holds
    neither. It holds both now: a rewritten reward is said (rewriting a reward that failed on every sample and
    resuming is how such a run is saved), an edited tokenizer refused; restored, the run resumes."""
    import shutil

    from posttrain.errors import ConfigError

    cfg = rl("reward-edit", **{"run.max_steps": 2, "run.save_every": 1})
    train(cfg)
    rewards = tmp_path / "rewards.py"
    rewards.write_text(rewards.read_text() + "\n# rewritten\n")
    cfg = rl("reward-edit", **{"run.max_steps": 3, "run.save_every": 1})
    capsys.readouterr()
    assert train(cfg, resume=True).steps_trained == 1
    assert "warning: the reward file of algorithm.rewards[0] (" in capsys.readouterr().err

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = make_cfg("template-edit", **{"model.name": str(model), "run.max_steps": 2, "run.save_every": 1})
    train(cfg)
    config = model / "tokenizer_config.json"
    saved = config.read_text()
    config.write_text(saved.replace("{", '{"model_max_length": 4096, ', 1))
    cfg = make_cfg("template-edit", **{"model.name": str(model), "run.max_steps": 3, "run.save_every": 1})
    with pytest.raises(ConfigError, match=r"--resume: the tokenizer or chat template files of model.name \(.*model\) changed"):
        train(cfg, resume=True)
    config.write_text(saved)
    assert train(cfg, resume=True).steps_trained == 1
