"""Run by test_deepspeed.py under `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` (2 CPU
processes: DeepSpeed's CPU accelerator, gloo). For each technique given (full, lora): the tiny model built as
`build` builds it, prepared through posttrain's own Accelerator set-up (`train._accelerator`, `_before_deepspeed`),
trained `STEPS` steps on `batch`'s rows (this process's half), with a vLLM engine whose backend is `FakeVLLM`
(conftest.py) synced before the first step, after each step, and once more with nothing changed; saves what this
process held (parameter elements) and what was pushed."""

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


def main(out_dir: str, model_dir: str, *techniques: str) -> None:
    import deepspeed

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce kernel (C++, minutes on 2 cores) when its
    # communication starts, unless it is marked unusable; ZeRO's collectives go through torch.distributed (gloo).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from conftest import FakeVLLM  # this folder is the script's: on sys.path

    from posttrain.algorithms import load_config
    from posttrain.rollout.vllm_engine import VLLMEngine
    from posttrain.train import _accelerator, _before_deepspeed
    from posttrain.trainer.optim import build_optimizer

    cfg = load_config(None, [f"model.name={model_dir}", "data.train=unused.jsonl", "run.output_dir=unused"])
    # Built before the Accelerator: Accelerate's DeepSpeed set-up makes transformers load ZeRO-3 models already
    # partitioned, and these (and the fake vLLM's copies) must start whole (and seeded) as in one process.
    models = {technique: build(model_dir, technique) for technique in techniques}
    fakes = {technique: FakeVLLM(model_dir) for technique in techniques}  # vLLM's whole copy of the model
    for technique, model in models.items():
        accelerator = _accelerator(cfg)  # one per model: `backward` steps the DeepSpeed engine it prepared last
        optimizer = build_optimizer(model, cfg.optim.model_copy(update={"lr": LR, "warmup_steps": 0}))
        _before_deepspeed(accelerator, model, optimizer, micro=2)
        engine_model, optimizer = accelerator.prepare(model, optimizer)
        rank = accelerator.process_index
        fake = fakes[technique]
        engine = VLLMEngine(None)
        engine.backend = fake  # built by the engine at its first rollout, which this skips
        synced = [engine.sync(model)]
        for _ in range(STEPS):
            loss = engine_model(**batch(slice(2 * rank, 2 * rank + 2))).loss
            accelerator.backward(loss)  # DeepSpeed steps here (gradient_accumulation_steps 1)
            optimizer.step()
            optimizer.zero_grad()
            synced.append(engine.sync(model))
        synced.append(engine.sync(model))  # nothing trained since: no push
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in model.parameters())
        total = sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in model.parameters())
        zero3 = all(hasattr(p, "ds_id") for p in model.parameters())
        torch.save({"local": local, "total": total, "zero3": zero3, "synced": synced, "pushes": fake.pushed,
                    "calls": fake.calls}, f"{out_dir}/{technique}-rank{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
