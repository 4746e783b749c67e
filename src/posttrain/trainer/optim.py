"""Optimiser and learning-rate schedule built from `OptimConfig` (AdamW; warmup then cosine, linear or constant).

The schedules are transformers' own (`get_scheduler`); only trainable parameters reach the optimiser, so LoRA
and QLoRA carry optimiser state for the adapters alone.
"""

from __future__ import annotations

import torch

from posttrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. With `cfg.head_lr`, the scalar head's parameters (`head.*` of a
    `models.heads.ScalarHeadModel`) get that peak rate in groups of their own; the schedule scales every group."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}  # (is head, is 1-D) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((cfg.head_lr is not None and name.startswith("head."), p.ndim < 2), []).append(p)
    if not groups:
        from posttrain.errors import ConfigError

        raise ConfigError("the model has no trainable parameters; check technique.name and target_modules")
    # Sorted: body before head, decayed before not (the order checkpoints expect; the loop logs group 0's rate).
    # Standard practice (e.g. nanoGPT, HF Trainer): no weight decay on biases and norm gains (1-D tensors).
    return torch.optim.AdamW(
        [{"params": groups[head, flat], "lr": cfg.head_lr if head else cfg.lr,
          "weight_decay": 0.0 if flat else cfg.weight_decay} for head, flat in sorted(groups)],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
    )  # fmt: skip


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        )
    if cfg.schedule == "linear":
        return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
