"""What the launcher started against what it was asked for: one line each where they differ.

`accelerate launch` hands its config file's and flags' settings to the processes it starts through their
environment. Two of them can silently not take effect in a posttrain run (seen with accelerate 1.16, read from
`accelerate/commands/launch.py` and `accelerate/utils/launch.py`):

- **the number of processes.** Only `--multi_gpu` (or a config file with `distributed_type: MULTI_GPU`, FSDP or
  DeepSpeed) starts several processes on one machine, through torchrun, and on a machine without GPUs they talk
  over gloo. Every other launch goes through its single-process launcher (`simple_launcher`), which starts one
  process whatever `--num_processes` says: `--cpu` with any config file, a `distributed_type: MULTI_CPU` config
  without `--mpirun_hostfile` (it expects MPI to start the others), and `--num_processes N` alone with fewer than
  two GPUs visible. That launcher is the only one that sets `ACCELERATE_USE_CPU`, and it sets `MASTER_ADDR` only
  when asked for more than one process (or machine), so a process that sees both and a world of one was asked for
  several and runs alone: it trains the whole global batch itself, correctly but without the parallelism.
- **FSDP.** An FSDP config (`ACCELERATE_USE_FSDP`) starts its processes through torchrun, but Accelerate makes
  them FSDP only on GPUs and other accelerators (`AcceleratorState.__init__`): processes on CPUs run plain data
  parallelism, each holding the whole model (seen: configs/accelerate/fsdp2.yaml, 2 CPU processes). posttrain
  shards on CPUs itself (`run.sharding=fsdp2` under torchrun).
- **mixed precision.** posttrain takes it from `model.dtype` (`train._accelerator`), not from the launch's
  `mixed_precision` (`ACCELERATE_MIXED_PRECISION`): the shipped configs say bf16, which is what `model.dtype=auto`
  gives on a GPU with bf16, and float32 on a CPU.

`launch_notes` is a pure function of the environment and what the run uses; `train` prints its lines from the
main process as the run starts (after the data and the plan are checked, before the model loads). It changes
nothing: the run goes on as launched.
"""

from __future__ import annotations

from collections.abc import Mapping

MULTI_PROCESS_LAUNCH = (
    "`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N -m posttrain.cli train RUN.yaml` "
    "(without --cpu; on CPUs too, over gloo) or `torchrun --nproc_per_node N -m posttrain.cli train RUN.yaml`"
)


def launch_notes(env: Mapping[str, str], *, processes: int, distributed: str, precision: str, dtype: str,
                 compute: str, device: str, cpu_bf16: bool = True, rollout_dtype: str | None = None) -> list[str]:  # fmt: skip
    """The notes for a run with `processes` processes of Accelerate's `distributed` type ("NO", "MULTI_CPU",
    "FSDP", ...: `DistributedType`'s value) and mixed precision `precision` ("no" or "bf16"), from `model.dtype` =
    `dtype` computing in `compute` (e.g. "float32") on `device` ("cpu", "cuda"), launched with environment `env`;
    `cpu_bf16`: whether the CPU has bfloat16 instructions (`models.loading.cpu_has_bf16`), `rollout_dtype` the
    run's `algorithm.rollout.dtype`. Empty when the launch got what it asked for, or was no `accelerate launch`.

    >>> launch_notes({}, processes=1, distributed="NO", precision="no", dtype="auto", compute="float32", device="cpu")
    []
    """
    notes = []
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and processes == 1:
        notes.append(
            "note: accelerate launch was asked for several processes but started this one alone: its single-process "
            "launcher (used with --cpu, with a MULTI_CPU config and no --mpirun_hostfile, and for --num_processes "
            "without --multi_gpu or a config file when under 2 GPUs are visible) ignores --num_processes, so this "
            f"process trains the whole batch. For N processes: {MULTI_PROCESS_LAUNCH}"
        )
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and distributed != "FSDP":
        notes.append(
            "note: the launch asked for FSDP (an Accelerate FSDP config), but Accelerate shards only on GPUs and "
            f"other accelerators: on {device} it runs plain data parallelism ({distributed}), each process holding the "
            "whole model and optimizer state. To shard on CPUs: `torchrun --nproc_per_node N -m posttrain.cli train "
            "RUN.yaml run.sharding=fsdp2`"
        )
    asked = env.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if asked and asked != precision:
        notes.append(
            f"note: the launch asked for mixed_precision {asked}, but posttrain takes the precision from model.dtype "
            f"({dtype}: {compute} on {device}), so this run uses mixed_precision {precision}. Set model.dtype "
            f"(bfloat16: bf16 autocast) to change it, or launch with --mixed_precision {precision} to match"
        )
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
    if steps and steps != "1":
        notes.append(
            f"note: the launch asked for gradient_accumulation_steps {steps} (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), "
            "which posttrain does not use: it accumulates micro-batches itself, optim.batch_size rows per step in "
            "micro-batches of optim.micro_batch_size. Set those instead"
        )
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "").strip().lower()
    if backend and backend != "no":
        notes.append(
            f"note: the launch asked for dynamo_backend {backend} (ACCELERATE_DYNAMO_BACKEND), which posttrain does not "
            "use: it compiles the model's layers itself with model.compile=true, where the run allows it"
        )
    if device == "cpu" and not cpu_bf16:
        emulated = ("this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so torch emulates its bfloat16 "
                    "matrix products, slower than float32 ones")  # fmt: skip
        if compute == "bfloat16":
            notes.append(f"note: model.dtype={dtype} computes in bfloat16, but {emulated}: this run is likely slower "
                         "than in float32 (model.dtype=float32)")  # fmt: skip
        if rollout_dtype == "bfloat16":
            notes.append(f"note: algorithm.rollout.dtype=bfloat16 samples in bfloat16, but {emulated}: sampling is "
                         "likely slower than in float32; remove algorithm.rollout.dtype to sample in float32")  # fmt: skip
    return notes


def fsdp1_refusal(env: Mapping[str, str], *, distributed: str) -> str | None:
    """Why a launch cannot run, when Accelerate is about to wrap the model in FSDP1 (an FSDP config without
    `fsdp_version: 2`, whose default is 1: Accelerate sets `FSDP_VERSION` from it): FSDP1 replaces the model by a
    `FullyShardedDataParallel` wrapper holding flattened parameters, which posttrain's saving, reference and
    rollout code do not unwrap (`models.logprobs.unwrap_parallel` knows DDP and DeepSpeed; FSDP2 shards in place).
    None when Accelerate will not run FSDP (`distributed` is not "FSDP": on CPUs it falls back to data
    parallelism, which `launch_notes` says) or runs FSDP2.

    >>> fsdp1_refusal({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, distributed="FSDP") is None
    True
    >>> "fsdp_version: 2" in fsdp1_refusal({"ACCELERATE_USE_FSDP": "true"}, distributed="FSDP")
    True
    """
    if distributed != "FSDP" or env.get("FSDP_VERSION", "1") == "2":
        return None
    return (
        f"the Accelerate FSDP config runs FSDP version {env.get('FSDP_VERSION', '1')} (fsdp_version unset means 1), "
        "whose wrapped model posttrain does not unwrap to save, score or push weights; posttrain runs FSDP2. Set "
        "fsdp_version: 2 in the config (as configs/accelerate/fsdp2.yaml does), or use DeepSpeed "
        "(configs/accelerate/deepspeed_zero3.yaml)"
    )
