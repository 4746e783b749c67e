"""Run by test_sharding.py under torchrun (2 CPU processes, gloo): train each config given in turn, then save what
this process held (parameter elements: of the whole model, of a scalar head, of a frozen-copy reference; under QLoRA
its 4-bit codes and quantisation state; of a trained reward model scoring RL rollouts) and the whole trained
weights, and, for RL, this process's samples' total rewards at each rollout (`reward_totals`).
`PATH@resume` continues PATH's run folder from its latest checkpoint; `PATH@from-K` copies PATH's finished run
folder to `<run folder>-from-K`, deletes what came after step K (later checkpoints, `final/`), as a run killed
after step K would have left it, and resumes it (the state each resumed run holds right after the load, whole, is
saved as `loaded`: its trainable weights and optimizer state); `PATH@seeded` samples with `PromptSeededEngine`. A config with `algorithm.rollout.engine=vllm` samples through `FakeVLLM` (conftest.py) in
vLLM's place, one per process as colocated vLLM would be, and its weight pushes and calls are saved too, with
the push the trained model would make next (`final`)."""

import importlib
import sys
import zlib

import torch

from posttrain.algorithms.base import Rollout
from posttrain.rollout.engine import HFEngine


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """One `Rollout` of several, prompts left-padded and completions right-padded to the longest."""
    from torch.nn.functional import pad

    P = max(r.prompt_ids.shape[1] for r in parts)
    C = max(r.completion_ids.shape[1] for r in parts)

    def cat(field: str, width: int, value, left: bool) -> torch.Tensor:
        ts = [getattr(r, field) for r in parts]
        return torch.cat([pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                          for t in ts])  # fmt: skip

    return Rollout(prompt_ids=cat("prompt_ids", P, pad_id, True), prompt_mask=cat("prompt_mask", P, 0, True),
                   completion_ids=cat("completion_ids", C, pad_id, False),
                   completion_mask=cat("completion_mask", C, 0, False),
                   sampling_logps=cat("sampling_logps", C, 0.0, False), texts=[t for r in parts for t in r.texts],
                   truncated=torch.cat([r.truncated for r in parts]))  # fmt: skip


class PromptSeededEngine(HFEngine):
    """`HFEngine`, each prompt's group sampled by its own `generate` call, seeded by the prompt's ids and the rollout's
    number: the samples do not depend on how a rollout's prompts are split over processes (a run seeds each process
    on its own), so a sharded RL run can be compared with one process. Generation still runs on the (sharded)
    policy; every process has as many prompts, so as many `generate` calls."""

    def __init__(self) -> None:
        # through the adapters in every layout: a sharded policy cannot sample from merged weights (FSDP2, ZeRO-3),
        # and merged weights are the adapted model up to rounding, which could change a token
        super().__init__(merge_adapters=False)
        self.rollouts = 0

    def generate(self, model, tokenizer, prompt_ids, *, seed, row_ids=None, **kwargs) -> Rollout:
        parts = [super(PromptSeededEngine, self).generate(model, tokenizer, [p], **kwargs,
                                                          seed=zlib.crc32(bytes(str(p), "utf-8")) + 7_919 * self.rollouts)
                 for p in prompt_ids]  # fmt: skip
        self.rollouts += 1
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return _concat(parts, pad_id)


def _copied(tree: dict) -> dict:
    """`tree` (nested dicts) with every tensor in it cloned."""
    return {k: _copied(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in tree.items()}  # fmt: skip


def four_bit_held(model) -> dict | None:
    """What this process holds of `model`'s QLoRA 4-bit weights (None without any): the packed 4-bit code elements
    of its shards (`local`) and of the whole weights (`total`), and each bitsandbytes `Linear4bit`'s quantisation
    state as a state dict stores it (absmax, code book, double-quantisation state: `state`, copies)."""
    from bitsandbytes.nn import Linear4bit
    from torch.distributed.tensor import DTensor

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    local = sum((m.weight.to_local() if isinstance(m.weight, DTensor) else m.weight).numel() for _, m in layers)
    state = {f"{n}.{k}": v.clone() for n, m in layers for k, v in m.quant_state.as_dict(packed=True).items()}
    return {"local": local, "total": sum(m.weight.numel() for _, m in layers), "state": state}


def _killed_after(run_dir, k: int):
    """A copy of finished run folder `run_dir` as a run killed after step `k` would have left it (the main process
    copies; every process waits for it)."""
    import shutil
    from pathlib import Path

    from posttrain.trainer.checkpoint import list_checkpoints

    copy = Path(f"{run_dir}-from-{k}")
    if torch.distributed.get_rank() == 0:
        shutil.copytree(run_dir, copy)
        for ckpt in list_checkpoints(copy):
            if int(ckpt.name.removeprefix("step-")) > k:
                shutil.rmtree(ckpt)
        shutil.rmtree(copy / "final")
    torch.distributed.barrier()
    return copy


def main(out_dir: str, *config_paths: str) -> None:
    from pathlib import Path

    from conftest import FakeVLLM  # this folder is the script's: on sys.path

    from posttrain import config as config_module
    from posttrain.algorithms import load_config
    from posttrain.models.heads import ScalarHeadModel
    from posttrain.models.reference import Reference
    from posttrain.models.sharding import full_state, is_sharded, optimizer_state, parameter_elements
    from posttrain.rewards import builtin as builtin_rewards
    from posttrain.rollout import engines
    from posttrain.rollout import source as source_module
    from posttrain.rollout.vllm_engine import VLLMEngine, policy_weights
    from posttrain.train import train

    config_module.vllm_available = lambda: True  # vLLM's place is taken by FakeVLLM below
    hf = engines.ENGINES["hf"]
    built, build = [], Reference.build.__func__  # the reference each run builds, to see what it holds
    Reference.build = classmethod(lambda cls, *a, **kw: built.append(build(cls, *a, **kw)) or built[-1])
    totals: list[list[float]] = []  # this process's samples' rewards, rollout by rollout, as scored
    score = source_module.compute_rewards

    def recorded(*args, **kwargs):
        result = score(*args, **kwargs)
        totals.append(list(result.total))
        return result

    source_module.compute_rewards = recorded
    scorers: list = []  # the reward models each run loads (`reward_model`), to see what they hold

    class RecordedScorer(builtin_rewards.RewardModelScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scorers.append(self)

    builtin_rewards.RewardModelScorer = RecordedScorer
    loaded: dict = {}  # what the last resumed run held right after its load
    train_module = importlib.import_module("posttrain.train")  # the module (`posttrain.train` is also a function)
    load = train_module.load_checkpoint

    def load_and_record(accelerator, path, model, optimizer, *args, **kwargs):
        step = load(accelerator, path, model, optimizer, *args, **kwargs)
        unwrapped = accelerator.unwrap_model(model)  # sharded: gathered whole, by every process, to the main one
        # copied: what is not gathered (AdamW's step counts, plain tensors) is the live state, which training updates
        loaded.update(weights=_copied(full_state(unwrapped, trainable_only=True)),
                      optimizer=_copied(optimizer_state(unwrapped, optimizer)))  # fmt: skip
        return step

    train_module.load_checkpoint = load_and_record
    for arg in config_paths:
        path, _, mode = arg.partition("@")
        cfg = load_config(path)
        fakes: list[FakeVLLM] = []

        def fake_vllm(c, fakes=fakes):
            return VLLMEngine(lambda model: fakes.append(FakeVLLM(c.model.name)) or fakes[-1])

        engines.ENGINES["vllm"] = fake_vllm
        engines.ENGINES["hf"] = (lambda c: PromptSeededEngine()) if mode == "seeded" else hf
        totals.clear()
        loaded.clear()
        scorers.clear()
        if mode.startswith("from-"):
            copy = _killed_after(cfg.run.output_dir, int(mode.removeprefix("from-")))
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(copy)})})
        result = train(cfg, return_model=True, resume=mode == "resume" or mode.startswith("from-"))
        model = result.model
        rank = torch.distributed.get_rank()
        local, total = parameter_elements(model)
        four_bit = four_bit_held(model) if cfg.technique.name == "qlora" else None
        if is_sharded(model):
            weights = full_state(model)  # every process calls it; the main process gets the tensors
        else:
            weights = {n: p.detach().cpu() for n, p in model.named_parameters()}
        head = parameter_elements(model.head) if isinstance(model, ScalarHeadModel) else None
        ref = built[-1]
        reference = (ref.mode, *parameter_elements(ref.model), is_sharded(ref.model)) if ref.mode == "copy" else None
        rm = (*parameter_elements(scorers[-1].model), is_sharded(scorers[-1].model)) if scorers else None
        vllm = None
        if fakes:
            with policy_weights(model) as final:  # what the trained model's next push would be (a collective)
                vllm = {"pushes": fakes[0].pushed, "calls": fakes[0].calls, "final": {n: t.clone() for n, t in final}}
        torch.save({"local": local, "total": total, "sharded": is_sharded(model), "head": head, "weights": weights,
                    "vllm": vllm, "reference": reference, "reward_model": rm, "reward_totals": list(totals), "loaded": dict(loaded) or None, "four_bit": four_bit}, f"{out_dir}/{Path(path).stem}{'-' + mode if mode else ''}-rank{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
