"""Atomic checkpoints that let a killed run continue exactly where it stopped.

A checkpoint folder `checkpoints/step-000040/` holds:
- `trainable.safetensors`: every parameter that requires a gradient (the adapters under LoRA/QLoRA, all weights
  under full fine-tuning). Frozen weights are not copied: they come back from the base model.
- `optimizer.pt`, `scheduler.pt`: their state dicts.
- `rng_state_<rank>.pt`: Python, NumPy and torch generator states of each process (dropout must replay).
- `source_state_<rank>.pt`, where the batch source holds something of its own: an RL run's rollout in progress
  when the checkpoint falls inside one (`rollout.source`), so that a resume trains its remaining steps on it.
- `trainer_state.json`: the step reached; the data position follows from it (see `trainer.batches`); the batch
  source's own state where it has one (`source`, e.g. PPO's adaptive KL coefficient); the `layout` and the
  number of processes that wrote it (`world_size`).

A sharded model's (`run.sharding=fsdp2`) checkpoint has the *sharded layout* (`LAYOUTS`): in place of
`trainable.safetensors` and `optimizer.pt`, a folder `sharded/` written by torch.distributed.checkpoint, in which
each process writes its own shards of the trainable weights and of the AdamW state (`__<rank>_0.distcp`), and the
main process `.metadata` (which piece of which tensor lies in which file); nothing is gathered, so no process holds
more than its 1/N. `read_trainable` reads the weights whole in one process (`posttrain study` scores such a
checkpoint like any other). With `run.whole_checkpoints`, a sharded run writes the *whole layout* instead: weights
and optimizer state gathered whole to the main process (the optimizer's keyed by parameter name, torch.distributed's
format), every process loading its shard back from them.

Resuming on another number of processes. A checkpoint of either layout written by N processes resumes on M, sharded
or not (`load_checkpoint`): torch.distributed.checkpoint reads a sharded layout into any split, or whole into an
unsharded model (`models.sharding.load_shards`); whole weights and optimizer state are loaded whole or sharded.
The weights, the AdamW state, the schedule and the data position carry over exactly: `optim.batch_size` counts the
examples of a step over all processes (`trainer.batches`), so the step fixes the same global batches whatever M.
What cannot carry is each process's random state, which belongs to its rank: process r < N restores rank r's,
process r >= N re-derives its own from (run.seed, step, r) (`derived_seed`), and ranks >= M are dropped. So
dropout draws other numbers than the uninterrupted run would, and an RL run samples its rollouts with the M-process
seeds (`rollout.source`: seeded per rollout and rank); the gradient sums also run in another order (last-bit
differences). The run says so in one line at the start (`reshard_note`). What M cannot run at all (a batch that
does not split over M processes, another number of steps per epoch) is refused before the model loads, naming
both sizes (`resuming_on`).

A run under an Accelerate DeepSpeed config writes the whole trained weights (ZeRO-3's partitions gathered) and,
in place of `optimizer.pt`, DeepSpeed's own checkpoint of its engine in `deepspeed/` (`engine.save_checkpoint`:
each process's partitions of the optimizer state and, under ZeRO-3, of the weights), and records `deepspeed` and
the ZeRO stage (`zero_stage`) in trainer_state.json. `--resume` reads the engine's checkpoint back
(`engine.load_checkpoint`) on the same number of processes. ZeRO's partitions belong to the processes that
wrote them, so on another number the engine checkpoint is
first converted, once, to DeepSpeed's universal checkpoint (`deepspeed_universal`, into `UNIVERSAL` beside it),
which an engine of any number of processes loads (the trained weights and their AdamW state, a LoRA run's adapters,
a reward model's head with its LM); the random state is then handled as above (`derived_seed`, `reshard_note`). A
DeepSpeed checkpoint resumed without DeepSpeed, or under another ZeRO stage (which DeepSpeed cannot load in either
form), is refused before the model loads (`check_resumable`).

It is written into `checkpoints/.tmp-step-000040/` and renamed into place only once complete, so a `kill -9` at
any moment leaves either the previous checkpoint or the new one, never a half-written folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posttrain.algorithms.base import BatchSource
from posttrain.config import deepspeed_zero_stage
from posttrain.errors import ConfigError, UserError
from posttrain.files import checkpoint_dir, list_checkpoints, out_of_space
from posttrain.models.logprobs import unwrap_parallel
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

SHARDS = "sharded"
"""The folder of a sharded-layout checkpoint that torch.distributed.checkpoint writes (`models.sharding.save_shards`)."""
DEEPSPEED = "deepspeed"
"""The folder of a DeepSpeed run's checkpoint that holds its engine's own checkpoint (`engine.save_checkpoint`)."""
UNIVERSAL = "deepspeed-universal"
"""The folder of a DeepSpeed run's checkpoint that holds its engine checkpoint converted to DeepSpeed's universal
format (`deepspeed_universal`), written by the first resume on another number of processes."""
LAYOUTS = ("whole", "sharded")
"""How a checkpoint holds the trained weights and optimizer state: `whole` (one file each, written by the main
process) or `sharded` (each process's shards, `SHARDS`); `layout_of` says which a run writes."""


def layout_of(run) -> str:
    """The layout of a run's checkpoints (from its `run` section): sharded under `run.sharding=fsdp2` unless
    `run.whole_checkpoints`, whole otherwise."""
    return "sharded" if run.sharding == "fsdp2" and not run.whole_checkpoints else "whole"


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint `path` unreadable, found from its files alone before any model loads (None: nothing
    found): `save_checkpoint` writes a checkpoint whole or not at all, so this is damage from outside (a file
    deleted, a disk that failed). A file's contents are checked as far as that is cheap: the state's JSON, the
    safetensors header against the file's size, and the zip directory torch.save writes at a file's end."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return "trainer_state.json is unreadable or holds no step"
    pickles = ["scheduler.pt"]
    if not (path / DEEPSPEED).is_dir() and not (path / SHARDS).is_dir():
        pickles.append("optimizer.pt")
        from safetensors import safe_open

        try:
            with safe_open(str(path / "trainable.safetensors"), framework="pt"):
                pass
        except FileNotFoundError:
            return "trainable.safetensors is missing"
        except Exception:  # noqa: BLE001 - safetensors' own error types: cut or corrupt
            return "trainable.safetensors is cut short or corrupt"
    pickles += sorted(p.name for p in path.glob("source_state_*.pt"))  # a rollout in progress, per process
    for name in pickles:
        if not (path / name).is_file():
            return f"{name} is missing"
        if not zipfile.is_zipfile(path / name):
            return f"{name} is cut short or corrupt"
    return None


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
    trainer_state.json. A disk that fills up while it writes is a `UserError` naming the last complete checkpoint
    (the half-written one is removed): it read as a bug of ours, with a traceback naming a failed write position."""
    try:
        return _write_checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, keep=keep, source=source,
                                 layout=layout)  # fmt: skip
    except Exception as err:
        root = checkpoint_dir(run_dir)
        full = out_of_space(err, root)
        if accelerator.is_main_process:
            shutil.rmtree(root / f".tmp-step-{step:06d}", ignore_errors=True)
        if full is None:
            raise
        kept = list_checkpoints(run_dir)
        last = (f"the last complete checkpoint is {kept[-1].name}, which --resume continues from" if kept else
                "no checkpoint was written before, so --resume starts the run again")  # fmt: skip
        raise UserError(f"writing checkpoint step-{step:06d} into {root} failed: {full}. Nothing written before is "
                        f"lost: {last}. Free some space (run.keep_checkpoints keeps fewer checkpoints) and continue "
                        "with --resume") from err


def _write_checkpoint(
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, *, keep: int, source: BatchSource,
    layout: str = "whole",
) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    unwrapped = unwrap_parallel(model)
    sharded = is_sharded(unwrapped)
    gathered = sharded and layout == "whole"
    # DeepSpeed (an Accelerate DeepSpeed config): the whole trained weights (ZeRO-3's partitions gathered), and
    # DeepSpeed's own checkpoint of the engine (`DEEPSPEED`: each process's partitions of the optimizer state),
    # which a resume on the same number of processes reads back; no optimizer.pt
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
                 **({"source": source_state} if source_state else {}),
                 **({"deepspeed": True, "zero_stage": deepspeed_zero_stage()} if deepspeed else {})}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    accelerator.wait_for_everyone()
    if layout == "sharded":  # each process its own shards, into the folder the main process just made
        save_shards(unwrapped, optimizer, tmp / SHARDS)
    if deepspeed:  # every process its own ZeRO partitions of the optimizer state (and, ZeRO-3, of the weights)
        model.save_checkpoint(str(tmp / DEEPSPEED), tag="state", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if own := source.process_state(step):
        torch.save(own, tmp / f"source_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def written_by(path: Path) -> int | None:
    """The number of processes that wrote checkpoint `path` (None: a checkpoint older than that record)."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["world_size"]) if "world_size" in state else None


@contextmanager
def resuming_on(path: Path | None, world_size: int) -> Iterator[None]:
    """Around the checks of the run's plan, before the model loads: when resuming checkpoint `path` on another
    number of processes than wrote it, a `ConfigError` raised inside (a batch that does not split over
    `world_size` processes, another number of steps per epoch, ...) is re-raised naming both numbers and what to
    change. Nothing else changes (no `path`: a new run; the same number: the error as it is)."""
    wrote = written_by(path) if path is not None else None
    try:
        yield
    except ConfigError as err:
        if wrote is None or wrote == world_size:
            raise
        raise ConfigError(
            f"--resume: {path} was written by {wrote} processes and this run has {world_size}, which cannot "
            f"continue it: {err} Resume it on a number of processes this run can be split over (e.g. "
            f"`torchrun --nproc_per_node {wrote}`, as it was written), or start a new run (another run.output_dir)."
        ) from None


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a process that has no random state of its own to resume (rank `rank` of a run resumed at `step`
    on more processes than wrote the checkpoint): a pure function of the three, so a repeated resume draws the
    same numbers, and every (step, rank) its own stream (numpy's SeedSequence hashes the tuple).

    >>> derived_seed(0, 2, 1) == derived_seed(0, 2, 1) != derived_seed(0, 2, 2)
    True
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def reshard_note(path: Path, wrote: int, world_size: int) -> str | None:
    """One line for the start of a run resumed from `path` (written by `wrote` processes) on `world_size`: what
    carries over and what is re-derived (the module docstring). None when the numbers agree.

    >>> print(reshard_note(Path("step-000002"), 1, 2))  # doctest: +ELLIPSIS
    note: resuming 1-process state on 2 processes (step-000002): ...; the random state of rank 0 is restored, that of rank 1 re-derived from (run.seed, step, rank). Dropout ...
    """
    if wrote == world_size:
        return None

    def ranks(first: int, last: int) -> str:
        return f"rank {first}" if first == last else f"ranks {first}..{last}"

    kept = ranks(0, min(wrote, world_size) - 1)
    if world_size < wrote:
        rng = f"the random state of {kept} is restored, that of {ranks(world_size, wrote - 1)} dropped"
    else:
        rng = (f"the random state of {kept} is restored, that of {ranks(wrote, world_size - 1)} re-derived from "
               "(run.seed, step, rank)")  # fmt: skip
    return (
        f"note: resuming {wrote}-process state on {world_size} process{'es' if world_size > 1 else ''} "
        f"({Path(path).name}): the weights, optimizer state, schedule and data position carry over (each step's "
        f"global batch is the same); {rng}. Dropout therefore draws other random numbers than the uninterrupted "
        f"{wrote}-process run would, and gradient sums run in another order (last-bit differences). An RL run "
        "samples a rollout in progress again; the others draw what they would have (the HF engine numbers each "
        "row's stream by its place in the rollout; vLLM's streams depend on the number of processes)."
    )


def check_resumable(path: Path, deepspeed: bool, stage: int | None = None) -> None:
    """Refuse, before the model loads, a checkpoint this run cannot continue: one written under DeepSpeed before
    its engine state was saved (no optimizer state), resumed without DeepSpeed (`deepspeed`: this run's), or under
    another ZeRO stage than wrote it (`stage`: this run's; a checkpoint of an older posttrain records none); and one
    written without DeepSpeed, resumed under it."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    wrote = state.get("zero_stage")
    if deepspeed and stage is not None and wrote is not None and int(wrote) != stage:
        # DeepSpeed 0.19.8 carries ZeRO state across stages in neither form: its engine checkpoint is laid out by
        # the stage (ZeRO-3 partitions the weights too), and its universal checkpoint (`deepspeed_universal`) keeps
        # the writing stage's records: the engine metadata file's name (engine.py `_get_ckpt_name`) and the
        # optimizer record zero/optimizer_state.pt (ds_to_universal.py `_save_optimizer_state` for ZeRO-1/2, with
        # `ds_version` and a step file per weight; `_save_optimizer_state_stage3`, with one step in
        # `optimizer_state_dict`), which the other stage's loader cannot read (measured: "Empty ds_version in
        # checkpoint", KeyError 'optimizer_state_dict').
        raise ConfigError(
            f"--resume: {path} was written under DeepSpeed ZeRO-{wrote} and this run is launched under ZeRO-{stage}, "
            "and DeepSpeed loads one stage's optimizer state into the other's from neither its engine checkpoint "
            f"nor its universal checkpoint. Resume it "
            f"under ZeRO-{wrote} (`accelerate launch --config_file configs/accelerate/deepspeed_zero{wrote}.yaml`, "
            "on any number of processes), or start a new run under ZeRO-"
            f"{stage} (another run.output_dir; its weights from this checkpoint's trainable.safetensors lose the "
            "AdamW state)."
        )
    if state.get("deepspeed") and not deepspeed:
        raise UserError(
            f"--resume: {path} was written under DeepSpeed, whose engine checkpoint only DeepSpeed reads, and this "
            "run is not launched with an Accelerate DeepSpeed config. Resume it under one (`accelerate launch "
            "--config_file configs/accelerate/deepspeed_zero2.yaml`, the ZeRO stage it was written with), or start "
            "a new run from its weights (`model.name` set to the run's final/ folder)."
        )
    if deepspeed and not state.get("deepspeed"):
        # ZeRO builds its float32 master weights and partitioned AdamW state inside `accelerator.prepare`, from the
        # model as it is then; its optimizer takes a list of per-process state dicts, not one process's whole one
        # (measured: KeyError 0 in DeepSpeed 0.19.8's `_load_legacy_checkpoint`, with a traceback)
        raise UserError(
            f"--resume: {path} was written without DeepSpeed (one process, DDP or run.sharding=fsdp2), and this run "
            "is launched with an Accelerate DeepSpeed config, whose optimizer cannot take that checkpoint's AdamW "
            "state. Resume it as it was launched (without the DeepSpeed config; any number of processes), or start "
            "a new run under DeepSpeed from its weights (another run.output_dir, `model.name` set to the run's "
            "final/ folder; the AdamW state starts afresh)."
        )
    if state.get("deepspeed") and not (Path(path) / DEEPSPEED).is_dir():
        raise UserError(
            f"--resume: {path} was written under DeepSpeed by an older posttrain, which saved the whole trained "
            "weights (trainable.safetensors, which `posttrain study` scores) but not the optimizer state ZeRO "
            "splits over the processes, so it cannot be resumed. Start a new run (another run.output_dir)."
        )


def resumes_universal(path: Path | None, world_size: int) -> bool:
    """Whether resuming checkpoint `path` on `world_size` processes reads DeepSpeed's universal checkpoint
    (`deepspeed_universal`): a DeepSpeed run's, written by another number of processes, whose ZeRO partitions of
    the optimizer state (and, ZeRO-3, of the weights) belong to the processes that wrote them."""
    if path is None:
        return False
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    return bool(state.get("deepspeed")) and int(state["world_size"]) != world_size


def deepspeed_universal(accelerator, path: Path) -> Path:
    """Checkpoint `path`'s DeepSpeed engine checkpoint in DeepSpeed's universal format (`UNIVERSAL`: each weight's
    fp32 value and AdamW moments whole, in a file of its own), which an engine of any number of processes loads
    (`checkpoint.load_universal`, set by `train._before_deepspeed`). Converted once, by the main process, with
    DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`; posttrain saves no Megatron-style
    `universal_checkpoint_info`, so the converter's `inject_missing_state` adds its version record), into a
    temporary folder renamed when complete; every process calls this and waits for it."""
    out = Path(path) / UNIVERSAL
    if accelerator.is_main_process and not out.is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as convert  # optional: a DeepSpeed run's resume

        print(f"converting {path}'s DeepSpeed checkpoint to DeepSpeed's universal checkpoint, once, into {out}")
        tmp = Path(path) / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        convert(Namespace(input_folder=str(Path(path) / DEEPSPEED / "state"), output_folder=str(tmp / "state"),
                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                          inject_missing_state=True))  # fmt: skip
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out


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


def _own_step_counts(zero_optimizer) -> None:
    """Give each ZeRO-3 optimizer sub-group its own AdamW step count after a universal load. DeepSpeed 0.19.8's
    ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) stores one and the same `step`
    tensor in every sub-group's state, and torch's AdamW advances it in place once per sub-group: posttrain's
    second group (the undecayed 1-D weights) then took its first resumed step at step count 4 instead of 3 (its
    update 21% short: measured, norm weights 2.4e-7 off the uninterrupted run's, all else within 2e-9). ZeRO-2's
    universal load keeps a count per group; nothing to do there (no `fp32_partitioned_groups_flat`)."""
    for flat in getattr(zero_optimizer, "fp32_partitioned_groups_flat", []):
        state = zero_optimizer.optimizer.state.get(flat, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _follow_this_schedule(optimizer, scheduler, step: int) -> str | None:
    """Set each parameter group's learning rate to this run's schedule at the restored position: the optimiser's
    saved state holds the rate the earlier schedule gave for the next step, which differs when the resume changed
    the run's length (`run.max_steps`, `run.epochs`: a cosine or linear decay then spans another number of steps),
    and the first resumed step ran at the old rate, the next ones at the new. Unchanged, the same numbers are set
    (LambdaLR's own product). Returns the note for a changed rate, else None."""
    before = [group["lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for a, b in zip(before, scheduler._last_lr)):
        return None
    return (f"note: the learning-rate schedule spans another number of steps than when step {step} was saved (run.max_steps "
            f"or run.epochs changed): step {step + 1} runs at lr {scheduler._last_lr[0]:.4g} where the earlier "
            f"schedule had {before[0]:.4g}, and the steps after it follow this run's schedule")


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, source: BatchSource, *,
                    seed: int = 0) -> int:  # fmt: skip
    """Restore weights, optimiser, schedule, RNG and the batch `source`'s own state (if it keeps one) from `path`
    (either layout, written by any number of processes; `resuming_on` has refused what this run cannot continue);
    returns the step it was taken at. A process whose rank wrote no random state re-derives it from `seed` (the
    run's), the step and its rank (`derived_seed`); the main process prints `reshard_note`."""
    unwrapped = unwrap_parallel(model)
    _check_covers({n for n, p in unwrapped.named_parameters() if p.requires_grad}, _saved_names(path), path)
    if (path / DEEPSPEED).is_dir():  # the engine's own checkpoint: weights and optimizer partitions, per process
        # or, written by another number of processes, its universal form (`deepspeed_universal`)
        folder = path / (UNIVERSAL if model.load_universal_checkpoint() else DEEPSPEED)
        model.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=False)  # fmt: skip  (posttrain's scheduler: scheduler.pt)
        if model.load_universal_checkpoint():
            _own_step_counts(model.optimizer)
    elif (path / SHARDS).is_dir():  # each process reads what it holds: its shards, or the whole tensors
        load_shards(unwrapped, getattr(optimizer, "optimizer", optimizer), path / SHARDS)  # torch's, unwrapped
    else:
        tensors = load_file(str(path / "trainable.safetensors"))
        # weights_only=False: these files are our own optimizer/scheduler/RNG pickles, written by save_checkpoint.
        optim_state = torch.load(path / "optimizer.pt", weights_only=False)
        if is_sharded(unwrapped):  # every process keeps its shard of the whole tensors
            load_full_state(unwrapped, tensors)
            load_optimizer_state(unwrapped, optimizer, optim_state)
        else:
            unwrapped.load_state_dict(tensors, strict=False)
            # keyed by position (torch's format) or, from a sharded run, by name: both list the parameters in
            # the optimizer's order, which is how torch's load_state_dict matches them
            optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    step, rank = int(state["step"]), accelerator.process_index
    if (note := _follow_this_schedule(optimizer, scheduler, step)) and accelerator.is_main_process:
        print(note)
    rng = path / f"rng_state_{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:  # a rank the writing run did not have
        from accelerate.utils import set_seed

        set_seed(derived_seed(seed, step, rank))
    wrote = state.get("world_size")
    if accelerator.is_main_process and wrote is not None and (note := reshard_note(path, wrote,
                                                                                    accelerator.num_processes)):
        print(note)
    source.load_state_dict(state.get("source") or {})
    own = path / f"source_state_{rank}.pt"
    if own.is_file() and wrote == accelerator.num_processes:  # a process's own state belongs to its layout
        source.load_process_state(torch.load(own, weights_only=False, map_location="cpu"))
    return step
