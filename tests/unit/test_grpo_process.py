"""GRPO's rollout processing: the batch-scaled advantages use the whole rollout's std under several processes,
and the logged KL at beta 0 never loads a second full model."""


from types import SimpleNamespace

import pytest
import torch

from posttrain.algorithms import grpo, load_config
from posttrain.algorithms.base import RolloutContext, ScoredRollout
from posttrain.models.reference import Reference
from posttrain.rollout.engine import Rollout


class TwoProcesses:
    """Stands in for rank 0 of two processes (the other rank's rewards are appended by `gather_object`, below)."""

    num_processes, process_index, device = 2, 0, torch.device("cpu")


def _scored(rewards):
    n = len(rewards)
    rollout = Rollout(
        prompt_ids=torch.full((n, 2), 5), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.full((n, 3), 6), completion_mask=torch.ones(n, 3, dtype=torch.long),
        sampling_logps=torch.zeros(n, 3), texts=["x"] * n, truncated=torch.zeros(n, dtype=torch.bool),
    )  # fmt: skip
    return ScoredRollout(rollout, [None] * n, torch.tensor(rewards), {}, trains=torch.ones(n, dtype=torch.bool))


def test_batch_scale_divides_by_the_std_over_every_process(monkeypatch):
    """Rank 0 holds rewards [0, 1 | 0, 0]; rank 1 holds [4, 8 | 2, 2]. Batch std (unbiased) of all eight:
    mean 17/8; squared deviations sum to 52.875 -> var 52.875 / 7 = 7.5536, std 2.7484. Rank 0's first group
    centred: [-0.5, 0.5] -> [-0.18192, 0.18192]; its own std (0.5) would give [-1, 1]."""
    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[constant]", "algorithm.scale=batch",
                             "algorithm.num_generations=2", "algorithm.log_kl=false",
                             "optim.batch_size=4"])  # fmt: skip
    import accelerate.utils

    # every process's rewards, as all_gather_object gives them (shares of any size: a tensor gather of unequal
    # lengths aborted a run in gloo)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [*mine, 4.0, 8.0, 2.0, 2.0])
    ctx = RolloutContext(cfg=cfg, model=None, accelerator=TwoProcesses(), micro_batch_size=4,
                         reference=Reference("none"))  # fmt: skip
    tensors, _ = grpo._process(_scored([0.0, 1.0, 0.0, 0.0]), ctx)
    std = torch.tensor([0.0, 1.0, 0.0, 0.0, 4.0, 8.0, 2.0, 2.0]).std()
    assert float(std) == pytest.approx(2.7483761, rel=1e-6)
    want = torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(tensors["advantages"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("technique,logged", [("full", False), ("lora", True), ("qlora", True)])
def test_log_kl_default_follows_the_cost_of_the_reference(technique, logged):
    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[constant]", f"technique.name={technique}"])
    assert grpo.logs_kl(cfg) is logged
    forced = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[constant]", f"technique.name={technique}",
                                "algorithm.log_kl=true"])  # fmt: skip
    assert grpo.logs_kl(forced) is True


def test_adaptive_kl_cannot_start_at_zero():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kl_coef.*stays 0"):
        load_config(None, ["algorithm.name=ppo", "algorithm.rewards=[constant]", "algorithm.adaptive_kl=true",
                           "algorithm.kl_coef=0"])  # fmt: skip


@pytest.mark.parametrize(
    "settings,skips,marked",
    [([], True, [True, True, False, False]),  # beta 0: the uniform group's rows
     (["algorithm.skip_zero_advantage=false"], True, None),
     (["algorithm.beta=0.1"], True, None),  # the KL penalty's gradient: every row trains
     ([], False, None)],  # the source cannot skip (several processes, DeepSpeed)
    ids=["beta-0", "switched-off", "beta-positive", "source-cannot-skip"],
)  # fmt: skip
def test_rows_with_advantage_zero_are_marked_only_where_their_gradient_is_zero(settings, skips, marked):
    from posttrain.algorithms.base import ZERO_GRADIENT

    log_kl = [] if "algorithm.beta=0.1" in settings else ["algorithm.log_kl=false"]
    cfg = load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[constant]", "algorithm.num_generations=2",
                             "optim.batch_size=4", *log_kl, *settings])  # fmt: skip
    one = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    ref = Reference("none") if cfg.algorithm.beta == 0 else SimpleNamespace(
        needed=True, logps=lambda t, *a, **k: torch.zeros(t["completion_mask"].shape))  # fmt: skip
    ctx = RolloutContext(cfg=cfg, model=None, accelerator=one, micro_batch_size=4, reference=ref,
                         skips_zero_gradient=skips)  # fmt: skip
    tensors, extra = grpo._process(_scored([1.0, 1.0, 0.0, 1.0]), ctx)
    assert extra["uniform_group_fraction"] == 0.5
    got = tensors.get(ZERO_GRADIENT)
    assert (got.tolist() if got is not None else None) == marked
