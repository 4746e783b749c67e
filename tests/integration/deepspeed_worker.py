"""Run by test_deepspeed.py under `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml` (2
CPU processes: DeepSpeed's CPU accelerator, gloo). Each argument is one job, run in turn:

- `PATH.yaml`: `posttrain train` of that run config (RL sampled with `PromptSeededEngine`, fsdp_worker.py: the
  same samples however the prompts are split over processes, so the run compares with one process); saves what
  this process held (parameter elements of the model, of a frozen-copy reference and of a trained reward model
  scoring the rollouts), each rollout's rewards (per function, and failures) and the whole trained weights
  (ZeRO-3's partitions gathered).
- `odd:PATH.yaml`: the same, with the last process's first sample of the second rollout made to fail to render
  for a trained reward model (`RewardModelScorer.render` raises); saves each rollout's rewards and what the
  reward model held (parameter elements), as `PATH.yaml` jobs do.
- `resume:PATH.yaml`: that run with a checkpoint every step, cut back to its checkpoint of step 2 (the later
  checkpoint and `final/` removed, as a run killed after step 2 leaves it), then resumed (`--resume`); saves the
  whole trained weights as `NAME-resumed-rankR.pt`.
- `push:MODEL_DIR:TECHNIQUE` (full, lora, qlora): the tiny model built as `build` builds it, prepared through
  posttrain's own Accelerator set-up (`train._accelerator`, `_before_deepspeed`), trained `STEPS` steps on
  `batch`'s rows (this process's half), with a vLLM engine whose backend is `FakeVLLM` (conftest.py) synced
  before the first step, after each step, and once more with nothing changed; saves what this process held and
  what was pushed.
- `base:PATH.yaml`: that run with a checkpoint every step into `NAME-base-{N}p` (N: this launch's processes), for
  another launch to resume; saves the engine's whole state (`engine_state`) at each checkpoint.
- `reshard:PATH.yaml:RUN_DIR`: a run written by another number of processes or under another ZeRO stage (RUN_DIR,
  its checkpoints every step), copied to `NAME-from-{W}p-on-{N}p` beside PATH, cut back to its last step but one
  (as `resume:` cuts back to step 2), and resumed here (DeepSpeed's universal checkpoint); saves the engine's whole
  state right after loading and the whole trained weights as `NAME-from-{W}p-on-{N}p-rankR.pt`.
- `diverge:PATH.yaml:MODE`: that run with step 3's last micro-batch on the last process made to diverge (MODE
  `loss`: a NaN added to the loss, whose gradient stays finite; `grad`: an infinite gradient under a finite loss),
  into `NAME-diverge-MODE-{N}p`; saves the message it stopped with.

`base:` and `reshard:` sample RL rollouts with `RolloutSeededEngine`, whose samples depend neither on the process
layout nor on where a run was resumed.

DeepSpeed's CPU communication would compile a shared-memory all-reduce kernel (C++, minutes on 2 cores) when it
starts; `no_shm_kernel` marks it unusable (ZeRO's collectives go through torch.distributed, gloo) and makes any
attempt to build it fail at once, so that a DeepSpeed release that changes how it is chosen fails this test loudly
instead of compiling for minutes."""

import os
import sys
import traceback

import torch

STEPS = 2
LR = 1e-3


def build(model_dir: str, technique: str) -> torch.nn.Module:
    """The tiny model, whole; under LoRA with seeded adapters, B away from zero (a trained-looking adapter): the same
    in every process and in the test's one-process run."""
    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model

    model = load_model(ModelConfig(name=model_dir), TechniqueConfig(name=technique, r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def batch(rows: slice) -> dict[str, torch.Tensor]:
    """4 rows of 12 tokens (no padding: each process's mean loss over its 2 rows, averaged over the 2 processes, is
    the mean over all 4, as one process computes it)."""
    ids = (torch.arange(4 * 12).reshape(4, 12) * 7 % 250 + 3)[rows]
    return {"input_ids": ids, "labels": ids}


def no_shm_kernel() -> None:
    """DeepSpeed's shared-memory kernel marked unusable, and its build made to raise (module docstring)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = deepspeed.ops.__compatible_ops__  # probed once, then read by deepspeed.comm (0.19.8: comm/torch.py)
    if builder is None or builder.NAME not in compatible:
        raise RuntimeError("DeepSpeed no longer has the CPU ShareMemCommBuilder this worker turns off: update "
                           "no_shm_kernel for the installed DeepSpeed")  # fmt: skip
    compatible[builder.NAME] = False

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"DeepSpeed tried to build {self.NAME} although marked incompatible: update no_shm_kernel")

    type(builder).load = refuse


def pushes(out_dir: str, model_dir: str, technique: str) -> None:
    from conftest import FakeVLLM  # this folder is the script's: on sys.path

    from posttrain.algorithms import load_config
    from posttrain.rollout.vllm_engine import VLLMEngine
    from posttrain.train import _accelerator, _before_deepspeed
    from posttrain.trainer.optim import build_optimizer

    cfg = load_config(None, [f"model.name={model_dir}", "data.train=unused.jsonl", "run.output_dir=unused"])
    model = build(model_dir, technique)
    fake = FakeVLLM(model_dir)  # vLLM's whole copy of the model
    accelerator = _accelerator(cfg)  # one per model: `backward` steps the DeepSpeed engine it prepared last
    optimizer = build_optimizer(model, cfg.optim.model_copy(update={"lr": LR, "warmup_steps": 0}))
    _before_deepspeed(accelerator, model, optimizer, 2, 1.0)
    engine_model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    engine = VLLMEngine(None)
    engine.backend = fake  # built by the engine at its first rollout, which this skips
    synced = [engine.sync(model)]
    for _ in range(STEPS):
        loss = engine_model(**batch(slice(2 * rank, 2 * rank + 2))).loss
        accelerator.backward(loss)  # DeepSpeed steps here (one micro-batch: the step's end)
        optimizer.step()
        optimizer.zero_grad()
        synced.append(engine.sync(model))
    synced.append(engine.sync(model))  # nothing trained since: no push
    local, total = elements(model)
    zero3 = all(hasattr(p, "ds_id") for p in model.parameters())
    torch.save({"local": local, "total": total, "zero3": zero3, "synced": synced, "pushes": fake.pushed,
                "calls": fake.calls}, f"{out_dir}/push-{technique}-rank{rank}.pt")  # fmt: skip


def elements(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model): ZeRO-3 keeps each process's
    partition in `ds_tensor` and the whole size in `ds_numel`."""
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in params)
    return local, sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in params)


class RolloutSeededEngine:
    """`PromptSeededEngine` (each prompt's group seeded by the prompt and the rollout's number) taking the rollout's
    number from the seed the batch source passes (`rollout.source`: run.seed * 7_919 + index; run.seed is 0 in these
    runs), not from a count of its own calls, which restarts at 0 in a resumed run: a run resumed at
    rollout k on any number of processes samples what the uninterrupted run sampled there."""

    def __init__(self) -> None:
        from fsdp_worker import PromptSeededEngine

        self.engine = PromptSeededEngine()

    def generate(self, model, tokenizer, prompt_ids, *, seed, **kwargs):
        self.engine.rollouts = seed  # (the run's seed and the rollout's number: the same on every process)
        return self.engine.generate(model, tokenizer, prompt_ids, seed=seed, **kwargs)


def wrote_by(run_dir) -> int:
    """The number of processes that wrote run `run_dir`'s checkpoints."""
    from pathlib import Path

    from posttrain.trainer.checkpoint import written_by

    return written_by(Path(run_dir) / "checkpoints" / "step-000001")


def run(out_dir: str, path: str, odd: bool = False) -> None:
    """`odd`: the last process's first sample of the second rollout fails to render for a trained reward model
    (`RewardModelScorer.render` raises), as an odd completion would."""
    from pathlib import Path

    from fsdp_worker import PromptSeededEngine

    import posttrain.rewards.builtin as builtin_rewards
    import posttrain.rollout.source as source_module
    from posttrain.algorithms import load_config
    from posttrain.models.reference import Reference
    from posttrain.rollout import engines
    from posttrain.train import train

    built, build_reference = [], Reference.build.__func__  # the reference the run builds, to see what it holds
    Reference.build = classmethod(lambda cls, *a, **kw: built.append(build_reference(cls, *a, **kw)) or built[-1])
    engines.ENGINES["hf"] = lambda c: PromptSeededEngine()
    rewards, score, Scorer = [], source_module.compute_rewards, builtin_rewards.RewardModelScorer
    scorers: list = []  # the reward models the run loads, to see what they hold
    last = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1

    def recorded(*args, **kwargs):  # each rollout's rewards, per function, and their failures
        result = score(*args, **kwargs)
        rewards.append({"per_function": result.per_function, "failures": result.failures})
        return result

    class RecordedScorer(Scorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scorers.append(self)
            self.calls = self.rendered = 0

        def __call__(self, *args, **kwargs):
            self.calls, self.rendered = self.calls + 1, 0
            return super().__call__(*args, **kwargs)

        def render(self, *args, **kwargs):
            self.rendered += 1
            if odd and last and self.calls == 2 and self.rendered == 1:
                raise ValueError("this completion cannot be rendered")
            return super().render(*args, **kwargs)

    source_module.compute_rewards, builtin_rewards.RewardModelScorer = recorded, RecordedScorer
    try:
        model = train(load_config(path), return_model=True).model
    finally:
        Reference.build = classmethod(build_reference)
        source_module.compute_rewards, builtin_rewards.RewardModelScorer = score, Scorer
    weights = gathered(model)
    ref = built[-1]
    reference = (*elements(ref.model), all(hasattr(p, "ds_id") for p in ref.model.parameters())) \
        if ref.mode == "copy" else None  # fmt: skip
    rm = (*elements(scorers[-1].model), all(hasattr(p, "ds_id") for p in scorers[-1].model.parameters())) \
        if scorers else None  # fmt: skip
    torch.save({"elements": elements(model), "weights": weights, "reference": reference, "reward_model": rm,
                "rewards": rewards}, f"{out_dir}/{Path(path).stem}-rank{torch.distributed.get_rank()}.pt")  # fmt: skip


def resumed(out_dir: str, path: str) -> None:
    from pathlib import Path

    from posttrain.algorithms import load_config
    from posttrain.train import train

    run_dir = f"{Path(path).with_suffix('')}-resumed"
    cfg = load_config(path, ["run.save_every=1", "run.keep_checkpoints=5", f"run.output_dir={run_dir}"])
    with Recording() as straight:
        train(cfg)
    cut_back(run_dir, 2)  # killed after step 2: its later checkpoint and final/ never written
    with Recording() as again:
        model = train(cfg, resume=True, return_model=True).model
    torch.save({"weights": gathered(model), "saved": straight.saved, "loaded": again.loaded},
               f"{out_dir}/{Path(path).stem}-resumed-rank{os.environ['RANK']}.pt")  # fmt: skip


def engine_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Each trained weight's whole fp32 value and AdamW moments as DeepSpeed's engine holds them (its own API; a
    collective under ZeRO: every process calls it), keyed by name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # ZeRO-1/2 link each weight to its AdamW state once, at their first step (0.19.8: stage_1_and_2.py,
    # `_lazy_init_hp_params_optimizer_state`), after stepping the first parameter group only, so the others' weights
    # are linked to no state; and an engine that just loaded a checkpoint has not stepped. Linked again here
    # (linking is all it does; ZeRO-3 needs none).
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    return {n: {"fp32": safe_get_full_fp32_param(p).clone(), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
            for n, p in engine.module.named_parameters() if p.requires_grad}  # fmt: skip


def gathered(model) -> dict[str, torch.Tensor]:
    """The whole weights, gathered with DeepSpeed's own API (not posttrain's, which final/ is checked against)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recording:
    """posttrain's checkpoint save and load, wrapped to record the engine's state at each checkpoint (`saved`, by
    step) and right after a resume loaded it (`loaded`)."""

    def __init__(self) -> None:
        self.saved: dict[int, dict] = {}
        self.loaded: dict | None = None

    def __enter__(self):
        import posttrain.train
        import posttrain.trainer.loop

        self.real = posttrain.trainer.loop.save_checkpoint, posttrain.train.load_checkpoint
        real_save, real_load = self.real

        def save(accelerator, run_dir, step, model, *args, **kwargs):
            self.saved[step] = engine_state(model)
            return real_save(accelerator, run_dir, step, model, *args, **kwargs)

        def load(accelerator, path, model, *args, **kwargs):
            step = real_load(accelerator, path, model, *args, **kwargs)
            self.loaded = engine_state(model)
            return step

        posttrain.trainer.loop.save_checkpoint, posttrain.train.load_checkpoint = save, load
        return self

    def __exit__(self, *exc) -> None:
        import posttrain.train
        import posttrain.trainer.loop

        posttrain.trainer.loop.save_checkpoint, posttrain.train.load_checkpoint = self.real


def cut_back(run_dir, step: int) -> None:
    """The run folder as a run killed after checkpoint `step` leaves it (the main process; the others wait)."""
    import shutil
    from pathlib import Path

    if int(os.environ["RANK"]) == 0:
        for later in [Path(run_dir) / "final", *sorted((Path(run_dir) / "checkpoints").glob("step-*"))[step:]]:
            shutil.rmtree(later)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def base(out_dir: str, path: str) -> None:
    from pathlib import Path

    from posttrain.algorithms import load_config
    from posttrain.rollout import engines
    from posttrain.train import train

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])  # before any process group
    name = f"{Path(path).stem}-base-{world}p"
    cfg = load_config(path, ["run.save_every=1", "run.keep_checkpoints=5",
                             f"run.output_dir={Path(path).with_suffix('')}-base-{world}p"])  # fmt: skip
    engines.ENGINES["hf"] = lambda c: RolloutSeededEngine()
    with Recording() as recording:
        train(cfg)
    torch.save({"saved": recording.saved}, f"{out_dir}/{name}-rank{rank}.pt")


def reshard(out_dir: str, path: str, run_dir: str) -> None:
    import shutil
    from pathlib import Path

    from posttrain.algorithms import load_config
    from posttrain.rollout import engines
    from posttrain.train import train

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])  # before any process group
    copy = Path(path).with_name(f"{Path(path).stem}-from-{wrote_by(run_dir)}p-on-{world}p")
    if rank == 0:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy)
    cfg = load_config(path, ["run.save_every=1", "run.keep_checkpoints=5", f"run.output_dir={copy}"])
    cut_back(copy, cfg.run.max_steps - 1)
    engines.ENGINES["hf"] = lambda c: RolloutSeededEngine()
    with Recording() as recording:
        model = train(cfg, resume=True, return_model=True).model
    torch.save({"loaded": recording.loaded, "weights": gathered(model)}, f"{out_dir}/{copy.name}-rank{rank}.pt")


class InfGrad(torch.autograd.Function):
    """0 forward, an infinite gradient backward: a diverged gradient under a finite loss."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.full_like(x, float("inf"))


def diverge(out_dir: str, path: str, mode: str) -> None:
    import dataclasses
    from pathlib import Path

    from posttrain.algorithms import ALGORITHMS, load_config, sft
    from posttrain.errors import TrainingDiverged
    from posttrain.train import train

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])  # before any process group
    name = f"{Path(path).stem}-diverge-{mode}-{world}p"
    cfg = load_config(path, [f"run.output_dir={Path(path).with_name(name)}"])
    per_step = cfg.optim.batch_size // (cfg.optim.micro_batch_size * world)  # this process's micro-batches a step
    calls = [0]

    def diverging(model, batch, cfg):
        loss, metrics = sft.loss_fn(model, batch, cfg)
        calls[0] += 1
        if calls[0] == 3 * per_step and rank == world - 1:  # step 3's last micro-batch, on one process only
            if mode == "loss":
                loss = loss + float("nan")
            else:
                loss = loss + InfGrad.apply(next(p for p in model.parameters() if p.requires_grad))
        return loss, metrics

    ALGORITHMS["sft"] = dataclasses.replace(sft.ALGORITHM, loss_fn=diverging)
    try:
        train(cfg)
        message = "finished"
    except TrainingDiverged as err:
        message = str(err)
    finally:
        ALGORITHMS["sft"] = sft.ALGORITHM
    torch.save({"message": message}, f"{out_dir}/{name}-rank{rank}.pt")


def main(out_dir: str, *jobs: str) -> None:
    """Each job in turn; one that raises (on every process alike: its collectives fail together) is recorded as
    `{"error": ...}` in its file, for the test to show, and the next job runs."""
    from pathlib import Path

    no_shm_kernel()
    world = int(os.environ["WORLD_SIZE"])
    for job in jobs:
        kind, _, rest = job.partition(":") if job.split(":", 1)[0] in JOBS else ("run", "", job)
        try:
            if kind == "push":
                _, model_dir, technique = job.rsplit(":", 2)
                name = f"push-{technique}"
                pushes(out_dir, model_dir, technique)
            else:
                path, *args = rest.split(":")
                suffix = {"run": "", "odd": "", "resume": "-resumed", "base": f"-base-{world}p",
                          "reshard": f"-from-{wrote_by(args[0]) if kind == 'reshard' else 0}p-on-{world}p",
                          "diverge": f"-diverge-{''.join(args)}-{world}p"}  # fmt: skip
                name = Path(path).stem + suffix[kind]
                JOBS[kind](out_dir, path, *args)
        except Exception as err:  # noqa: BLE001 - recorded for the test to show
            traceback.print_exc()  # in the launch's stderr, which the test shows when the launch fails
            torch.save({"error": f"{type(err).__name__}: {err}"}, f"{out_dir}/{name}-rank{os.environ['RANK']}.pt")


JOBS = {"run": run, "odd": lambda out_dir, path: run(out_dir, path, odd=True), "resume": resumed, "push": pushes, "base": base, "reshard": reshard, "diverge": diverge}


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed finds the CPU without it, with a warning
    main(*sys.argv[1:])
