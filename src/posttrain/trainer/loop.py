"""The one training loop. Every method (SFT today; reward models, DPO, PPO, GRPO next) runs through it.

It takes a *batch source* (for each step, this process's micro-batches) and a *loss function* returning a sum
over loss units, and does the rest: gradient accumulation with one global normaliser, clipping, the optimiser
and schedule, NaN guards, periodic evaluation, checkpoints and metrics. Accelerate handles devices and
processes, so the same loop runs on one CPU, one GPU, or under `accelerate launch` with several processes.

It does not load models or data (see `posttrain.train`), and it knows nothing about any one method.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.algorithms.base import Algorithm, Batch, BatchSource, Mean, Step
from posttrain.algorithms.common import normalise_loss
from posttrain.errors import (
    CollectiveRewardFailed,
    NoRewardSignal,
    OutOfMemory,
    PeerStopped,
    TrainingDiverged,
)
from posttrain.trainer.checkpoint import latest_checkpoint, layout_of, save_checkpoint
from posttrain.trainer.metrics import MetricsLogger


@dataclass
class LoopResult:
    steps: int
    history: list[dict]


def _to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def _micro_batch(accelerator, model, *, last: bool):
    """The context of one micro-batch's forward and backward. DDP syncs gradients only on a step's last
    micro-batch (`no_sync` before). DeepSpeed (an Accelerate DeepSpeed config; `model` is its engine) is told
    whether this backward ends the step (its accumulation boundary, where ZeRO reduces the gradients), as its
    documentation's manual accumulation does (`set_gradient_accumulation_boundary`): only the last micro-batch is,
    or each would be a step of its own. It steps only in `_deepspeed_step`, after the NaN guard."""
    if _deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last)
        yield
        return
    with contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model):
        yield


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == "DEEPSPEED"  # Accelerate's DistributedType, a str enum


def _backward(accelerator, model, loss: torch.Tensor) -> None:
    """`loss`'s backward. Under DeepSpeed the engine's own, which never steps: Accelerate's DeepSpeed `backward`
    steps the engine inside a step's last backward, before the loop's guard could see a NaN loss (measured,
    DeepSpeed 0.19.8, ZeRO-2 and ZeRO-3: a NaN loss over finite gradients was stepped into the weights)."""
    if _deepspeed(accelerator):
        model.backward(loss)
    else:
        accelerator.backward(loss)


def _deepspeed_step(engine, loss_finite: bool) -> tuple[float | None, bool]:
    """Under DeepSpeed, the engine's step once the step's gradients are reduced, unless the guard stops it:
    (the gradient norm, None where not computed; whether the weights took the step).

    Not stepped when the loss was NaN/inf on any process (`loss_finite`, reduced over processes), nor under ZeRO-2
    and ZeRO-3 when any process's reduced gradient partition holds a NaN/inf: the ZeRO optimizer's own check of its
    partitions, a MAX over the processes (`has_overflow`, what DeepSpeed runs at the start of its step under fp16
    loss scaling). Otherwise the engine steps; DeepSpeed 0.19.8 itself skips a step whose gradient norm is not
    finite (ZeRO-3 always, ZeRO-2 unless a bf16 config turns `check_grad_overflow` off), which `was_step_applied`
    reports; a non-finite norm from a step that was applied (ZeRO-1, or that check turned off) moved the weights."""
    if not loss_finite:
        return None, False
    if engine.zero_optimization_stage() in (2, 3) and engine.optimizer.has_overflow(partition_gradients=True):
        return None, False
    engine.step()
    norm = engine.get_global_grad_norm()
    return (math.nan if norm is None else float(norm)), engine.was_step_applied()


def _reduce_sum(accelerator, value: float | torch.Tensor) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return float(t)


def _number(value) -> float:
    return float(value.detach() if isinstance(value, torch.Tensor) else value)


class _MetricSums:
    """The metrics of one step (or one evaluation), summed over its micro-batches.

    Plain metrics are sums over loss units, divided by the step's loss units at the end (like the loss); `Mean`
    metrics carry their own count (e.g. tokens), so they come out as means over the whole step whatever the
    micro-batch size. Keys are added in the same order on every process, so the reductions line up."""

    def __init__(self) -> None:
        self.plain: dict[str, float] = {}
        self.means: dict[str, tuple[float, float]] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, Mean):
                total, count = self.means.get(k, (0.0, 0.0))
                self.means[k] = (total + _number(v.total), count + _number(v.count))
            else:
                self.plain[k] = self.plain.get(k, 0.0) + _number(v)

    def reduce(self, accelerator, units: float, prefix: str = "") -> dict[str, float]:
        """All processes' sums as logged values; a `Mean` with no units anywhere in the step is left out."""
        out = {f"{prefix}{k}": _reduce_sum(accelerator, v) / max(units, 1.0) for k, v in self.plain.items()}
        for k, (total, count) in self.means.items():
            total, count = _reduce_sum(accelerator, total), _reduce_sum(accelerator, count)
            if count > 0:
                out[f"{prefix}{k}"] = total / count
        return out


@torch.no_grad()
def evaluate_loss(
    accelerator, model, algorithm: Algorithm, batches: Sequence[Batch], cfg
) -> dict[str, float]:
    """Mean loss (and metrics) per loss unit over `batches` (this process's share), summed over processes."""
    was_training = model.training
    model.eval()
    units, sums = 0.0, _MetricSums()
    sums.add({"loss": 0.0})  # the same first key on every process
    for batch in batches:
        batch = _to_device(batch, accelerator.device)
        loss_sum, metrics = algorithm.loss_fn(model, batch, cfg)
        units += float(algorithm.loss_units(batch, cfg))
        sums.add({"loss": loss_sum, **metrics})
    model.train(was_training)
    return sums.reduce(accelerator, _reduce_sum(accelerator, units), prefix="eval_")


def training_loop(
    *,
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    algorithm: Algorithm,
    batch_source: BatchSource,
    cfg,
    run_dir: Path,
    total_steps: int,
    start_step: int = 0,
    eval_batches: Sequence[Batch] | None = None,
) -> LoopResult:
    run = cfg.run
    logger = MetricsLogger(
        run_dir,
        enabled=accelerator.is_main_process,
        tensorboard=run.tensorboard,
        total_steps=total_steps,
        start_step=start_step,
        progress=run.progress,
    )
    history: list[dict] = []
    world = accelerator.num_processes
    model.train()
    started = time.perf_counter()
    tokens_since_start = 0
    last_saved = start_step
    step = start_step + 1  # the step being run (the loop's variable once it starts)
    try:
        steps = batch_source.steps(start_step)
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            # For RL this is where rollouts are generated (timed apart: data_time_s), under the same autocast as
            # the loss, so that the sampler, the old log-probs and the reference see the training forward's numerics.
            with accelerator.autocast():
                work = _next_step(steps, run_dir)
            data_time = time.perf_counter() - t0
            micro_batches = [_to_device(b, accelerator.device) for b in work.micro_batches]

            # ---- one normaliser for the whole step: loss units over every micro-batch and every process, and
            # those of the rows left untrained for their zero gradient (RL: `Step.skipped_units`)
            total_units = _reduce_sum(
                accelerator,
                sum(float(algorithm.loss_units(b, cfg)) for b in micro_batches) + work.skipped_units,
            )

            # ---- forward/backward with accumulation; gradients synced on the last micro-batch
            sums = _MetricSums()
            finite = True
            for i, batch in enumerate(micro_batches):
                with _micro_batch(accelerator, model, last=i == len(micro_batches) - 1):
                    loss_sum, metrics = algorithm.loss_fn(model, batch, cfg)
                    finite &= bool(torch.isfinite(loss_sum.detach()))
                    _backward(accelerator, model, normalise_loss(loss_sum, total_units, world))
                sums.add({"loss": loss_sum, **metrics})
            if not micro_batches and work.skipped_rows:
                # Every row's gradient is exactly 0 and none ran: the optimiser steps on zeros, as it would have
                # after training them (AdamW's moments still decay and move the weights). Every trainable parameter
                # gets one: a parameter no forward reaches (none in a causal LM, fully or LoRA-trained) would have
                # had no gradient there, and AdamW would have left it alone.
                for p in model.parameters():
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)

            # ---- clip, guard against NaN/inf (loss or gradient), step
            # The norm is always computed (max_norm=inf when clipping is off) so that a NaN/inf gradient is caught
            # even when the loss is finite, before optimizer.step() can write it into the weights. DeepSpeed clips
            # and steps inside its engine's step, which `_deepspeed_step` takes only past the same guard.
            all_finite = _reduce_sum(accelerator, 0.0 if finite else 1.0) == 0.0
            updated = False  # whether the weights took this step although it diverged (DeepSpeed only)
            if _deepspeed(accelerator):
                grad_norm, updated = _deepspeed_step(model, all_finite)
            else:
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            if not all_finite or grad_norm is None or not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                _handle_divergence(
                    accelerator,
                    run_dir,
                    step,
                    last_saved,
                    model,
                    optimizer,
                    scheduler,
                    run,
                    grad_norm,
                    all_finite,
                    batch_source,
                    updated=updated,
                )
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()  # DeepSpeed: nothing (Accelerate's wrapper); the engine stepped in `_deepspeed_step`
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- metrics: per-unit means over the whole step
            now = time.perf_counter()  # one reading for the step's time and the run's clock: `elapsed_s` minus
            elapsed = now - t0  # `step_time_s` is the time before the step began, ~0 on a process's first step
            # (`report.compose.training_seconds` finds a resumed run's stretches so; a later reading, after the
            # collectives below, put ms between them on several processes and hid the restart: a review)
            step_tokens = _reduce_sum(
                accelerator,
                sum(
                    int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                    for b in micro_batches
                ),
            )
            tokens_since_start += step_tokens
            record = {"step": step, **sums.reduce(accelerator, total_units)}
            record.update(
                lr=lr,
                grad_norm=grad_norm,
                loss_units=total_units,
                tokens=step_tokens,
                tokens_per_s=step_tokens / max(elapsed, 1e-9),
                step_time_s=elapsed,
                data_time_s=data_time,
                train_time_s=elapsed - data_time,
                elapsed_s=now - started,
                # this process's peak resident memory so far, in GB (ru_maxrss: KiB on Linux, bytes on macOS)
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * (1 if sys.platform == "darwin" else 1024) / 1e9,
            )
            if accelerator.device.type == "cuda":  # the caching allocator's peak of tensor memory on this GPU
                record["peak_cuda_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
            # Step-level metrics (reward means, generation time) are logged as given, not divided by loss units:
            # the batch source's values (a rollout's statistics cover every process's samples; its times are the
            # main process's).
            record.update(work.metrics)
            if step % run.log_every == 0 or step == total_steps:
                logger.log(record)
            history.append(record)
            key = algorithm.key_metric  # the method's own measure of progress (DPO: reward accuracy), if any
            logger.progress(
                1,
                {
                    "loss": f"{record['loss']:.4f}",
                    **({key: f"{record[key]:.4g}"} if key in record else {}),
                    "lr": f"{record['lr']:.2e}",
                    "tok/s": f"{tokens_since_start / (time.perf_counter() - started):.0f}",
                },
            )

            # ---- periodic evaluation (always at the end: data.eval without run.eval_every) and checkpoints
            if eval_batches is not None and (
                step == total_steps or (run.eval_every and step % run.eval_every == 0)
            ):
                ev = {"step": step, **evaluate_loss(accelerator, model, algorithm, eval_batches, cfg)}
                logger.log(ev)
                logger.write(f"step {step}: eval_loss {ev['eval_loss']:.4f}")
                history.append(ev)
            if (run.save_every and step % run.save_every == 0) or step == total_steps:
                save_checkpoint(
                    accelerator, run_dir, step, model, optimizer, scheduler, keep=run.keep_checkpoints,
                    source=batch_source, layout=layout_of(run),
                )
                last_saved = step
    except RuntimeError as err:  # torch.OutOfMemoryError (CUDA) is one too
        if out_of_memory(err):
            raise OutOfMemory(_out_of_memory_message(err, step, cfg, accelerator, run_dir)) from None
        if accelerator.num_processes > 1 and peer_stopped(err):
            said = str(err).strip().splitlines()[0]
            raise PeerStopped(
                f"Another process of this run stopped at step {step} while this one (process "
                f"{accelerator.process_index}) waited for it ({said}): that process's own error, above or in its "
                "log, is the cause."
            ) from None
        raise
    finally:
        logger.close()
    return LoopResult(steps=total_steps, history=history)


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure: CUDA's `torch.OutOfMemoryError`, or the CPU allocator's error.

    >>> out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
    >>> out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    False
    """
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _out_of_memory_message(err: BaseException, step: int, cfg, accelerator, run_dir: Path) -> str:
    """One paragraph: where the run ran out of memory, what torch asked for, what to change (what `--resume` takes,
    and what needs a new run: `train._RESUMABLE_CHANGES`), what is kept."""
    said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    said = said.split("DefaultCPUAllocator: ", 1)[-1]  # the CPU allocator's message, without its C++ location
    world = accelerator.num_processes
    where = f"process {accelerator.process_index} of {world}, " if world > 1 else ""
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size // world  # as `train` splits the step
    rollout = getattr(cfg.algorithm, "rollout", None)
    # settings that need less memory and may change on --resume (the same math; `train._RESUMABLE_CHANGES`)
    resumable = [f"a smaller optim.micro_batch_size (now {micro} per process; the step's batch stays "
                 f"optim.batch_size={cfg.optim.batch_size} through accumulation)"]  # fmt: skip
    if not cfg.model.gradient_checkpointing and not cfg.model.compile:  # compile refuses checkpointing
        resumable.append("model.gradient_checkpointing=true")
    if cfg.model.compile:
        resumable.append(f"a lower model.compile_memory_budget (now {cfg.model.compile_memory_budget or 1})")
    # settings that need less memory but change the run: a new run folder
    if rollout is None:
        new = [f"a lower data.max_length (now {cfg.data.max_length})"]
    else:  # RL: data.max_length only filters prompts; the rollout's length and batch hold the memory
        if rollout.engine == "hf":
            resumable.append(f"a smaller algorithm.rollout.generation_batch_size (now "
                             f"{rollout.generation_batch_size or 'the whole rollout'})")  # fmt: skip
        new = [f"a lower algorithm.rollout.max_new_tokens (now {rollout.max_new_tokens})"]
        merges = rollout.merge_adapters if rollout.merge_adapters is not None else accelerator.device.type == "cpu"
        if rollout.engine == "hf" and cfg.technique.name == "lora" and merges:  # as `HFEngine` decides
            new.append("algorithm.rollout.merge_adapters=false (no merged copy of the adapted weights while sampling)")
        if rollout.engine == "vllm":
            new.append(f"a lower algorithm.rollout.vllm_gpu_memory_utilization (now {rollout.vllm_gpu_memory_utilization})")
    if cfg.technique.name != "qlora" and not cfg.model.compile:  # compile refuses qlora
        new.append("technique.name=" + ("lora or qlora" if cfg.technique.name == "full" else "qlora"))
    ckpt = latest_checkpoint(run_dir)
    if ckpt:
        kept = (f"The last checkpoint, {ckpt}, is kept: continue from it with --resume and {' or '.join(resumable)}; "
                f"or start a new run (another run.output_dir) with {' or '.join(new)}.")  # fmt: skip
    else:
        kept = f"No checkpoint had been written yet: start again with {' or '.join(resumable + new)}."
    return (
        f"Out of memory at step {step} ({where}{accelerator.device.type}): {said}. `posttrain estimate` gives a "
        f"setting's memory before a run. {kept} No final model was written."
    )


def peer_stopped(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of the run stopped (gloo: the peer
    closed its connection; NCCL: the remote process exited), not an error of this process.

    >>> peer_stopped(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:3505"))
    True
    """
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "remote process exited", "Connection reset by peer"))


def _next_step(steps: Iterator[Step], run_dir: Path) -> Step:
    """The batch source's next step; a run that lost its reward signal, or whose sharded reward model failed on
    this process, stops naming the checkpoint it keeps."""
    try:
        return next(steps)
    except (NoRewardSignal, CollectiveRewardFailed) as err:
        ckpt = latest_checkpoint(run_dir)
        fix = ("fix the reward function where it is (its file and name: a changed algorithm.rewards is refused on "
               "--resume) and" if isinstance(err, NoRewardSignal) else "when every process can run it,")  # fmt: skip
        kept = (f"The last checkpoint, {ckpt}, is kept: {fix} continue from it with --resume."
                if ckpt else "No checkpoint had been written yet.")  # fmt: skip
        raise type(err)(f"{err}\n{kept} No final model was written.") from None


def _handle_divergence(
    accelerator, run_dir, step, last_saved, model, optimizer, scheduler, run, grad_norm, loss_finite, batch_source,
    *, updated: bool = False,
) -> None:
    """Keep the last good state as a checkpoint (the parameters were not updated) and stop with advice. When they
    were (`updated`: a DeepSpeed step that was applied although its gradient norm was not finite), nothing of the
    state in memory is saved, and the note says so."""
    good = step - 1
    if good > 0 and good != last_saved and not updated:
        save_checkpoint(
            accelerator, run_dir, good, model, optimizer, scheduler, keep=run.keep_checkpoints,
            source=batch_source, layout=layout_of(run),
        )
    ckpt = latest_checkpoint(run_dir)
    what = ("the loss" if not loss_finite else "a gradient" if grad_norm is None
            else f"the gradient norm ({grad_norm})")  # fmt: skip
    kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint had been written yet"
    stopped = ("the run stopped, but DeepSpeed had already stepped the weights with it: the weights in memory were "
               "not saved" if updated else "the run stopped before updating the weights")  # fmt: skip
    raise TrainingDiverged(
        f"step {step}: {what} became NaN or infinite, so {stopped}; {kept}. "
        "Check the data of this step, or start a new run (another run.output_dir) with a lower optim.lr and "
        "optim.max_grad_norm set."
    )
