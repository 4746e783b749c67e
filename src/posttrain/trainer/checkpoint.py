"""Atomic checkpoints that let a killed run continue exactly where it stopped.

A checkpoint folder `checkpoints/step-000040/` holds:
- `trainable.safetensors`: every parameter that requires a gradient (the adapters under LoRA/QLoRA, all weights
  under full fine-tuning). Frozen weights are not copied: they come back from the base model.
- `optimizer.pt`, `scheduler.pt`: their state dicts.

A sharded model's (`run.sharding=fsdp2`) checkpoint has the same files: its weights and optimizer state are
gathered whole to the main process when written (the optimizer's keyed by parameter name, torch.distributed's
format), and every process loads its shard back from them.
- `rng_state_<rank>.pt`: Python, NumPy and torch generator states of each process (dropout must replay).
- `trainer_state.json`: the step reached; the data position follows from it (see `trainer.batches`); and the
  batch source's own state where it has one (`source`, e.g. PPO's adaptive KL coefficient).

It is written into `checkpoints/.tmp-step-000040/` and renamed into place only once complete, so a `kill -9` at
any moment leaves either the previous checkpoint or the new one, never a half-written folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.algorithms.base import BatchSource
from posttrain.errors import UserError
from posttrain.models.sharding import (
    full_state,
    is_sharded,
    load_full_state,
    load_optimizer_state,
    optimizer_state,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() yields a tied (shared) tensor once, so safetensors gets no aliased storage.
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, *, keep: int, source: BatchSource
) -> Path:
    """Write checkpoint `step` atomically (all processes call this); keep only the `keep` newest. The batch
    `source`'s own state, where it has one, goes into trainer_state.json."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)
    if sharded:  # gathered by every process (collectives), to the main process
        weights, optim_state = full_state(unwrapped, trainable_only=True), optimizer_state(unwrapped, optimizer)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k: v.contiguous() for k, v in weights.items()} if sharded else trainable_state(unwrapped)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        source_state = source.state_dict()
        state = {"step": step, **({"source": source_state} if source_state else {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainable(model, path: Path) -> None:
    """Copy checkpoint `path`'s trained parameters into `model`, built as the run built it (the same base and
    technique, e.g. fresh LoRA adapters), refusing a checkpoint that lacks some of its trainable parameters. Also
    how a checkpoint is scored without resuming it (`posttrain study`)."""
    model.load_state_dict(_read_trainable(model, path), strict=False)


def _read_trainable(model, path: Path) -> dict[str, torch.Tensor]:
    """Checkpoint `path`'s trained parameters (whole tensors), after checking they cover `model`'s trainable ones."""
    tensors = load_file(str(Path(path) / "trainable.safetensors"))
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(tensors)
    if missing:
        raise UserError(
            f"{path}: this checkpoint does not match the model being trained ({len(missing)} trainable "
            f"parameters missing, e.g. {sorted(missing)[0]}); was the technique or model changed?"
        )
    return tensors


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, source: BatchSource) -> int:
    """Restore weights, optimiser, schedule, RNG and the batch `source`'s own state (if it keeps one) from `path`;
    returns the step it was taken at."""
    unwrapped = accelerator.unwrap_model(model)
    tensors = _read_trainable(unwrapped, path)
    # weights_only=False: these files are our own optimizer/scheduler/RNG pickles, written by save_checkpoint.
    optim_state = torch.load(path / "optimizer.pt", weights_only=False)
    if is_sharded(unwrapped):  # every process keeps its shard of the whole tensors
        load_full_state(unwrapped, tensors)
        load_optimizer_state(unwrapped, optimizer, optim_state)
    else:
        unwrapped.load_state_dict(tensors, strict=False)
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng_state_{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    source.load_state_dict(state.get("source") or {})
    return int(state["step"])
