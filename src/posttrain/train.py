"""`train(cfg)`: from a validated run config to a trained model in a run folder.

Order matters for the user: the config is already valid; then the run folder is held (one process at a time,
`trainer.runlock`) and checked (never overwrite a run that has checkpoints unless resuming; a resume must find
the same config and data), the tokenizer loads and the data is read, validated, rendered and planned into steps
(so a bad file or an impossible batching fails in seconds). Everything that can be checked without the model is
checked before the run folder is created or written: a run refused there leaves no folder behind. Then the model
loads (a model that cannot, or LoRA targets it lacks, are refused still before anything is written), the run folder
gets its config.yaml, then the optimiser and the loop.

A resumed run whose latest checkpoint is already at its last step trains nothing and leaves `final/` as it is, when
`final/` holds that step's model (its `posttrain_model.json` says the step); else `final/` is written again from it.

Run folder layout: `config.yaml` (resolved), `metrics.jsonl`, `checkpoints/step-NNNNNN/`, `final/` (adapter or
model + tokenizer, loadable by `posttrain generate` and `posttrain merge`), `report.html` + `report.md` (with
`report_files/`; `posttrain.report`, unless `run.report` is false), `samples.jsonl` for GRPO and PPO
(`rollout.samples`), and `.posttrain.lock` while a run holds the folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel

from posttrain.algorithms import RunConfig, config_from_dict, get_algorithm
from posttrain.algorithms.base import Algorithm
from posttrain.config import RunBase, deepspeed_zero_stage, dump_config, validate_config
from posttrain.config_rules import rules_of, show
from posttrain.data.order import EpochPlan, plan_examples, short_run_note, skipped_note, total_steps
from posttrain.data.readers import truncate_step_records
from posttrain.data.render import lines_text, set_template_variables
from posttrain.errors import ConfigError, UserError, term_as_interrupt
from posttrain.files import out_of_space
from posttrain.models import load_model, load_tokenizer, save_model
from posttrain.models.adapters import bitsandbytes_problem, check_lora_targets
from posttrain.models.attention import attention_per_segment, float32_attention_on_cpu
from posttrain.models.heads import ScalarHeadModel, language_model, save_scalar_model
from posttrain.models.hub import prepare_hub_libraries
from posttrain.models.layers import cpp_compiler_missing
from posttrain.models.loading import (
    active_dropout,
    context_length,
    cpu_has_bf16,
    default_device,
    mixed_precision,
    resolve_dtype,
)
from posttrain.models.logprobs import unwrap_parallel
from posttrain.models.prefix_sharing import slot_distances
from posttrain.models.reference import Reference
from posttrain.models.saving import INFO_FILE
from posttrain.models.sharding import full_state, is_partitioned, partitioned_state, shard, zero3_inference
from posttrain.report import report_or_warning
from posttrain.rollout.source import RolloutSource, plan_rollouts
from posttrain.trainer.batches import ExampleBatchSource, WithReference
from posttrain.trainer.checkpoint import (
    check_resumable,
    checkpoint_problem,
    deepspeed_universal,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resumes_universal,
    resuming_on,
    written_by,
)
from posttrain.trainer.fingerprint import (
    check_same_data,
    check_same_inputs,
    check_same_plan,
    check_same_weights,
    data_fingerprint,
    inputs_fingerprint,
    read_fingerprint,
    record_environment,
    run_environment,
    weights_fingerprint,
    write_fingerprint,
)
from posttrain.trainer.launch import fsdp1_refusal, launch_notes
from posttrain.trainer.loop import training_loop
from posttrain.trainer.optim import build_optimizer, build_scheduler, lr_factor
from posttrain.trainer.runlock import LOCK_FILE, hold_run_dir, launch_rank, run_dir_problem, stale_note
from posttrain.trainer.summary import peak_memory_gb

# Settings that may change between a run and its resumption: length, logging and checkpoint cadence. Not
# run.seed: it fixes the data order, so changing it mid-run would repeat some examples and skip others.
_RESUMABLE_CHANGES = {
    "run.max_steps",
    "run.epochs",
    "run.save_every",
    "run.keep_checkpoints",
    "run.eval_every",
    "run.log_every",
    "run.tensorboard",
    "run.progress",
    "run.report",
    "run.output_dir",
    "run.whole_checkpoints",  # a checkpoint of either layout resumes (`trainer.checkpoint.load_checkpoint`)
    "run.sharding",  # ... into a sharded model or not, on any number of processes (`trainer.checkpoint`)
    # memory settings that keep the math (what a run that ran out of memory may continue with: `trainer.loop`):
    # the step's loss is normalised over the whole step, so how it is split into micro-batches changes only the
    # summation order; checkpointing and the compiled layers' memory budget recompute the same values; rollouts
    # draw each row from its own stream, whatever the generate batch (`rollout.engine.RowStreams`)
    "optim.micro_batch_size",
    "model.gradient_checkpointing",
    "model.compile_memory_budget",
    "algorithm.rollout.generation_batch_size",
}


@dataclass
class TrainResult:
    """What `train` did. `steps`: the step the run has reached, its last one; `steps_trained`: the steps this
    call trained (fewer when it resumed; 0 when the run had already finished); `history`: this call's metrics.
    For the end-of-run summary (`trainer.summary`): `method`, its `key_metric` (`Algorithm.key_metric`), this
    call's `wall_time_s`, and the process's peak memory so far (`peak_rss_gb`, `peak_gpu_gb`: None if unknown)."""

    run_dir: Path
    final_dir: Path
    steps: int
    history: list[dict]
    steps_trained: int = 0
    model: object = None
    tokenizer: object = None
    method: str | None = None
    key_metric: str | None = None
    wall_time_s: float | None = None
    peak_rss_gb: float | None = None
    peak_gpu_gb: float | None = None


def _flatten(tree: dict, prefix: str = "", leaves: frozenset[str] = frozenset()) -> dict:
    """Dotted keys of a config's sections; a field whose value is a mapping (`leaves`: `data.chat_template_kwargs`)
    is one value, so that a key it drops or adds is a change like any other."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in leaves:
            out.update(_flatten(value, f"{prefix}{key}.", leaves))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mapping_fields(section, prefix: str = "") -> frozenset[str]:
    """The dotted names of a config's fields whose values are mappings (not sections)."""
    found: set[str] = set()
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            found |= _mapping_fields(value, f"{prefix}{name}.")
        elif isinstance(value, dict):
            found.add(f"{prefix}{name}")
    return frozenset(found)


def _config_changes(old: dict, cfg: RunConfig) -> list[str]:
    """``field: old -> new`` for every field that differs from the saved config, run length and logging aside.
    A field the saved config lacks (added to posttrain since) counts as its default; a field this run does not
    read (`config_rules`; e.g. LoRA settings a full run's older config.yaml kept) is no change."""
    # The defaults of this run's method (constructed, not validated: an RL section's defaults name no reward).
    leaves = _mapping_fields(cfg)
    defaults = _flatten(type(cfg).model_construct(algorithm=type(cfg.algorithm).model_construct()).model_dump(mode="json"),
                        leaves=leaves)  # fmt: skip
    before = _flatten(old, leaves=leaves)
    rules = rules_of(cfg)
    return [
        f"{key}: {show(before.get(key, defaults.get(key)))} -> {show(value)}"
        for key, value in _flatten(cfg.model_dump(mode="json"), leaves=leaves).items()
        if key not in _RESUMABLE_CHANGES
        and before.get(key, defaults.get(key)) != value
        and not _same_path(key, before.get(key), value)
        and (key not in rules or rules[key].test(cfg))
    ]


_PATHS = ("data.train", "data.eval", "model.name", "algorithm.reward_model")


def _same_path(key: str, old, new) -> bool:
    """Whether a path setting names the same file in another spelling (`./data/x.jsonl` and `data/x.jsonl`): no
    change to refuse (their contents are compared by the fingerprint)."""
    if key not in _PATHS or not isinstance(old, str) or not isinstance(new, str):
        return False
    a, b = Path(old).expanduser(), Path(new).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _check_saved_layout(saved: Path, old: dict) -> None:
    """Refuse a saved config this version cannot read: compared field by field, an older layout (e.g. the
    per-method sections `algorithm.grpo.*` that now sit directly under `algorithm`) would report every moved
    setting as changed, and name the wrong ones."""
    try:
        config_from_dict(old, source=str(saved))
    except ConfigError as err:
        problems = str(err).split("\n", 1)[-1]
        raise ConfigError(
            f"--resume: {saved} is not a config this posttrain version reads, so the run cannot be checked for "
            f"changed settings and resumed safely; it was probably written by an older posttrain with another "
            f"config layout. Resume it with the version that started it, or set run.output_dir to a new folder "
            f"(nothing in {saved.parent} was changed). What does not read:\n{problems}"
        ) from None


# What a run writes into its folder (`report.IMAGE_DIR`, `trainer.fingerprint.FILE` and `.ENVIRONMENT`, the
# metrics, the samples of an RL run): a folder that holds any of them, and is not a run to resume, is somebody else's.
RUN_FILES = ("config.yaml", "metrics.jsonl", "data_fingerprint.json", "environment.json", "samples.jsonl",
             "report.md", "report.html", "report_files", "checkpoints", "final", "tensorboard")  # fmt: skip
_MODEL_FILES = (INFO_FILE, "adapter_config.json", "config.json")


def leftover(name: str) -> bool:
    """A file a killed run leaves at the top of its folder: the run lock (`trainer.runlock`, taken over by the next
    run) and the temporary files it writes before renaming them into place (`.config.yaml.tmp`, ...).

    >>> leftover(".posttrain.lock"), leftover(".report.md.tmp"), leftover(".git"), leftover("notes.tmp")
    (True, True, False, False)
    """
    return name == LOCK_FILE or (name.startswith(".") and ".tmp" in name)


def _check_data_files(cfg: RunConfig) -> None:
    """A data file that is not there, named with the field and the config line or override that set it (the
    reader, later, knows the path alone): `run.yaml:14: data.train: data/x.jsonl: file not found`."""
    for field, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path and not Path(path).exists():
            relative = "" if Path(path).is_absolute() else f" (a relative path is read from {Path.cwd()})"
            without = ""
            if field == "data.eval":  # an example config's held-out file, with a file of your own in data.train
                then = " run.eval_every=null" if cfg.run.eval_every is not None else ""
                without = f"; to train without a held-out file, data.eval=null{then}"
            raise ConfigError(f"{cfg.locate(field)}: {path}: file not found{relative}{without}")


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (or None), after refusing anything that would overwrite a run, a saved
    model, or files of the run's own names that no run wrote (a user's report.md)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"run.output_dir {run_dir} exists and is not a folder; choose another run.output_dir"
        )
    ckpt = latest_checkpoint(run_dir)
    started = ckpt is not None or (run_dir / "final").exists() or (run_dir / "config.yaml").exists()
    if not started and run_dir.is_dir():
        model = [n for n in _MODEL_FILES if (run_dir / n).is_file()]
        if model:
            raise ConfigError(
                f"run.output_dir {run_dir} holds a saved model ({model[0]}), which a run there would overwrite; "
                "to train from it set model.name to it, and choose another run.output_dir. Nothing was changed."
            )
        clash = [n for n in RUN_FILES if (run_dir / n).exists()]
        if clash:
            raise ConfigError(
                f"run.output_dir {run_dir} is not a run but holds {', '.join(clash)}, which a run there would "
                "overwrite; choose another run.output_dir. Nothing was changed."
            )
    if started and not resume:
        what = f"latest checkpoint: {ckpt.name}" if ckpt else "a config.yaml or final/ model"
        raise ConfigError(
            f"{run_dir} already holds a run ({what}). Pass --resume to continue it, "
            "or set run.output_dir to a new folder; nothing was overwritten."
        )
    if ckpt is None:
        if (run_dir / "final").exists():
            raise ConfigError(
                f"--resume: {run_dir} has a final model but no checkpoint to continue from; "
                "set run.output_dir to a new folder to train again"
            )
        return None  # nothing worth keeping yet (e.g. killed before the first checkpoint): start afresh
    if (why := checkpoint_problem(ckpt)) is not None:
        earlier = list_checkpoints(run_dir)[-2:-1]
        back = f"the one before ({earlier[0].name})" if earlier else "the start"
        raise ConfigError(f"--resume: checkpoint {ckpt} is damaged: {why}. Remove that folder to resume from {back}, or "
                          "set run.output_dir to a new folder; nothing was changed.")  # fmt: skip
    saved = run_dir / "config.yaml"
    if not saved.is_file():  # written before the first step: without it no change to the run can be checked
        raise ConfigError(
            f"--resume: {run_dir} has checkpoints but no config.yaml, so whether this config is the run's cannot be "
            "checked (a changed setting would train on silently). Restore config.yaml, or set run.output_dir to "
            "a new folder"
        )
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{saved}: unreadable; restore it or start a new run folder") from None
    _check_saved_layout(saved, old)
    changed = _config_changes(old, cfg)
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was started with: {'; '.join(changed)}. Only "
            "run length, logging and checkpoint settings (e.g. run.max_steps) and the memory settings that keep "
            "the math (optim.micro_batch_size, model.gradient_checkpointing, model.compile_memory_budget, "
            "algorithm.rollout.generation_batch_size) may change when resuming; undo the change, or set "
            "run.output_dir to a new folder to start another run."
        )
    recorded = read_fingerprint(run_dir)
    if recorded is not None:
        check_same_data(run_dir, recorded, data_fingerprint(cfg))
        check_same_weights(run_dir, recorded, weights_fingerprint(cfg))
        if note := check_same_inputs(run_dir, recorded, inputs_fingerprint(cfg)):
            print(note, file=sys.stderr)
    return ckpt


def _resplit_note(run_dir: Path, ckpt: Path, micro: int, model) -> str | None:
    """The note for a run resumed with micro-batches of another size than the run's (`micro`, against the one its
    config.yaml and the checkpoint's number of processes gave) while the model draws dropout masks
    (`active_dropout`: LoRA's, or the model's own when kept): they are drawn per micro-batch forward, over tensors
    shaped by it, so the resumed steps draw other masks than the uninterrupted run would. Without dropout only
    the summation order changes."""
    old = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("optim") or {}
    wrote = written_by(ckpt) or 1
    before = old.get("micro_batch_size") or int(old.get("batch_size", 0)) // wrote
    if before == micro or not (dropping := active_dropout(model)):
        return None
    return (f"note: micro-batches of {micro} rows where the run had {before} (optim.micro_batch_size, or the batch "
            "over the processes) on this resume: the loss is the same, but "
            f"dropout draws its masks per micro-batch ({len(dropping)} dropout sites, e.g. {dropping[0][0] or 'the model'}), "
            "so the resumed steps draw other masks than the uninterrupted run would have (an equally valid draw; "
            "the run is not bit for bit the uninterrupted one)")  # fmt: skip


def _resume_step(ckpt: Path, steps: int, run_dir: Path) -> int:
    """The step checkpoint `ckpt` was taken at, refusing one past the run's `steps` (read before the model loads)."""
    start = int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    if start > steps:
        raise ConfigError(
            f"--resume: {ckpt.name} is already past the requested {steps} steps; raise run.max_steps "
            f"(or run.epochs) above {start}, or use the model in {run_dir / 'final'}"
        )
    return start


_CONTINUE = "`posttrain train RUN.yaml --resume`"


def train(cfg: RunConfig, *, resume: bool = False, return_model: bool = False,
          continue_with: str = _CONTINUE) -> TrainResult:  # fmt: skip
    """Run training as described by `cfg`; with `resume`, continue from the run folder's latest checkpoint.
    `continue_with`: how the user continues an interrupted run, for the note Ctrl-C prints (the quickstart's is
    running the same command again).

    The run folder is held by this process for the whole run (`trainer.runlock`): a second process that starts
    into it is refused before anything is written. Only rank 0 of a multi-process launch holds it.
    """
    started = time.perf_counter()
    _check_again(cfg)
    prepare_hub_libraries()  # before accelerate imports huggingface_hub: offline when the hub is unreachable
    # bfloat16 on CPU: attention in float32, faster there (`models.attention`), for every forward of the run
    # padded rows packed into one, attended to one example at a time (`logprobs.packed_rows`)
    with float32_attention_on_cpu(_bf16_on_cpu(cfg)), attention_per_segment():
        if launch_rank() != 0:
            # the first process refuses a folder it cannot make; the others stop too, before the rendezvous
            if why := run_dir_problem(cfg.run.output_dir):
                raise ConfigError(why)
            return _train(cfg, resume=resume, return_model=return_model)
        # before the lock makes the folder; said only to a user's own --resume (the quickstart and the study resume
        # or start their folders by design, and the user set no run.output_dir to check)
        missing = not Path(cfg.run.output_dir).exists() and continue_with == _CONTINUE
        with hold_run_dir(cfg.run.output_dir) as stale, term_as_interrupt():
            if stale:
                print(stale_note(cfg.run.output_dir, stale), file=sys.stderr)
            try:
                result = _train(cfg, resume=resume, return_model=return_model, missing=missing)
            except KeyboardInterrupt:
                print(_interrupted_note(cfg, continue_with), file=sys.stderr)
                raise
    return _measured(result, cfg, started)


def _check_again(cfg) -> None:
    """The checks a config passed when it was loaded, run again on what it holds now: a config changed from Python
    after `load_config` (`cfg.run.epochs = 2.0` beside `run.max_steps`) skipped the refusals of settings that would
    do nothing or contradict each other (a field's own check runs on assignment; those across fields did not), and
    its `config.yaml` was then refused on `--resume`."""
    if not isinstance(cfg, RunBase):
        raise ConfigError(f"train() takes a run config, not a {type(cfg).__name__}: "
                          "train(posttrain.algorithms.load_config(path, overrides))")  # fmt: skip
    validate_config(type(cfg), cfg.model_dump(mode="json"), source="the config given to train()")


def _interrupted_note(cfg: RunConfig, continue_with: str) -> str:
    """What continuing a run interrupted now (Ctrl-C) will do: start from its last checkpoint, or start again,
    because none was written."""
    run_dir = Path(cfg.run.output_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None:
        return (f"interrupted: the last checkpoint of {run_dir} is {ckpt.name}; {continue_with} continues from it "
                "(the steps after it are trained again)")  # fmt: skip
    every = cfg.run.save_every
    why = (f"run.save_every={every}: the first comes at step {every}" if every else
           "run.save_every is null: a checkpoint is written only at the end")  # fmt: skip
    return f"interrupted before {run_dir} had a checkpoint ({why}); {continue_with} would start again at step 1"


def _nothing_to_resume(run_dir: Path, missing: bool) -> str | None:
    """The note for `--resume` that finds no checkpoint (None when the folder holds no started run: a fresh
    quickstart resumes-or-starts every time); `missing`: the folder did not exist before this run took it."""
    if missing:
        return (f"note: --resume: {run_dir} does not exist, so there is nothing to resume; a new run starts there "
                "(check run.output_dir if you meant another run)")  # fmt: skip
    if (run_dir / "config.yaml").is_file():
        return f"note: {run_dir} holds a run that stopped before its first checkpoint; it starts again at step 1"
    return None


def run_tokenizer(cfg: RunConfig):
    """The run's tokenizer: `cfg.model`'s, its chat template given `data.chat_template_kwargs` (refused here, before
    any model loads, when they cannot apply). What the quickstart and recipes score the base model with, too."""
    tokenizer = load_tokenizer(cfg.model)
    set_template_variables(tokenizer, cfg.data.chat_template_kwargs)
    return tokenizer


def _bf16_on_cpu(cfg: RunConfig) -> bool:
    """Whether the run computes in bfloat16 on a CPU (mixed precision or `pure_bf16`), as `_accelerator` decides."""
    device = default_device()
    return device.type == "cpu" and resolve_dtype(cfg.model.dtype, device) == torch.bfloat16


def _measured(result: TrainResult, cfg: RunConfig, started: float) -> TrainResult:
    """`result` with what the end-of-run summary reports besides the metrics (`TrainResult`); its peak memory is
    the training's, measured before the report was built (`_train`), or now for a run that trained nothing."""
    rss, gpu = (result.peak_rss_gb, result.peak_gpu_gb) if result.peak_rss_gb is not None else peak_memory_gb()
    return dataclasses.replace(
        result, method=cfg.algorithm.name, key_metric=get_algorithm(cfg.algorithm.name).key_metric,
        wall_time_s=time.perf_counter() - started, peak_rss_gb=rss, peak_gpu_gb=gpu,
    )  # fmt: skip


def _train(cfg: RunConfig, *, resume: bool, return_model: bool, missing: bool = False) -> TrainResult:
    from accelerate.utils import set_seed  # after the hub mode settled (`train`)

    run_dir = Path(cfg.run.output_dir)
    _check_data_files(cfg)
    ckpt = _check_run_dir(cfg, run_dir, resume)
    nothing = _nothing_to_resume(run_dir, missing) if resume and ckpt is None else None
    _check_packages(cfg)
    check_lora_targets(cfg.model, cfg.technique)  # from the model's config alone, before its weights load
    accelerator = _accelerator(cfg)
    if nothing and accelerator.is_main_process:
        print(nothing)
    _check_sharding(cfg, accelerator.num_processes)
    _check_compile(cfg, accelerator)
    _check_rollout_dtype(cfg, accelerator)
    if refusal := fsdp1_refusal(os.environ, distributed=accelerator.distributed_type.value):
        raise ConfigError(refusal)
    if ckpt is not None:
        check_resumable(ckpt, deepspeed=deepspeed_zero_stage() is not None, stage=deepspeed_zero_stage())
    set_seed(cfg.run.seed)
    algorithm = get_algorithm(cfg.algorithm.name)

    # ---- data first: user errors in files surface before the (slow) model load
    tokenizer = run_tokenizer(cfg)
    data = algorithm.prepare(cfg, tokenizer)
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size // accelerator.num_processes
    evaluating = data.eval is not None and algorithm.evaluates
    # ---- the plan (steps per epoch, rows no step uses) and where a resumed run stands: before anything is written.
    # Resumed on another number of processes than wrote the checkpoint, what this one cannot run names both.
    with resuming_on(ckpt, accelerator.num_processes):
        if evaluating and len(data.eval) < accelerator.num_processes:
            raise ConfigError(
                f"data.eval has {len(data.eval)} examples, fewer than the {accelerator.num_processes} processes"
            )
        plan = _plan(cfg, algorithm, len(data.train), accelerator.num_processes, micro)
        if ckpt is not None:
            check_same_plan(run_dir, read_fingerprint(run_dir), plan.steps_per_epoch)
    steps = total_steps(cfg.run.max_steps, cfg.run.epochs, plan.steps_per_epoch)
    if cfg.optim.warmup_steps >= steps > 0 and accelerator.is_main_process:
        peak = lr_factor(steps - 1, schedule=cfg.optim.schedule, warmup=steps, total=steps)  # as `build_scheduler`
        print(f"warning: optim.warmup_steps = {cfg.optim.warmup_steps} is not shorter than this run's {steps} steps: "
              f"the learning rate rises for the whole run, to {peak:.0%} of optim.lr at the last step"
              + (f", and optim.schedule = {cfg.optim.schedule} never starts" if cfg.optim.schedule != "constant"
                 else ""))  # fmt: skip
    start = 0
    if ckpt is not None:
        start = _resume_step(ckpt, steps, run_dir)
    # finished only when final/ holds this step's model: a resume that extended the run and was stopped (or killed
    # while final/ was written) left the earlier final/ behind, which a later resume must not take for this one
    finished = start == steps and final_step(run_dir / "final") == steps
    if finished:
        if accelerator.is_main_process:
            print(f"{run_dir}: finished at step {steps}; nothing to train ({run_dir / 'final'} is unchanged)")
        if not return_model:
            return TrainResult(run_dir=run_dir, final_dir=run_dir / "final", steps=steps, history=[])
    # ---- model, reference, batch source, optimiser, schedule
    # The model first: one that cannot load (its files, technique.target_modules) is refused before the run folder
    # holds anything, so the corrected command runs as it is.
    model = _load_model(cfg, algorithm, accelerator.device)
    _check_context(cfg, data, language_model(model).config)
    _check_packing(cfg, language_model(model))
    if ckpt is not None and accelerator.is_main_process and (note := _resplit_note(run_dir, ckpt, micro, model)):
        print(note)
    # Every process has checked the run folder (`_check_run_dir`) before the main one writes into it: a process
    # that checked later would find this run's own config.yaml and refuse the folder as an earlier run's.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not finished:
        _say_launch_notes(cfg, accelerator)
        _start_run_dir(cfg, run_dir, data, plan, steps, resumed_at=start if ckpt is not None else None,
                       environment=run_environment(accelerator.device))  # fmt: skip
    # Under the run's autocast: a reference computed here (DPO precompute) must see the forward training sees.
    with accelerator.autocast():
        reference = Reference.build(algorithm.reference(cfg), language_model(model), model_cfg=cfg.model,
                                    technique=cfg.technique, device=accelerator.device)  # fmt: skip
        if reference.mode == "copy" and deepspeed_zero_stage() == 3:
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            reference.model = zero3_inference(reference.model, ds_config, micro, accelerator.num_processes)
        source, eval_batches = _batch_source(cfg, algorithm, data, model, tokenizer, accelerator, micro, plan,
                                             reference, resumed=ckpt is not None, evaluating=evaluating)  # fmt: skip
    if cfg.run.sharding == "fsdp2":
        # In place, after the batch source took the model (and DPO's precompute used it whole); the optimizer is
        # built on the shards. Not `prepare`d: Accelerate would wrap the sharded model in DDP.
        shard(model)
        if reference.mode == "copy":
            shard(reference.model, forward_only=True)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    if cfg.run.sharding != "fsdp2":
        universal = resumes_universal(ckpt, accelerator.num_processes)
        if universal:  # written by another number of processes: DeepSpeed's universal form, converted once
            deepspeed_universal(accelerator, ckpt)
        _before_deepspeed(accelerator, model, optimizer, micro, cfg.optim.max_grad_norm, universal=universal)
        model, optimizer = accelerator.prepare(model, optimizer)

    if ckpt is not None:
        start = load_checkpoint(accelerator, ckpt, model, optimizer, scheduler, source=source,
                                seed=cfg.run.seed)  # fmt: skip
        if finished:  # only the model was asked for (return_model): nothing is trained or written
            return TrainResult(run_dir=run_dir, final_dir=run_dir / "final", steps=steps, history=[],
                               model=unwrap_parallel(model), tokenizer=tokenizer)  # fmt: skip
        if accelerator.is_main_process:
            truncate_step_records(run_dir / "metrics.jsonl", start)
            print(f"resuming {run_dir} from {ckpt.name} (step {start} of {steps})")
    elif accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    result = training_loop(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, algorithm=algorithm,
        batch_source=source, cfg=cfg, run_dir=run_dir, total_steps=steps, start_step=start,
        eval_batches=eval_batches,
    )  # fmt: skip

    final, unwrapped = _save_final(accelerator, model, tokenizer, run_dir, cfg, steps)
    rss, gpu = peak_memory_gb()  # the training's peak, before the report's plots add theirs
    if accelerator.is_main_process and cfg.run.report and (report := report_or_warning(run_dir)) is not None:
        print(f"report: {report}")  # report.html and report.md (posttrain.report), from the run folder's files
    return TrainResult(
        peak_rss_gb=rss,
        peak_gpu_gb=gpu,
        run_dir=run_dir,
        final_dir=final,
        steps=steps,
        history=result.history,
        steps_trained=steps - start,
        model=unwrapped if return_model else None,
        tokenizer=tokenizer if return_model else None,
    )


def _check_packages(cfg: RunConfig) -> None:
    """Optional packages the run needs, checked on every process before any collective (none waits on a failed
    peer) and before anything is written."""
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is not installed; "
            "pip install tensorboard, or set run.tensorboard=false"
        )
    if cfg.technique.name == "qlora" and (why := bitsandbytes_problem()):
        raise ConfigError(why)


def _check_compile(cfg: RunConfig, accelerator) -> None:
    """`model.compile` is tested in one process on the CPU (the config checks the rest, `RunBase`): refused
    elsewhere before anything is written or loaded."""
    if not cfg.model.compile:
        return
    where = []
    if accelerator.num_processes > 1:
        where.append(f"{accelerator.num_processes} processes")
    if accelerator.device.type != "cpu":
        where.append(f"a {accelerator.device.type} device")
    if where:
        raise ConfigError(
            f"model.compile is tested in one process on the CPU, and this run has {' and '.join(where)}; remove "
            "model.compile (the uncompiled run is the same math)"
        )
    if missing := cpp_compiler_missing():
        raise ConfigError(
            f"model.compile needs a C++ compiler (torch's inductor builds its CPU kernels with one), and none was "
            f"found ({missing}). Install one (Debian/Ubuntu: apt-get install g++; or set CXX), or remove "
            "model.compile"
        )


def _check_rollout_dtype(cfg: RunConfig, accelerator) -> None:
    """`algorithm.rollout.dtype` where `model.dtype: auto` resolves to bfloat16 (a GPU that has it): the run
    samples in bfloat16 already, so the setting would do nothing (the config refuses an explicit bfloat16)."""
    rollout = getattr(cfg.algorithm, "rollout", None)
    if rollout is None or rollout.dtype is None:
        return
    compute = resolve_dtype(cfg.model.dtype, accelerator.device)
    if compute != torch.float32:
        raise ConfigError(
            f"algorithm.rollout.dtype={rollout.dtype} samples a float32 run from a {rollout.dtype} copy of its "
            f"weights, but this run computes in {str(compute).removeprefix('torch.')} already (model.dtype="
            f"{cfg.model.dtype} on {accelerator.device.type}); remove algorithm.rollout.dtype, or set "
            "model.dtype=float32 to train in float32 and sample in bfloat16"
        )


def _check_sharding(cfg: RunConfig, world_size: int) -> None:
    """`run.sharding=fsdp2` needs several processes from torchrun, not Accelerate's own sharding (checked before
    anything is written or loaded). Every technique shards, QLoRA's 4-bit weights too (`models.sharding`). With a
    vLLM engine, a sharded policy's weights (FSDP2's, DeepSpeed ZeRO-3's) are gathered whole for each push
    (`rollout.vllm_engine.policy_weights`)."""
    if cfg.run.sharding != "fsdp2":
        return
    if world_size < 2:
        raise ConfigError(
            "run.sharding=fsdp2 shards the model over several processes, but this run has one. Launch it with "
            "`torchrun --nproc_per_node N -m posttrain.cli train ...` (N >= 2), or set run.sharding=none"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED",
                                                                                      "").lower() == "true":
        raise ConfigError(
            "run.sharding=fsdp2 under an Accelerate FSDP or DeepSpeed config: both would shard the model. Keep the "
            "Accelerate config and set run.sharding=none, or launch with torchrun"
        )


def _plan(cfg: RunConfig, algorithm: Algorithm, n: int, world_size: int, micro: int) -> EpochPlan:
    """How each epoch is cut into steps (dataset methods) or rollouts (RL), refusing what cannot run."""
    cfg.algorithm.check_launch(world_size)
    if algorithm.rollouts is not None:
        return plan_rollouts(cfg, n, world_size, micro)
    return plan_examples(cfg, n, world_size, micro)


def _say_launch_notes(cfg: RunConfig, accelerator) -> None:
    """What the launch asked for and did not get, said once as the run starts (`trainer.launch`)."""
    compute = str(resolve_dtype(cfg.model.dtype, accelerator.device)).removeprefix("torch.")
    for note in launch_notes(os.environ, processes=accelerator.num_processes,
                             distributed=accelerator.distributed_type.value, precision=accelerator.mixed_precision,
                             dtype=cfg.model.dtype, compute=compute, device=accelerator.device.type,
                             cpu_bf16=accelerator.device.type != "cpu" or cpu_has_bf16(),
                             rollout_dtype=getattr(getattr(cfg.algorithm, "rollout", None), "dtype", None)):  # fmt: skip
        print(note)
    if note := split_groups_note(cfg, accelerator.num_processes):
        print(note)


def split_groups_note(cfg: RunConfig, world: int) -> str | None:
    """A note when each process's share of a step holds part of a prompt's group where one process's step holds
    whole groups: the steps then gather other completions than a one-process run's (the same completions over a
    rollout, in other steps), and the run differs from it beyond float rounding, unsaid (an audit: step-1 loss
    -0.378 on 2 processes, -0.0566 on 1). None otherwise.

    >>> from types import SimpleNamespace as S
    >>> cfg = S(algorithm=S(name="grpo", group_size=lambda: 8), optim=S(batch_size=8))
    >>> split_groups_note(cfg, 2)[:80]
    'note: each optimisation step holds 4 of the 8 completions of a prompt on each of'
    >>> split_groups_note(cfg, 1), split_groups_note(S(algorithm=S(name="grpo", group_size=lambda: 2), optim=S(batch_size=8)), 2)
    (None, None)
    """
    if world < 2 or cfg.algorithm.name not in ("grpo", "rloo"):
        return None
    group, share = cfg.algorithm.group_size(), cfg.optim.batch_size // world
    if group <= 1 or share % group == 0 or cfg.optim.batch_size % group:
        return None
    whole = next(b for b in range(cfg.optim.batch_size, 10**6) if b % (world * group) == 0)
    return (f"note: each optimisation step holds {share} of the {group} completions of a prompt on each of the {world} "
            f"processes, where one process's steps hold whole groups: the steps train other completions together "
            f"than a one-process run would (the same completions over a rollout), so the runs differ beyond float "
            f"rounding; optim.batch_size {whole} keeps whole groups on each process")

def _start_run_dir(cfg: RunConfig, run_dir: Path, data, plan: EpochPlan, steps: int, *, resumed_at: int | None,
                   environment: dict) -> None:  # fmt: skip
    """The run folder's config.yaml, data fingerprint (a resumed run's record was just checked) and environment,
    and the notes for the start of the run: rows truncated or skipped, a resume on another machine or software."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    fingerprint = data_fingerprint(cfg)
    if resumed_at is None or read_fingerprint(run_dir) is None:
        write_fingerprint(run_dir, {**fingerprint, **weights_fingerprint(cfg), **inputs_fingerprint(cfg)},
                          plan.steps_per_epoch)
    if len({f["sha256"] for f in fingerprint.values()}) == 1 < len(fingerprint):  # data.eval is data.train
        print(f"warning: data.eval ({cfg.data.eval}) holds the same bytes as data.train ({cfg.data.train}): its loss "
              "is the training rows' loss, not a held-out one; give rows the run does not train on")
    if note := record_environment(run_dir, environment, resumed_at=resumed_at):
        print(note)
    skipped = skipped_note(plan, source=cfg.data.train, lines=data.train_lines, seed=cfg.run.seed,
                           shuffle=cfg.data.shuffle, total_steps=steps, line_noun=data.train_noun)  # fmt: skip
    for note in [*data.notes, *([skipped] if skipped else [])]:
        print(f"warning: {note}")
    stop = f"run.max_steps={cfg.run.max_steps}" if cfg.run.max_steps is not None else f"run.epochs={cfg.run.epochs:g}"
    rl = getattr(cfg.algorithm, "rollout", None) is not None
    if short := short_run_note(plan, source=cfg.data.train, total_steps=steps, stop=stop, seed=cfg.run.seed,
                               shuffle=cfg.data.shuffle, lines=data.train_lines, line_noun=data.train_noun,
                               noun="prompts" if rl else "examples"):  # fmt: skip
        print(f"note: {short}")


def _check_context(cfg: RunConfig, data, config) -> None:
    """Refuse training rows longer than the model has positions for (`models.loading.context_length`:
    `max_position_embeddings`, GPT-2's `n_positions`, or what rotary scaling extends them to): learned position embeddings fail there with an index error, and rotary ones run positions the
    model never trained on, silently. Checked on the rows themselves: a data.max_length above the context is
    harmless while every row is shorter."""
    context = context_length(config)
    if context is None or cfg.data.max_length <= context:
        return
    rollout = getattr(cfg.algorithm, "rollout", None)
    new_tokens = rollout.max_new_tokens if rollout is not None else 0
    sampled = f" with algorithm.rollout.max_new_tokens ({new_tokens}) sampled after the prompt" if new_tokens else ""
    fix = (f"Set data.max_length={context} or less (prompts that leave no room for the completion are then named), "
           "or shorten those prompts or the completions" if new_tokens else
           f"Set data.max_length={context} or less (longer rows are then cut, with a note), or shorten them")  # fmt: skip
    for path, evaluation, n in ((cfg.data.train, False, len(data.train)), (cfg.data.eval, True, len(data.eval or []))):
        over = data.longest_rows(context, new_tokens, evaluation=evaluation) if n else []
        if over:
            where = "rows (by position)" if evaluation else "training rows"
            raise ConfigError(
                f"{path}: {len(over)} of {n} {where} are longer than the model's context of {context} positions"
                f"{sampled} ({lines_text(over, noun='line' if evaluation else data.train_noun)}), which data.max_length ({cfg.data.max_length}) allows. {fix}"
            )


def _check_packing(cfg: RunConfig, lm) -> None:
    """Refuse `data.packing` for a model that cannot keep packed examples apart: transformers tells them apart by
    position ids restarting inside a row (`data.collate`), which a model whose forward takes none, or ALiBi
    attention (`prefix_sharing.slot_distances`: BLOOM, MPT), never reads; each example would attend to those
    before it in its row, silently (an audit measured BLOOM's log-probs 7.5e-3 off, MPT's 0.35)."""
    if not cfg.data.packing:  # (a method that does not pack refuses the setting: config_rules)
        return
    why = slot_distances(lm.config)
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft's wrapper passes them on (**kwargs)
    if why is None and "position_ids" not in inspect.signature(inner.forward).parameters:
        why = f"{type(inner).__name__}'s forward takes no position ids"
    if why:
        raise ConfigError(f"data.packing: {why}, so examples packed into one row would attend to each other. Set "
                          "data.packing=false (rows are then padded, each example alone)")  # fmt: skip


def _load_model(cfg: RunConfig, algorithm: Algorithm, device) -> torch.nn.Module:
    """The trained module: the causal LM as the technique wants it, with the method's scalar head if it has one."""
    lm = load_model(cfg.model, cfg.technique, device=device, dropout=cfg.keeps_model_dropout())
    return ScalarHeadModel(lm, kind=algorithm.head) if algorithm.head else lm


def _batch_source(cfg, algorithm, data, model, tokenizer, accelerator, micro, plan, reference, *, resumed, evaluating):
    """The run's batch source (rollouts for an RL method, the dataset's examples otherwise, with the reference's
    log-probs when the loss needs them) and this process's evaluation batches, if any."""
    if algorithm.rollouts is not None:
        source = RolloutSource(cfg, prompts=list(data.train), model=model, tokenizer=tokenizer,
                               accelerator=accelerator, micro_batch_size=micro, rollouts=algorithm.rollouts,
                               reference=reference, plan=plan, loss_units=algorithm.loss_units)  # fmt: skip
        return source, None
    source = ExampleBatchSource(data.train, data.collate, batch_size=cfg.optim.batch_size, micro_batch_size=micro,
                                seed=cfg.run.seed, shuffle=cfg.data.shuffle, rank=accelerator.process_index,
                                world_size=accelerator.num_processes,
                                same_micro_batches=cfg.run.collective_forwards)  # fmt: skip
    eval_batches = None
    if evaluating:
        rows = list(data.eval)
        extra = len(rows) % accelerator.num_processes if cfg.run.collective_forwards else 0
        if extra:  # as many rows, so as many forwards (collectives), on every process
            rows = rows[:-extra]
            if accelerator.is_main_process:
                last = f"its last {extra} rows are" if extra > 1 else "its last row is"
                print(f"warning: {cfg.data.eval}: {last} not evaluated: a sharded model (run.sharding=fsdp2 or "
                      f"DeepSpeed ZeRO-3) evaluates as many rows on each of the {accelerator.num_processes} "
                      "processes")  # fmt: skip
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        eval_batches = [data.collate(mine[i : i + micro]) for i in range(0, len(mine), micro)]
    if not reference.needed:
        return source, eval_batches
    if reference.mode == "precompute":  # every row the run scores, before the policy trains
        rows = [*data.train, *(data.eval or [])]
        reference.precompute((data.collate(rows[i : i + micro]) for i in range(0, len(rows), micro)), "loss_mask",
                             chunk=micro, run_dir=Path(cfg.run.output_dir), model_name=cfg.model.name,
                             resuming=resumed, save=accelerator.is_main_process,
                             numerics=_numerics(cfg, accelerator))  # fmt: skip
    with_reference = WithReference(source, reference, "loss_mask", chunk=micro)
    # Held-out pairs get their reference log-probs once: the reference is frozen.
    return with_reference, [with_reference.add(b) for b in eval_batches] if eval_batches is not None else None


def _numerics(cfg: RunConfig, accelerator) -> str:
    """What a run's forwards compute in, in words: the compute dtype, mixed or pure, and the device type."""
    dtype = str(resolve_dtype(cfg.model.dtype, accelerator.device)).removeprefix("torch.")
    kind = " (pure)" if cfg.model.pure_bf16 and dtype == "bfloat16" else ""
    return f"{dtype}{kind} on {accelerator.device.type}"


def final_step(final: Path) -> int | None:
    """The step of the model in a run's `final/` (its `posttrain_model.json`'s `step`), None when unknown."""
    try:
        step = json.loads((final / INFO_FILE).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _save_final(accelerator, model, tokenizer, run_dir: Path, cfg: RunConfig, step: int):
    """`final/`: the adapter or model (and a scalar head beside it), written atomically by the main process; its
    `posttrain_model.json` says the `step` it was saved at."""
    final = run_dir / "final"
    unwrapped = unwrap_parallel(model)
    # A sharded model's whole weights (a scalar head's too), gathered by every process to the main one
    state = full_state(unwrapped) if cfg.run.sharding == "fsdp2" else None
    if is_partitioned(unwrapped):  # DeepSpeed ZeRO-3: its partitions, gathered a weight at a time
        state = partitioned_state(unwrapped)
    if accelerator.is_main_process:
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if isinstance(unwrapped, ScalarHeadModel):
                save_scalar_model(unwrapped, tokenizer, tmp, cfg, state_dict=state, step=step)
            else:
                save_model(unwrapped, tokenizer, tmp, base_model=cfg.model.name, state_dict=state, step=step)
        except Exception as err:
            full = out_of_space(err, run_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            if full is None:
                raise
            raise UserError(f"writing the final model into {final} failed: {full}. The run's checkpoints are kept: "
                            "free some space and run it again with --resume, which writes the final model from "
                            "the last one") from err  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final, unwrapped


def _accelerator(cfg: RunConfig):
    """The run's Accelerator: CPU or GPU, and bf16 mixed precision the standard way (float32 master weights from
    `load_model`, Accelerate's autocast) when the compute dtype is bfloat16."""
    from accelerate import Accelerator  # after the hub mode settled (`train`)
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin

    on_gpu = default_device().type == "cuda"  # not under `accelerate launch --cpu`
    precision = mixed_precision(cfg.model, "cuda" if on_gpu else "cpu")
    # AcceleratorState is a process-wide singleton that refuses another precision once set, and keeps the dynamo
    # backend of the first Accelerator made in the process (a notebook's own `Accelerator(dynamo_backend=...)`
    # would compile this run's model past model.compile's checks), but one process may run several trainings
    # (tests, the Python API, recipes). Only its precision and dynamo part is reset, never the process group
    # (PartialState), so this is safe under a multi-process launch too.
    shared = AcceleratorState._shared_state
    dynamo = getattr(getattr(shared.get("dynamo_plugin"), "backend", None), "value", "NO") if shared else "NO"
    if shared and (shared.get("_mixed_precision") != precision or dynamo != "NO"):
        AcceleratorState._reset_state(reset_partial_state=False)
    # Named, so that the environment an `accelerate launch` leaves cannot change a run silently (its
    # --gradient_accumulation_steps divided every gradient; its --dynamo_backend compiled the whole model past the
    # model.compile checks): `trainer.launch.launch_notes` says they were not used.
    fixed = dict(mixed_precision=precision, dynamo_backend="no",
                 gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))  # fmt: skip
    if deepspeed_zero_stage() is None:
        return Accelerator(cpu=not on_gpu, **fixed)
    if on_gpu:
        accelerator = Accelerator(**fixed)
    else:
        # An Accelerate DeepSpeed config on CPUs (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu: how the tests run
        # ZeRO): Accelerate hands the model to DeepSpeed only when not told cpu=True, and then finds no process
        # group backend for a machine without an accelerator unless it is named.
        from accelerate.utils import InitProcessGroupKwargs

        accelerator = Accelerator(**fixed, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    _whole_loads(accelerator)
    return accelerator


def _whole_loads(accelerator) -> None:
    """Under DeepSpeed, every model posttrain loads (the policy, a frozen-copy reference, a reward model)
    loads whole, as in any other run; DeepSpeed partitions the trained one at `prepare` (ZeRO-3), and
    `models.sharding.zero3_inference` a frozen copy and a trained reward model scoring rollouts. Accelerate
    1.16 registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and under ZeRO-3
    transformers then loads each model already partitioned (`deepspeed.zero.Init`): the policy before DPO's
    `precompute` ran on it, and the reference copy that nothing ever gathered, failed so ("'weight' must be
    2-D"). So the registration is cleared; a config that asks for partitioned loading (`zero3_init_flag:
    true`) is refused rather than ignored. Also the ZeRO stage DeepSpeed runs is put in the environment
    `config.deepspeed_zero_stage` reads: `accelerate launch` leaves a DeepSpeed JSON file's stage out."""
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
    if stage is not None:
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(stage)
    if plugin.zero3_init_flag:
        raise ConfigError(
            "the Accelerate DeepSpeed config sets zero3_init_flag: true (load the model already partitioned), which "
            "posttrain does not do: it loads every model whole in each process, and DeepSpeed partitions the trained "
            "one when training starts. Set zero3_init_flag: false (as configs/accelerate/deepspeed_zero3.yaml does), "
            "or shard with run.sharding=fsdp2 under torchrun"
        )
    unset_hf_deepspeed_config()


def _before_deepspeed(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro: int,
                      max_grad_norm: float | None, *, universal: bool = False) -> None:  # fmt: skip
    """What a run under an Accelerate DeepSpeed config (configs/accelerate/deepspeed_zero*.yaml) needs before
    `prepare`; nothing otherwise.

    DeepSpeed's batch settings, from the run's: a micro-batch of `micro` rows per process (Accelerate would take it
    from a prepared dataloader; posttrain's batch sources cut the batches) and no accumulation of DeepSpeed's own:
    posttrain's loop accumulates, marking which backward ends a step (`trainer.loop`), so the config file's
    `gradient_accumulation_steps` is replaced by 1 (DeepSpeed would divide each micro-batch's loss by it, on top of
    posttrain's own normaliser). Clipping at `optim.max_grad_norm` (none when null), which DeepSpeed does inside
    its step, in place of the config file's `gradient_clipping`. With `universal` (a resume on another number of
    processes: `trainer.checkpoint.deepspeed_universal`), the engine is told to load DeepSpeed's universal
    checkpoint (`checkpoint.load_universal`), which it reads when loading, not when built. All are set on every
    run, since one process may run several (the plugin's config outlives a run).

    And a version bump of every trained weight after each step of `optimizer` (the one DeepSpeed steps): DeepSpeed
    writes the stepped weights through `.data` (ZeRO-1/2 into the weights' flat buffer, ZeRO-3 into each process's
    partition), which moves no version counter (measured: none moved in 2 steps, ZeRO-2 or ZeRO-3), so
    `rollout.vllm_engine.weight_versions` would see no step and vLLM would keep sampling from the first weights
    pushed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro, train_batch_size=micro * accelerator.num_processes,
        gradient_accumulation_steps=1, gradient_clipping=max_grad_norm or 0.0,
    )  # fmt: skip
    accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = universal
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer.register_step_post_hook(lambda *_: torch.autograd.graph.increment_version(trained))
