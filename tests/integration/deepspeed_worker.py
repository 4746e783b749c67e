"""Run by test_deepspeed.py under `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml` (2
CPU processes: DeepSpeed's CPU accelerator, gloo). Each argument is one job, run in turn:

- `PATH.yaml`: `posttrain train` of that run config (RL sampled with `PromptSeededEngine`, fsdp_worker.py: the
  same samples however the prompts are split over processes, so the run compares with one process); saves what
  this process held (parameter elements of the model and of a frozen-copy reference) and the whole trained
  weights (ZeRO-3's partitions gathered).
- `resume:PATH.yaml`: that run with a checkpoint every step, cut back to its checkpoint of step 2 (the later
  checkpoint and `final/` removed, as a run killed after step 2 leaves it), then resumed (`--resume`); saves the
  whole trained weights as `NAME-resumed-rankR.pt`.
- `push:MODEL_DIR:TECHNIQUE` (full, lora, qlora): the tiny model built as `build` builds it, prepared through
  posttrain's own Accelerator set-up (`train._accelerator`, `_before_deepspeed`), trained `STEPS` steps on
  `batch`'s rows (this process's half), with a vLLM engine whose backend is `FakeVLLM` (conftest.py) synced
  before the first step, after each step, and once more with nothing changed; saves what this process held and
  what was pushed.

DeepSpeed's CPU communication would compile a shared-memory all-reduce kernel (C++, minutes on 2 cores) when it
starts; `no_shm_kernel` marks it unusable (ZeRO's collectives go through torch.distributed, gloo) and makes any
attempt to build it fail at once, so that a DeepSpeed release that changes how it is chosen fails this test loudly
instead of compiling for minutes."""

import os
import sys

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


def run(out_dir: str, path: str) -> None:
    from pathlib import Path

    import deepspeed
    from fsdp_worker import PromptSeededEngine

    from posttrain.algorithms import load_config
    from posttrain.models.reference import Reference
    from posttrain.rollout import engines
    from posttrain.train import train

    built, build_reference = [], Reference.build.__func__  # the reference the run builds, to see what it holds
    Reference.build = classmethod(lambda cls, *a, **kw: built.append(build_reference(cls, *a, **kw)) or built[-1])
    engines.ENGINES["hf"] = lambda c: PromptSeededEngine()
    try:
        model = train(load_config(path), return_model=True).model
    finally:
        Reference.build = classmethod(build_reference)
    # the whole weights, gathered with DeepSpeed's own API (not posttrain's, which final/ is checked against)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = built[-1]
    reference = (*elements(ref.model), all(hasattr(p, "ds_id") for p in ref.model.parameters())) \
        if ref.mode == "copy" else None  # fmt: skip
    torch.save({"elements": elements(model), "weights": weights, "reference": reference},
               f"{out_dir}/{Path(path).stem}-rank{torch.distributed.get_rank()}.pt")  # fmt: skip


def resumed(out_dir: str, path: str) -> None:
    import shutil
    from pathlib import Path

    import deepspeed

    from posttrain.algorithms import load_config
    from posttrain.train import train

    run_dir = f"{Path(path).with_suffix('')}-resumed"
    cfg = load_config(path, ["run.save_every=1", "run.keep_checkpoints=5", f"run.output_dir={run_dir}"])
    train(cfg)
    if torch.distributed.get_rank() == 0:  # killed after step 2: its later checkpoint and final/ never written
        for later in [Path(run_dir) / "final", *sorted((Path(run_dir) / "checkpoints").glob("step-*"))[2:]]:
            shutil.rmtree(later)
    torch.distributed.barrier()
    model = train(cfg, resume=True, return_model=True).model
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"weights": weights}, f"{out_dir}/{Path(path).stem}-resumed-rank{torch.distributed.get_rank()}.pt")


def main(out_dir: str, *jobs: str) -> None:
    """Each job in turn; one that raises (on every process alike: its collectives fail together) is recorded as
    `{"error": ...}` in its file, for the test to show, and the next job runs."""
    from pathlib import Path

    no_shm_kernel()
    for job in jobs:
        try:
            if job.startswith("push:"):
                _, model_dir, technique = job.rsplit(":", 2)
                name = f"push-{technique}"
                pushes(out_dir, model_dir, technique)
            elif job.startswith("resume:"):
                name = f"{Path(job[len('resume:'):]).stem}-resumed"
                resumed(out_dir, job[len("resume:"):])
            else:
                name = Path(job).stem
                run(out_dir, job)
        except Exception as err:  # noqa: BLE001 - recorded for the test to show
            torch.save({"error": f"{type(err).__name__}: {err}"}, f"{out_dir}/{name}-rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed finds the CPU without it, with a warning
    main(*sys.argv[1:])
