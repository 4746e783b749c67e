"""Optimiser and learning-rate schedule built from `OptimConfig` (AdamW; warmup then cosine, linear or constant).

The decay after warmup is the one of transformers' schedules; the warmup is ours (`lr_factor`: the first step
trains at a non-zero rate). Only trainable parameters reach the optimiser, so LoRA and QLoRA carry optimiser
state for the adapters alone.
"""

from __future__ import annotations

import functools
import math

import torch

from posttrain.config import OptimConfig
from posttrain.errors import ConfigError
from posttrain.models.heads import ScalarHeadModel


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. With `cfg.head_lr`, the parameters of a scalar head (a
    `models.heads.ScalarHeadModel`'s `head`) get that peak rate in groups of their own; the schedule scales every
    group."""
    head = {id(p) for p in model.head.parameters()} if isinstance(model, ScalarHeadModel) else set()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}  # (is head, is 1-D) -> parameters
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((cfg.head_lr is not None and id(p) in head, p.ndim < 2), []).append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check technique.name and target_modules")
    # Sorted: body before head, decayed before not (the order checkpoints expect; the loop logs group 0's rate).
    # Standard practice (e.g. nanoGPT, HF Trainer): no weight decay on biases and norm gains (1-D tensors).
    trained = [p for group in groups.values() for p in group]
    fused = _fusable(trained)
    optimizer = torch.optim.AdamW(
        [{"params": groups[head, flat], "lr": cfg.head_lr if head else cfg.lr,
          "weight_decay": 0.0 if flat else cfg.weight_decay} for head, flat in sorted(groups)],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused,
    )  # fmt: skip
    if fused:
        optimizer.register_step_post_hook(_bump_versions)
    return optimizer


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After a fused step: bump each parameter's in-place version counter, as the per-tensor kernels' in-place
    updates do and the fused kernel does not (torch 2.13). What reads the counters as "these weights changed"
    (`rollout.vllm_engine.weight_versions`, which decides when to push weights to vLLM) then sees every step."""
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: on the CPU or a GPU, in a floating dtype, and not
    sharded DTensors (FSDP2), for which the per-tensor path stays. The fused kernel is the same update in one pass
    over each tensor (3.7x faster than the default multi-tensor path over the 135M model's weights on 2 CPU cores:
    0.068 s against 0.252 s a step, benchmarks/README.md); it rounds differently in the last bits (1e-10 on weights
    of 1 after 5 steps, tests/unit/test_optim.py). TRL's default (`adamw_torch_fused`) is the same kernel."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               and not hasattr(p, "placements") for p in params)  # fmt: skip


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The learning rate of 0-based optimisation step `step`, as a fraction of the peak `optim.lr`.

    Warmup: step s < warmup trains at (s + 1) / (warmup + 1) of the peak, so the first step already learns
    (transformers' warmup starts at s / warmup, which is 0 for step 1: a wasted step that only moves Adam's
    moments). After warmup, with progress p = (s - warmup) / (total - warmup): cosine decays to `min_ratio`
    as min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2, linear as 1 - p, constant stays at 1 (the same decay
    as transformers' schedules, so runs without warmup are unchanged).

    Worked example (warmup 3, total 7, linear): steps 0-2 -> 1/4, 2/4, 3/4; steps 3-6 -> p = 0, 1/4, 2/4, 3/4
    -> 1, 0.75, 0.5, 0.25.

    >>> [lr_factor(s, schedule="linear", warmup=3, total=7) for s in range(7)]
    [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]
    >>> round(lr_factor(2, schedule="cosine", warmup=0, total=4, min_ratio=0.1), 4)  # p = 1/2: halfway
    0.55
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A `LambdaLR` over `lr_factor`: every parameter group (e.g. a head with its own rate) follows it."""
    factor = functools.partial(
        lr_factor, schedule=cfg.schedule, warmup=min(cfg.warmup_steps, total_steps), total=total_steps,
        min_ratio=cfg.min_lr_ratio,
    )  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
