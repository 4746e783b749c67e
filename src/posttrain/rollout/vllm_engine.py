"""vLLM as the rollout engine (`algorithm.rollout.engine=vllm`; `pip install "posttrain[vllm]"` on a CUDA machine).

Colocated: vLLM runs inside each training process (`vllm.LLM`), on the same GPU, holding its own copy of the
policy's weights and a KV cache of `rollout.vllm_gpu_memory_utilization` of the GPU. With `rollout.vllm_sleep`
(default) it sleeps between rollouts (level 1: weights offloaded to CPU memory, KV cache freed: vLLM's sleep mode,
docs.vllm.ai "Sleep Mode"), so training gets the GPU back, and wakes its weights, then its KV cache, to sample.

Weights. Before sampling, the engine pushes the policy's current weights when any trainable parameter changed in
place since the last push (torch's per-tensor version counters, which every optimizer step bumps; the first
rollout always pushes, so a resumed run samples from its restored weights):
- full fine-tuning: every trainable weight, under its Hugging Face name;
- LoRA: the merged weight W + (alpha/r) B A of each adapted layer (peft's `get_delta_weight`), computed beside the
  model, which is never merged in place (`policy_weights` says why); vLLM's copy of the other weights stays.
After a push vLLM's prefix cache is reset: cached prompt KV was computed with the old weights.

Log-probs. The LLM is built with `logprobs_mode="processed_logprobs"`, so the log-prob vLLM returns for each
sampled token is under the distribution it sampled from (after temperature), as `HFEngine`'s are; GRPO, RLOO and
PPO compare them with the trainer's every step and log the gap (`logp_gap_sampler_trainer`), and can correct for
it with truncated importance sampling (`rollout.tis_cap`; docs/rl.md).

Server mode (`rollout.vllm_server`, `engine=vllm-server`) is this engine over another `Backend`: an HTTP client
of a `posttrain vllm-serve` process, which holds a `ColocatedVLLM` of its own.

What is tested where: the weight-sync logic and the data flow are tested on CPU with a fake backend that has
this module's `Backend` interface (tests/integration/test_vllm_engine.py, test_vllm_server.py). The `ColocatedVLLM`
backend itself (the calls into vLLM) is designed for vLLM's public API but has not run on a GPU yet (README
"Scale"). Sharded policies: each process gathers the whole weights it pushes (`policy_weights`). FSDP2
(`run.sharding=fsdp2`): tested with the fake backend under torchrun (tests/integration/test_sharding.py; full,
LoRA and QLoRA). DeepSpeed
ZeRO-3 (Accelerate's deepspeed_zero3.yaml): gathered module by module with DeepSpeed's `GatheredParameters`; tested
with a stand-in for DeepSpeed (test_vllm_engine.py) and, where deepspeed is installed, with DeepSpeed itself on 2
CPU processes under `accelerate launch` (test_deepspeed.py: the pushes equal one process's, full, LoRA and
QLoRA). DeepSpeed
writes each step's weights through `.data`, which moves no version counter: `train._before_deepspeed` bumps them
after each step, so that a push follows every step (ZeRO-2 too).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator
from typing import Protocol

import torch

from posttrain.algorithms.base import Rollout
from posttrain.models.adapters import is_adapter_model
from posttrain.models.generation import eos_token_ids
from posttrain.models.sharding import gathered, is_partitioned, whole
from posttrain.rollout.engine import build_rollout, left_pad

Weights = list[tuple[str, torch.Tensor]]


class Backend(Protocol):
    """What the engine needs from vLLM: `ColocatedVLLM` wraps `vllm.LLM`; tests use a fake with these methods."""

    def load_weights(self, weights: Weights) -> None: ...
    def reset_prefix_cache(self) -> None: ...
    def sleep(self) -> None: ...
    def wake_up(self, tags: list[str]) -> None: ...
    def sample(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               stop: list[str], stop_token_ids: list[int], seed: int,
               row_ids: list[int] | None = None) -> list[tuple[list[int], list[float]]]:
        """n samples per prompt, contiguous: (token ids, log-prob of each under the sampling distribution).
        `row_ids`: each row's place in the whole rollout (`rollout.source.rollout_row_ids`), for a backend that
        numbers its random streams so; vLLM draws from its own and does not read them."""  # fmt: skip


def weight_versions(model: torch.nn.Module) -> tuple[int, ...]:
    """The in-place version counter of every trainable parameter: it changes exactly when an optimizer step (or
    any in-place write) touches them."""
    return tuple(p._version for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[Weights]:
    """The weights vLLM must receive for `model`'s current state, under the base model's Hugging Face names.

    Full model: every trainable parameter. LoRA: each adapted layer's merged weight W + delta, delta from peft's
    `get_delta_weight` (B A scaled, for each active adapter). Not `merge_adapter` then `unmerge_adapter`: W + d - d
    is not W in floating point, so the frozen base would drift a rounding error every rollout. QLoRA: every 4-bit
    layer, adapted or not, dequantised (`_base_weight`), plus its delta where it has one.

    A sharded model, whose weights every process must gather whole (every process's vLLM holds the whole model;
    each gather is a collective every process runs in the same order):
    - FSDP2 (`run.sharding=fsdp2`, or Accelerate's FSDP2: DTensor parameters): each weight gathered whole
      (`models.sharding.whole`); a LoRA layer's W + delta is computed on the shards and gathered once;
    - DeepSpeed ZeRO-3 (parameters marked `ds_id`): module by module, each module's weights gathered with
      DeepSpeed's `GatheredParameters`, copied (full) or merged (LoRA: W, A and B gathered together), and
      partitioned again before the next module's, so that besides the weights to push a process holds one
      module's gathered weights at most.
    The weights to push are held until the push ends: about one model copy in the weights' dtype, on the training
    device."""
    zero3 = is_partitioned(model)
    weights: Weights = []
    if not is_adapter_model(model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # consecutive names with one prefix are one module's weights (`named_parameters` walks module by module)
        for _, group in itertools.groupby(named, key=lambda item: item[0].rpartition(".")[0]):
            group = list(group)
            with gathered([p for _, p in group]):
                # ZeRO-3's gathered weights are freed when the block ends: keep copies
                weights += [(n, p.detach().clone() if zero3 else whole(p.detach())) for n, p in group]
        yield weights
        return
    from peft.tuners.lora import LoraLayer  # peft loads when used, as everywhere in posttrain

    modules = list(model.get_base_model().named_modules())
    wrapped = {id(m.base_layer) for _, m in modules if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, module in modules:
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters or _is_4bit(module.base_layer):
                    with gathered(list(module.parameters())):
                        w = _base_weight(module.base_layer)
                        delta = sum(module.get_delta_weight(a).to(w.dtype) for a in adapters)  # 0 without any
                        # W + delta is a new tensor. Sharded (FSDP2): a full-precision W and its delta are summed
                        # on the shards and gathered once; a 4-bit W is dequantised whole (`_base_weight`), so its
                        # delta is gathered first (a whole tensor and a DTensor do not add)
                        merged = w + whole(delta) if _is_4bit(module.base_layer) else whole(w + delta)
                    weights.append((f"{name}.weight", merged))
            elif _is_4bit(module) and id(module) not in wrapped:  # QLoRA: a quantised layer without an adapter
                with gathered(list(module.parameters())):
                    weights.append((f"{name}.weight", _base_weight(module)))
    yield weights


def _is_4bit(layer: torch.nn.Module) -> bool:
    """Whether `layer` is a bitsandbytes 4-bit linear layer (QLoRA's frozen base)."""
    bnb = sys.modules.get("bitsandbytes")  # only a run that imported bitsandbytes can hold its layers
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def _base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A frozen base layer's weight as vLLM's unquantised copy of the base model takes it: as it is, or, for a
    QLoRA 4-bit layer, dequantised (bitsandbytes' own `dequantize_4bit`) to the values its forward multiplies by.
    Every 4-bit layer is pushed so, adapted or not, so that vLLM samples from the weights the trainer scores with,
    not from the full-precision base the 4-bit codes approximate. A sharded (FSDP2) layer's 4-bit codes are gathered
    first (its quantisation state is whole on every process); a ZeRO-3 layer's are whole inside the caller's
    `gathered` block (DeepSpeed partitions the codes; the quantisation state stays on the layer)."""
    if not _is_4bit(layer):
        return layer.weight
    import bitsandbytes.functional as bnbf

    codes = whole(layer.weight.detach())
    state = getattr(layer.weight, "quant_state", None) or layer.quant_state  # FSDP2 keeps it on the module
    return bnbf.dequantize_4bit(codes, state)


class ColocatedVLLM:
    """`vllm.LLM` in this process: the training process (colocated), or the server's (`posttrain vllm-serve`,
    built with `sleep=False`). Designed for vLLM's public API; not yet run on a GPU (module docstring)."""

    def __init__(self, model_path: str, *, gpu_memory_utilization: float, sleep: bool, seed: int,
                 max_model_len: int | None = None) -> None:  # fmt: skip
        from vllm import LLM  # optional dependency: imported only when the engine is chosen

        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                       logprobs_mode="processed_logprobs", seed=seed, max_model_len=max_model_len,
                       enable_prefix_caching=True)  # fmt: skip

    def load_weights(self, weights: Weights) -> None:
        # Runs the model's own `load_weights` (the HF-name -> vLLM-layout mapping, e.g. fused qkv) in the worker.
        self.llm.apply_model(lambda model: model.load_weights(weights=weights))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def sample(self, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop, stop_token_ids, seed, row_ids=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, stop=stop,
                                stop_token_ids=stop_token_ids, include_stop_str_in_output=True, logprobs=0,
                                seed=seed)  # fmt: skip
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
                for out in outputs for c in out.outputs]  # fmt: skip


class VLLMEngine:
    """The `Engine` interface over a vLLM `Backend` (module docstring), colocated or a server's client
    (`vllm_server.server_engine`). `backend` builds it from the policy at the first rollout; `sleep`: put vLLM to
    sleep between rollouts."""

    name = "vllm"

    def __init__(self, backend, *, sleep: bool = True) -> None:
        self.make_backend, self.sleeps = backend, sleep
        self.backend: Backend | None = None
        self.pushed: tuple[int, ...] | None = None  # weight versions at the last push
        self.pushes = 0

    def sync(self, model: torch.nn.Module) -> bool:
        """Push `model`'s weights if they changed since the last push; returns whether it pushed."""
        versions = weight_versions(model)
        if versions == self.pushed:
            return False
        with policy_weights(model) as weights:
            self.backend.load_weights(weights)
        self.backend.reset_prefix_cache()  # cached prompt KV belongs to the old weights
        self.pushed, self.pushes = versions, self.pushes + 1
        return True

    def generate(self, model, tokenizer, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop, seed,
                 batch_size=None, row_ids=None) -> Rollout:  # fmt: skip
        """As `HFEngine.generate`; vLLM batches by itself, so `batch_size` is not used. `row_ids` go to the backend,
        which real vLLM does not read (it draws from its own random streams, so its samples depend on the number of
        processes: docs/scale.md)."""
        if self.backend is None:
            self.backend = self.make_backend(model)
        eos = eos_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        if self.sleeps:
            self.backend.wake_up(["weights"])  # weights first: the push writes into them
        self.sync(model)
        if self.sleeps:
            self.backend.wake_up(["kv_cache"])
        try:
            samples = self.backend.sample([list(p) for p in prompt_ids], n=n, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, stop=list(stop), stop_token_ids=eos,
                                          seed=seed, row_ids=row_ids)  # fmt: skip
        finally:
            if self.sleeps:
                self.backend.sleep()
        prompt, pmask = left_pad([list(p) for p in prompt_ids for _ in range(n)], pad_id)
        C = max(1, max(len(ids) for ids, _ in samples))
        ids = torch.full((len(samples), C), pad_id, dtype=torch.long)
        sampled = torch.zeros((len(samples), C), dtype=torch.float32)
        for i, (tokens, logps) in enumerate(samples):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sampled[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32)
        return build_rollout(tokenizer, prompt, pmask, ids, sampled, eos=eos, stop=list(stop))

    @classmethod
    def from_config(cls, cfg) -> VLLMEngine:
        """The colocated engine a run config asks for: vLLM loads the policy's base model from its folder."""
        rc = cfg.algorithm.rollout

        def colocated(model) -> ColocatedVLLM:
            base = model.get_base_model() if is_adapter_model(model) else model
            return ColocatedVLLM(base.config._name_or_path, gpu_memory_utilization=rc.vllm_gpu_memory_utilization,
                                 sleep=rc.vllm_sleep, seed=cfg.run.seed)  # fmt: skip

        return cls(colocated, sleep=rc.vllm_sleep)
