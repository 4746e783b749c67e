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
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = cfg.head_lr is not None and name.startswith("head.")
        # Standard practice (e.g. nanoGPT, HF Trainer): no weight decay on biases and norm gains (1-D tensors).
        if p.ndim < 2:
            (head_no_decay if head else no_decay).append(p)
        else:
            (head_decay if head else decay).append(p)
    if not decay and not no_decay and not head_decay and not head_no_decay:
        from posttrain.errors import ConfigError

        raise ConfigError("the model has no trainable parameters; check technique.name and target_modules")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.head_lr is not None:
        groups += [
            {"params": head_decay, "weight_decay": cfg.weight_decay, "lr": cfg.head_lr},
            {"params": head_no_decay, "weight_decay": 0.0, "lr": cfg.head_lr},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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
