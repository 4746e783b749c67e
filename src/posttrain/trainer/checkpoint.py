"""Atomic checkpoints that let a killed run continue exactly where it stopped.

A checkpoint folder `checkpoints/step-000040/` holds:
- `trainable.safetensors`: every parameter that requires a gradient (the adapters under LoRA/QLoRA, all weights
  under full fine-tuning). Frozen weights are not copied: they come back from the base model.
- `optimizer.pt`, `scheduler.pt`: their state dicts.
- `rng_state_<rank>.pt`: Python, NumPy and torch generator states of each process (dropout must replay).
- `trainer_state.json`: the step reached; the data position follows from it (see `trainer.batches`); the batch
  source's own state where it has one (`source`, e.g. PPO's adaptive KL coefficient); the `layout` and the
  number of processes (`world_size`).

A sharded model's (`run.sharding=fsdp2`) checkpoint has the *sharded layout* (`LAYOUTS`): in place of
`trainable.safetensors` and `optimizer.pt`, a folder `sharded/` written by torch.distributed.checkpoint, in which
each process writes its own shards of the trainable weights and of the AdamW state (`__<rank>_0.distcp`), and the
main process `.metadata` (which piece of which tensor lies in which file); nothing is gathered, so no process holds
more than its 1/N. A resume reads each process's shards back (`models.sharding.load_shards`) with the same
number of processes (`check_layout` refuses another: the data and sampling seeds are split per process, and
each process's RNG state is its own). `read_trainable` reads the weights whole in one process (`posttrain
study` scores such a checkpoint like any other). With `run.whole_checkpoints`, a sharded run writes the *whole
layout* instead: weights and optimizer state gathered whole to the main process (the optimizer's keyed by
parameter name, torch.distributed's format), every process loading its shard back from them.

A run under an Accelerate DeepSpeed config writes the whole trained weights (ZeRO-3's partitions gathered) but
no `optimizer.pt` (ZeRO splits the optimizer state over the processes), and records `deepspeed` in
trainer_state.json: such a checkpoint is refused by `--resume` (`check_layout`; not built yet) and scored like any.

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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posttrain.algorithms.base import BatchSource
from posttrain.errors import UserError
from posttrain.models.sharding import (
    full_state,
    is_partitioned,
    is_sharded,
    load_full_state,
    load_optimizer_state,
    load_shards,
    optimizer_state,
    partitioned_state,
    read_shards,
    save_shards,
    shard_keys,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")
SHARDS = "sharded"
"""The folder of a sharded-layout checkpoint that torch.distributed.checkpoint writes (`models.sharding.save_shards`)."""
LAYOUTS = ("whole", "sharded")
"""How a checkpoint holds the trained weights and optimizer state: `whole` (one file each, written by the main
process) or `sharded` (each process's shards, `SHARDS`); `layout_of` says which a run writes."""


def layout_of(run) -> str:
    """The layout of a run's checkpoints (from its `run` section): sharded under `run.sharding=fsdp2` unless
    `run.whole_checkpoints`, whole otherwise."""
    return "sharded" if run.sharding == "fsdp2" and not run.whole_checkpoints else "whole"


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
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, *, keep: int, source: BatchSource,
    layout: str = "whole",
) -> Path:
    """Write checkpoint `step` atomically (all processes call this) in `layout` (`LAYOUTS`; sharded needs a sharded
    model); keep only the `keep` newest. The batch `source`'s own state, where it has one, goes into
    trainer_state.json."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)
    gathered = sharded and layout == "whole"
    # DeepSpeed (an Accelerate DeepSpeed config): the whole trained weights (ZeRO-3's partitions gathered), but no
    # optimizer state, which ZeRO splits over the processes: such a checkpoint is not resumable (`check_layout`)
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    if gathered:  # gathered by every process (collectives), to the main process
        weights, optim_state = full_state(unwrapped, trainable_only=True), optimizer_state(unwrapped, optimizer)
    elif is_partitioned(unwrapped):
        weights, gathered = partitioned_state(unwrapped, trainable_only=True), True
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if layout == "whole":
            weights = {k: v.contiguous() for k, v in weights.items()} if gathered else trainable_state(unwrapped)
            save_file(weights, str(tmp / "trainable.safetensors"))
            if not deepspeed:
                torch.save(optim_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        source_state = source.state_dict()
        state = {"step": step, "layout": layout, "world_size": accelerator.num_processes,
                 **({"source": source_state} if source_state else {}), **({"deepspeed": True} if deepspeed else {})}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    accelerator.wait_for_everyone()
    if layout == "sharded":  # each process its own shards, into the folder the main process just made
        save_shards(unwrapped, optimizer, tmp / SHARDS)
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


def check_layout(path: Path, *, sharded: bool, world_size: int) -> None:
    """Refuse to resume checkpoint `path` in a run that cannot read its layout: a sharded-layout checkpoint needs
    a sharded model (`run.sharding=fsdp2`) and the number of processes that wrote it. Checked before the model
    loads. A checkpoint that records no layout is whole."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("deepspeed"):
        raise UserError(
            f"--resume: {path} was written under DeepSpeed (an Accelerate DeepSpeed config), which posttrain cannot "
            "resume yet: the checkpoint holds the whole trained weights (trainable.safetensors, which `posttrain "
            "study` scores) but not the optimizer state ZeRO splits over the processes. Start a new run (another "
            "run.output_dir), or train with run.sharding=fsdp2 under torchrun, whose checkpoints resume."
        )
    if state.get("layout", "whole") != "sharded":
        return
    wrote = int(state["world_size"])
    if not sharded:
        raise UserError(
            f"--resume: {path} holds each of {wrote} processes' shards (run.sharding=fsdp2), but this run does not "
            f"shard its model. Resume it with `torchrun --nproc_per_node {wrote} -m posttrain.cli train ... "
            f"run.sharding=fsdp2 --resume`."
        )
    if wrote != world_size:
        # torch.distributed.checkpoint could read the shards into another split, but the run's data order, its
        # sampling seeds and its RNG states are per process: another count would not continue the same run.
        raise UserError(
            f"--resume: {path} was written by {wrote} processes, each saving its own shards and random state, and "
            f"this run has {world_size}. Resume it with `torchrun --nproc_per_node {wrote}` (the same number of "
            "processes), or start a new run (another run.output_dir)."
        )


def load_trainable(model, path: Path) -> None:
    """Copy checkpoint `path`'s trained parameters into `model`, built as the run built it (the same base and
    technique, e.g. fresh LoRA adapters), refusing a checkpoint that lacks some of its trainable parameters. Also
    how a checkpoint is scored without resuming it (`posttrain study`). Either layout; one process."""
    model.load_state_dict(read_trainable(model, path), strict=False)


def read_trainable(model, path: Path) -> dict[str, torch.Tensor]:
    """Checkpoint `path`'s trained parameters, whole tensors in this process (a sharded-layout checkpoint's shards
    read and joined), after checking they cover `model`'s trainable ones (an unsharded model)."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_covers(trainable, _saved_names(path), path)
    if (Path(path) / SHARDS).is_dir():
        return read_shards(Path(path) / SHARDS, trainable)
    return load_file(str(Path(path) / "trainable.safetensors"))


def _saved_names(path: Path) -> set[str]:
    folder = Path(path) / SHARDS
    if folder.is_dir():
        return shard_keys(folder)
    with safe_open(str(Path(path) / "trainable.safetensors"), framework="pt") as f:
        return set(f.keys())


def _check_covers(trainable, saved: set[str], path: Path) -> None:
    missing = set(trainable) - saved
    if missing:
        raise UserError(
            f"{path}: this checkpoint does not match the model being trained ({len(missing)} trainable "
            f"parameters missing, e.g. {sorted(missing)[0]}); was the technique or model changed?"
        )


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, source: BatchSource) -> int:
    """Restore weights, optimiser, schedule, RNG and the batch `source`'s own state (if it keeps one) from `path`
    (either layout: `check_layout` has refused what this run cannot read); returns the step it was taken at."""
    unwrapped = accelerator.unwrap_model(model)
    _check_covers({n for n, p in unwrapped.named_parameters() if p.requires_grad}, _saved_names(path), path)
    if (path / SHARDS).is_dir():  # each process reads its own shards back
        load_shards(unwrapped, optimizer, path / SHARDS)
    else:
        tensors = load_file(str(path / "trainable.safetensors"))
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
