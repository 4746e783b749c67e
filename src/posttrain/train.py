"""`train(cfg)`: from a validated run config to a trained model in a run folder.

Order matters for the user: the config is already valid; then the run folder is held (one process at a time,
`trainer.runlock`) and checked (never overwrite a run that has checkpoints unless resuming), the tokenizer loads
and the data is read, validated and rendered (so a bad file fails in seconds, before the model loads); only then
the model, optimiser and the loop.

Run folder layout: `config.yaml` (resolved), `metrics.jsonl`, `checkpoints/step-NNNNNN/`, `final/` (adapter or
model + tokenizer, loadable by `posttrain generate` and `posttrain merge`), and `.posttrain.lock` while a run
holds the folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import RunConfig, dump_config
from posttrain.errors import ConfigError
from posttrain.models.hub import prepare_hub_libraries
from posttrain.trainer.checkpoint import latest_checkpoint, load_checkpoint
from posttrain.trainer.runlock import hold_run_dir, launch_rank, stale_note

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
    "run.output_dir",
}


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    history: list[dict]
    model: object = None
    tokenizer: object = None


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (or None), after refusing anything that would overwrite a run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"run.output_dir {run_dir} exists and is not a folder; choose another run.output_dir"
        )
    ckpt = latest_checkpoint(run_dir)
    started = ckpt is not None or (run_dir / "final").exists() or (run_dir / "config.yaml").exists()
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
    saved = run_dir / "config.yaml"
    if saved.exists():
        try:
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"{saved}: unreadable; restore it or start a new run folder") from None
        new = cfg.model_dump(mode="json")
        changed = [
            f"{sec}.{k}"
            for sec in new
            if isinstance(new[sec], dict)
            for k in new[sec]
            if f"{sec}.{k}" not in _RESUMABLE_CHANGES and ((old.get(sec) or {}).get(k) != new[sec][k])
        ]
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the one {run_dir} was started with in {', '.join(changed)}; "
                "only run length, logging and checkpoint settings (e.g. run.max_steps) may change when resuming"
            )
    return ckpt


def train(cfg: RunConfig, *, resume: bool = False, return_model: bool = False) -> TrainResult:
    """Run training as described by `cfg`; with `resume`, continue from the run folder's latest checkpoint.

    The run folder is held by this process for the whole run (`trainer.runlock`): a second process that starts
    into it is refused before anything is written. Only rank 0 of a multi-process launch holds it.
    """
    prepare_hub_libraries()  # before accelerate imports huggingface_hub: offline when the hub is unreachable
    if launch_rank() != 0:
        return _train(cfg, resume=resume, return_model=return_model)
    with hold_run_dir(cfg.run.output_dir) as stale:
        if stale:
            print(stale_note(cfg.run.output_dir, stale), file=sys.stderr)
        return _train(cfg, resume=resume, return_model=return_model)


def _train(cfg: RunConfig, *, resume: bool, return_model: bool) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from posttrain.algorithms import get_algorithm
    from posttrain.algorithms.base import SourceContext
    from posttrain.models import load_model, load_tokenizer, save_model
    from posttrain.trainer.batches import ExampleBatchSource, total_steps
    from posttrain.trainer.loop import training_loop
    from posttrain.trainer.metrics import truncate_metrics
    from posttrain.trainer.optim import build_optimizer, build_scheduler

    run_dir = Path(cfg.run.output_dir)
    ckpt = _check_run_dir(cfg, run_dir, resume)
    if cfg.run.tensorboard:  # every process checks, before any collective, so none waits on a failed peer
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "run.tensorboard is true but the tensorboard package is not installed; "
                "pip install tensorboard, or set run.tensorboard=false"
            ) from None
    accelerator = Accelerator(cpu=not _cuda_available())
    set_seed(cfg.run.seed)
    algorithm = get_algorithm(cfg.algorithm.name)

    # ---- data first: user errors in files surface before the (slow) model load
    tokenizer = load_tokenizer(cfg.model)
    data = algorithm.prepare(cfg, tokenizer)
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size // accelerator.num_processes
    source = None
    if algorithm.make_source is None:
        source = ExampleBatchSource(
            data.train,
            data.collate,
            batch_size=cfg.optim.batch_size,
            micro_batch_size=micro,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
    evaluating = data.eval is not None and algorithm.evaluates
    if evaluating and len(data.eval) < accelerator.num_processes:
        raise ConfigError(
            f"data.eval has {len(data.eval)} examples, fewer than the {accelerator.num_processes} processes"
        )

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        for note in data.notes:
            print(f"warning: {note}")

    # ---- model, batch source, optimiser, schedule
    if algorithm.load_model is not None:
        model = algorithm.load_model(cfg, accelerator.device)
    else:
        model = load_model(cfg.model, cfg.technique, device=accelerator.device)
    if source is None:  # rollouts (and anything else that needs the model to make its batches)
        source = algorithm.make_source(
            SourceContext(
                cfg=cfg,
                data=data,
                model=model,
                tokenizer=tokenizer,
                accelerator=accelerator,
                run_dir=run_dir,
                micro_batch_size=micro,
            )
        )
    eval_batches = None
    if evaluating:  # after the batch source: it may attach what evaluation needs (DPO's reference log-probs)
        mine = list(data.eval)[accelerator.process_index :: accelerator.num_processes]
        eval_batches = [data.collate(mine[i : i + micro]) for i in range(0, len(mine), micro)]
    steps = total_steps(cfg.run.max_steps, cfg.run.epochs, source.steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    if ckpt is not None:
        start = load_checkpoint(accelerator, ckpt, model, optimizer, scheduler, source=source)
        if start > steps:
            raise ConfigError(
                f"--resume: {ckpt.name} is already past the requested {steps} steps; raise run.max_steps "
                f"(or run.epochs) above {start}, or use the model in {run_dir / 'final'}"
            )
        if accelerator.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", start)
            print(f"resuming {run_dir} from {ckpt.name} (step {start} of {steps})")
    elif accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    result = training_loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        algorithm=algorithm,
        batch_source=source,
        cfg=cfg,
        run_dir=run_dir,
        total_steps=steps,
        start_step=start,
        eval_batches=eval_batches,
    )

    # ---- final model or adapter, written atomically
    final = run_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if algorithm.save_final is not None:
            algorithm.save_final(unwrapped, tokenizer, tmp, cfg)
        else:
            save_model(unwrapped, tokenizer, tmp, base_model=cfg.model.name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=run_dir,
        final_dir=final,
        steps=steps,
        history=result.history,
        model=unwrapped if return_model else None,
        tokenizer=tokenizer if return_model else None,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
