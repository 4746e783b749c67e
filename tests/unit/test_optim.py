"""`trainer.optim.build_optimizer`: AdamW through torch's fused kernel where it applies, with the same update."""

from __future__ import annotations

import torch

from posttrain.config import OptimConfig
from posttrain.trainer.optim import _fusable, build_optimizer


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 6, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, generator=g))


def test_fused_on_cpu_and_its_first_step_by_hand():
    model = _Two()
    w0, b0 = model.w.detach().clone(), model.b.detach().clone()
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5, eps=1e-8))
    assert opt.defaults["fused"] is True
    g = torch.Generator().manual_seed(1)
    model.w.grad, model.b.grad = torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
    opt.step()
    # Step 1 of AdamW from zero moments: the bias-corrected m / sqrt(v) is g / |g|; decoupled decay lr x wd x p
    # on 2-D weights only (1-D: none). w1 = w0 (1 - 0.1 x 0.5) - 0.1 g / (|g| + 1e-8).
    expected_w = w0 * (1 - 0.05) - 0.1 * model.w.grad / (model.w.grad.abs() + 1e-8)
    expected_b = b0 - 0.1 * model.b.grad / (model.b.grad.abs() + 1e-8)
    torch.testing.assert_close(model.w.detach(), expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.b.detach(), expected_b, rtol=0, atol=1e-6)


def test_fused_matches_the_multi_tensor_path_to_rounding():
    runs = []
    for fused in (True, False):
        model = _Two()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.01))
        if not fused:  # the same groups through the default multi-tensor kernels
            groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-3)
            assert not any(group["fused"] for group in opt.param_groups)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            model.w.grad, model.b.grad = torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
            opt.step()
        runs.append([model.w.detach().clone(), model.b.detach().clone()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)  # the kernels differ in the last bits only


def test_sharded_or_integer_parameters_keep_the_per_tensor_path():
    p = torch.nn.Parameter(torch.zeros(2))
    assert _fusable([p])
    p.placements = ("Shard(0)",)  # what an FSDP2 DTensor parameter carries
    assert not _fusable([p])
    assert not _fusable([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_every_step_bumps_the_version_counters_that_say_weights_changed():
    from posttrain.rollout.vllm_engine import weight_versions

    model = _Two()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    assert opt.defaults["fused"] is True
    before = weight_versions(model)
    model.w.grad, model.b.grad = torch.ones(8, 6), torch.ones(6)
    opt.step()
    after = weight_versions(model)
    assert all(a > b for a, b in zip(after, before, strict=True))  # the fused kernel alone leaves them as they were
