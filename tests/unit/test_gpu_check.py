"""benchmarks/gpu_check.py's verdict on vLLM against the HF engine (`engine_comparison`): the reward curves within
noise and the sampler/trainer log-prob gap under its stated bound. Worked by hand: n = 16 completions a step, both
reward stds 0.4, so one standard error of the difference is sqrt(0.16 + 0.16) / 4 = 0.1414."""

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[2] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up while the class is made
spec.loader.exec_module(gpu_check)


def _steps(means, std=0.4, gaps=None):
    return [{"reward/total_mean": m, "reward/total_std": std, **({"logp_gap_sampler_trainer": g} if g is not None
             else {})} for m, g in zip(means, gaps or [None] * len(means))]  # fmt: skip


@pytest.mark.parametrize("vllm_means, gaps, curve, gap", [
    ([0.50, 0.62], [0.01, 0.02], "2.83 standard errors (bound 3): PASS", "2.00e-02 (bound 0.05): PASS"),  # 0.40 / 0.1414
    ([0.50, 0.72], [0.01, 0.02], "3.54 standard errors (bound 3): FAIL", "PASS"),  # 0.5 / 0.1414
    ([0.50, 0.60], [0.01, 0.051], "PASS", "5.10e-02 (bound 0.05): FAIL"),
    ([0.50, 0.60], [0.01, None], "PASS", "max over 1 steps: 1.00e-02 (bound 0.05): FAIL"),  # a step without a gap
])  # fmt: skip
def test_the_vllm_verdicts_by_hand(vllm_means, gaps, curve, gap):
    reward, logp = gpu_check.engine_comparison(_steps([0.5, 0.22]), _steps(vllm_means, gaps=gaps), 16)
    assert reward.startswith("reward curve, vLLM against HF over 2 steps of 16 completions") and reward.endswith(curve)
    assert logp.endswith(gap)


def test_equal_rewards_in_both_runs_count_one_over_n_as_the_noise():
    # both stds 0: the floor 1/16 is the standard error, so 0.0625 apart is 1.00 standard error
    reward, _ = gpu_check.engine_comparison(_steps([0.0], std=0.0), _steps([0.0625], std=0.0, gaps=[0.0]), 16)
    assert reward.endswith("1.00 standard errors (bound 3): PASS")


def test_a_missing_run_is_said_not_judged():
    assert gpu_check.engine_comparison([], _steps([0.5], gaps=[0.0]), 16) == [
        "vLLM against HF: not compared (grpo_hf has no steps)"]


def test_the_doctest():
    assert doctest.testmod(gpu_check).failed == 0
