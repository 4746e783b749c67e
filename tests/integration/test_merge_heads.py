"""`posttrain merge` keeps what a run trained: a LoRA reward model merges into a reward model (score head kept,
same scores); a PPO run merges into its policy and says the value head was training-only."""

import json

import torch
from torch.testing import assert_close

from posttrain.cli import main
from posttrain.models import load_trained
from posttrain.models.heads import HEAD_FILE, load_scalar_model, reward_model_problem
from posttrain.models.saving import read_info
from posttrain.train import train

PAIRS = [{"prompt": f"add {a} {b}", "chosen": str(a + b), "rejected": f"{a + b + 1} maybe"}
         for a in range(4) for b in range(2)]  # fmt: skip
IDS = torch.tensor([[3, 10, 20, 30, 40, 50], [3, 60, 61, 62, 63, 64]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_merged_reward_model_keeps_its_head(make_cfg, tmp_path, capsys):
    cfg = make_cfg("rm", **{"algorithm.name": "reward", "technique.name": "lora",
                            "data.train": _jsonl(tmp_path / "pairs.jsonl", PAIRS), "run.max_steps": 3})  # fmt: skip
    run = train(cfg).run_dir
    out = tmp_path / "merged-rm"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert "merged reward model written to" in capsys.readouterr().out
    assert (out / HEAD_FILE).is_file() and not (out / "adapter_config.json").exists()
    assert reward_model_problem(out) is None  # usable as --judge / algorithm.reward_model

    trained, _ = load_scalar_model(run)
    merged, _ = load_scalar_model(out)
    assert not hasattr(merged.policy, "peft_config")
    with torch.no_grad():
        # Same head on the same hidden states; W + (alpha/r) B A folded into one matrix: float32 rounding only.
        assert_close(merged.scores(IDS, MASK), trained.scores(IDS, MASK), rtol=1e-5, atol=1e-5)


def test_merged_ppo_run_is_the_policy_and_says_the_value_head_is_dropped(make_cfg, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"add {a} 1", "answer": str(a + 1)} for a in range(8)])
    cfg = make_cfg("ppo", **{
        "algorithm.name": "ppo", "technique.name": "lora", "data.train": prompts,
        "algorithm.rewards": f"[{tmp_path / 'rewards.py'}:one]", "algorithm.rollout.max_new_tokens": 4,
        "algorithm.rollout.batch_size": 8, "optim.batch_size": 8, "run.max_steps": 1,
    })  # fmt: skip
    run = train(cfg).run_dir
    assert (run / "final" / HEAD_FILE).is_file()
    out = tmp_path / "merged-ppo"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "merged policy written to" in said and "value head was used only in training and is not written" in said
    assert not (out / HEAD_FILE).exists() and read_info(out)["dropped_head"] == "value"

    policy, _ = load_trained(run)
    merged, _ = load_trained(out)
    with torch.no_grad():
        assert_close(merged(input_ids=IDS).logits, policy(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
