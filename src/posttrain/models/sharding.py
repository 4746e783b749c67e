"""Fully sharded models (FSDP2): each of N processes holds 1/N of every parameter, its gradient and optimizer state.

`run.sharding=fsdp2` shards the trained model (the policy, a reward model, PPO's policy with its value head), a
frozen `copy` reference and a trained reward model scoring RL rollouts with torch's own `fully_shard`
(torch.distributed.fsdp, "FSDP2"): each decoder layer is one unit, all-gathered just before its forward and
backward and freed after (the causal LM's embeddings, norm and output layer, and a scalar head, are units too:
`shard`), and its gradients are reduce-scattered, averaged over
processes as DDP averages them (so `algorithms.common.normalise_loss` holds unchanged). Parameters become DTensors
whose local part is this process's shard. It runs on GPUs (NCCL) and on CPUs (gloo), which is how the tests
prove it: Accelerate does not shard on CPU, so this path is launched with `torchrun --nproc_per_node N` instead of
`accelerate launch`.

QLoRA's 4-bit base weights are sharded like any other weight, with nothing added here: a bitsandbytes `Params4bit`
is a parameter whose data are the packed 4-bit codes (uint8, two per byte, shape (n/2, 1)), cut along dim 0 like
any parameter. A unit holding parameters of several dtypes (uint8 codes, float norms and adapters) is all-gathered
as bytes (torch 2.13 `fsdp/_fully_shard/_fsdp_collectives.py`); only the gradients reduce-scattered in one unit
must share a dtype, and the frozen 4-bit weights have none. The quantisation state (block absmax, code book,
double-quantisation state) is an attribute of each `Linear4bit`, not a parameter, so every process keeps it whole;
FSDP2 puts the gathered codes back as a plain parameter, which `Linear4bit.forward` re-attaches to that state
(bitsandbytes 0.50.2 `fix_4bit_weight_quant_state_from_module`). FSDP1 needed the codes stored in a float dtype
(`bnb_4bit_quant_storage`) because it flattens a unit into one tensor of one dtype (Answer.AI's FSDP-QLoRA); FSDP2
does not flatten. The default uint8 storage is also the safer one: an FSDP2 mixed-precision policy (none is given
here) casts every floating-point parameter to its `param_dtype`, float-stored codes included, and leaves others.

Whole weights are needed in three places only, each a collective (every process calls it): the final model
(`full_state`, gathered to the main process), checkpoints of the whole layout (`run.whole_checkpoints`; resumed
with `load_full_state`), through torch.distributed.checkpoint's state-dict API; and a vLLM engine's weight push
before a rollout, each pushed weight gathered on every process, whose vLLM holds the whole model (`whole`;
`rollout.vllm_engine.policy_weights`). Checkpoints of the sharded layout (the default) are never gathered: each
process writes and reads back its own shards with torch.distributed.checkpoint (`save_shards`, `load_shards`);
`load_shards` reads them into any number of processes (DCP reshards on load) and into an unsharded model;
`read_shards` reads the weights whole in one process (scoring a checkpoint).
Generation on the sharded model needs no gathering: `synced_forward` tells `generate` to keep every process stepping
until all are done, since each forward of a sharded layer is a collective.

Under DeepSpeed ZeRO-3 the trained model is partitioned by Accelerate's `prepare`; a frozen model (a `copy`
reference, a trained reward model scoring rollouts) by an inference engine of its own (`zero3_inference`).

This module does not launch processes, build optimizers or decide when to shard (`posttrain.train` does; for a
reward model scoring rollouts, `rollout.source`).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def _dtensor():
    from torch.distributed.tensor import (
        DTensor,  # torch.distributed is absent from some builds: import on use
    )

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (sharded by `shard`, or by Accelerate's FSDP2)."""
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in model.parameters())


def is_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned `model`'s weights (it marks each with `ds_id`): each process holds a
    partition, and DeepSpeed's hooks gather a module's weights around its forward (and backward)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathers_in_forward(model: nn.Module) -> bool:
    """Whether `model`'s forward gathers its weights (a collective): sharded by FSDP2 or partitioned by ZeRO-3.
    Such a model's output layer is whole only inside the model's own forward, and every process must run as many
    forwards."""
    return is_sharded(model) or is_partitioned(model)


def synced_forward(model: nn.Module) -> bool:
    """Whether `generate` must keep this process stepping until every process has finished (`synced_gpus`): true
    for a sharded (FSDP2) or partitioned (ZeRO-3) model in a multi-process run, where every forward all-gathers
    each layer's weights. (transformers would guess it for ZeRO-3 from DeepSpeed's config registered with it,
    which posttrain clears: `train._accelerator`.)"""
    multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return multi and gathers_in_forward(model)


def shard(model: nn.Module, *, forward_only: bool = False) -> nn.Module:
    """Shard `model` in place over every process of the default process group (FSDP2's `fully_shard`). Units:
    one per block the model declares unsplittable (`_no_split_modules`: its decoder layers); one per causal LM,
    holding the rest of it (embeddings, final norm, output layer); one per other module holding parameters
    outside these (a scalar head: `models.heads.ScalarHeadModel`). Returns `model`.

    The causal LM, not an outer wrapper (peft's `PeftModel`, a scalar-head model), is the unit that holds the
    embeddings and the output layer, because FSDP2 gathers a unit's weights only around that module's own
    forward: generation (`generate` calls the causal LM's forward, under peft too) and PPO's policy both run
    it, whatever wraps it. A scalar head is its own unit for the same reason (it runs outside the LM's forward),
    and so that its float32 weights never share a unit with a bfloat16 model's (FSDP2 reduce-scatters one
    gradient dtype per unit). Each unit is the root of its own tree: the LM's, then the head's, each in one
    forward per call.

    `forward_only`: a frozen model that never runs a backward (a `copy` reference). Every unit, the root too, then
    frees its gathered weights after each forward (`reshard_after_forward=True`, given explicitly): left to its
    default, FSDP2 keeps the root unit's weights gathered after a forward for the backward that follows, which a
    frozen model never runs, so each process kept the whole embeddings and output layer from the reference's first
    forward on (measured on the tiny model: 70,208 of its 107,200 elements per process instead of ~53,600)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import PreTrainedModel

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    managed: set[int] = set()

    def unit(module: nn.Module) -> None:
        fully_shard(module, mesh=mesh, **({"reshard_after_forward": True} if forward_only else {}))
        managed.update(id(p) for p in module.parameters())

    blocks = set()
    for module in model.modules():
        blocks.update(getattr(module, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            unit(module)
    for module in list(model.modules()):  # outermost first: a causal LM's own decoder is no causal LM
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None \
                and not all(id(p) in managed for p in module.parameters()):  # fmt: skip
            unit(module)
    for module in list(model.modules()):
        if any(id(p) not in managed for p in module.parameters(recurse=False)):
            unit(module)
    return model


def zero3_inference(model: nn.Module, config: dict, micro: int, processes: int) -> nn.Module:
    """A frozen model (DPO's or PPO's frozen-copy reference, a trained reward model scoring rollouts)
    partitioned by DeepSpeed ZeRO-3, in an engine of its own with no optimizer, in eval mode: each process
    holds a partition of every weight, and DeepSpeed's hooks gather each module's weights around its forward.
    `config`: the policy's DeepSpeed config (precision, ZeRO-3 settings; copied, its optimizer and scheduler
    left out), as TRL prepares its reference model; `micro` rows per process and `processes` only make
    DeepSpeed's batch settings consistent (an inference engine never steps). Returns the engine, whose
    forwards are collectives: every process must run as many (`RunSection.collective_forwards`).
    """
    import deepspeed  # optional: only a DeepSpeed launch gets here

    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro * processes,
                  gradient_accumulation_steps=1)  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole on every process: a sharded one (DTensor) all-gathered, a collective every process must
    call in the same order; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, _dtensor()) else tensor


def parameter_elements(model: nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) over `model`'s parameters."""
    DTensor = _dtensor()
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def gathered(params: list[torch.Tensor]):
    """A block in which `params` are whole on this process: those DeepSpeed ZeRO-3 partitioned (`ds_id`) gathered by
    DeepSpeed's `GatheredParameters` (read only: partitioned again when the block ends; a collective, which every
    process enters for the same weights in the same order), the others as they are (whole weights are whole;
    FSDP2's DTensors are gathered by `whole`, on the tensors computed from them)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # optional: only a model DeepSpeed partitioned gets here

    return deepspeed.zero.GatheredParameters(partitioned)  # modifier_rank None: read only


def partitioned_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """`full_state` of a model DeepSpeed ZeRO-3 partitioned (`is_partitioned`): its state dict's whole tensors on
    the CPU of the main process, an empty dict on the others. Each partitioned weight is gathered on its own
    (DeepSpeed's `GatheredParameters`, read only: partitioned again when the block ends), so no process holds more
    than one whole weight besides what the main process keeps. A collective: every process calls it."""
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if trainable_only and name not in trainable:
            continue
        with gathered([t]):
            if main:
                state[name] = t.detach().cpu().clone()
    return state


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights (`trainable_only`: those that require a gradient), on the CPU of the main process; an
    empty dict on the others. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if trainable_only and state:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (a `full_state`, read by every process) into a sharded `model`; each process keeps its
    shard. Names missing from `tensors` keep their weights (frozen ones come back from the base model)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors, options=_options(strict=False))


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, on the main process's CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a whole optimizer state (read by every process) into the optimizer of a sharded `model`: an
    `optimizer_state`, or the `state_dict()` of an unsharded run's optimizer (`named_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, named_optimizer_state(model, optimizer, state), options=_options())


def named_optimizer_state(model: nn.Module, optimizer, state: dict) -> dict:
    """`state`, an optimizer's `state_dict()`, keyed by parameter name (torch.distributed's format, as
    `optimizer_state` writes it) instead of by position in `optimizer`'s parameter groups (torch's own format, as an
    unsharded run's checkpoint holds it); a state already keyed by name is returned as it is. `optimizer` is built as
    the one that wrote `state` was (`trainer.optim.build_optimizer`: the same groups, in the same order), over
    `model`'s parameters. torch.distributed's loader reads names only: positions would be taken for other keys."""
    if not all(isinstance(k, int) for g in state["param_groups"] for k in g["params"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def _shard_options(**kwargs):
    """The trained parameters only, each process's shards (DTensors) as they are: frozen weights come back from
    the base model, so they are neither written nor expected back (`strict=False`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False, **kwargs)


def save_shards(model: nn.Module, optimizer, folder) -> None:
    """Write this process's shards of `model`'s trainable weights and of `optimizer`'s state into `folder` with
    torch.distributed.checkpoint (DCP): one file per process (`__<rank>_0.distcp`, its shards only) and the main
    process's `.metadata`, which records where each piece of each tensor lies (keys `model.<parameter>` and
    `optimizer.state.<parameter>.<exp_avg|exp_avg_sq|step>`, `optimizer.param_groups...`). Nothing is gathered:
    no process ever holds more than its own shards. A collective: every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_shard_options())
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=folder)


def load_shards(model: nn.Module, optimizer, folder) -> None:
    """Read back into `model` and its `optimizer` what `save_shards` wrote to `folder`, whatever number of
    processes wrote it. DCP plans the reads from `.metadata`, which says where each piece of each tensor lies, so
    each process reads exactly the pieces of what it holds: a sharded `model`'s own shards (resharded on load when
    the run has another number of processes than the writer: a collective), an unsharded `model`'s whole tensors
    (read by this process alone, without any collective: one process, or each of several DDP processes). The AdamW
    state (`step`, `exp_avg`, `exp_avg_sq`) comes back the same way, keyed by parameter name, so any split of it
    fits."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # What this process holds (DTensor shards, or whole tensors), as the targets DCP fills in place (the
    # optimizer's state is created first, by a step at learning rate 0 with zero gradients, so that every tensor
    # to fill exists).
    weights, optim = get_state_dict(model, optimizer, options=_shard_options())
    state = {"model": weights, "optimizer": optim}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is (unsharded)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=not is_sharded(model))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_shard_options())  # fmt: skip


def shard_keys(folder) -> set[str]:
    """The parameter names whose weights `save_shards` wrote to `folder` (read from its `.metadata`)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k.removeprefix("model.") for k in keys if k.startswith("model.")}


def read_shards(folder, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole weights `save_shards` wrote to `folder`, read in this one process (no collective, whatever the
    process group), for the names and shapes of `like` (e.g. a model's trainable parameters)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"model": {n: torch.empty(t.shape, dtype=t.dtype) for n, t in like.items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state["model"]
