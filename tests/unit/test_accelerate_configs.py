"""The Accelerate config files in configs/accelerate/ go through Accelerate's own launch path, short of starting
processes: `accelerate launch --config_file` reads them (`load_config_from_file`, which refuses unknown keys), turns
them into the environment the launched processes see, and Accelerate builds its FSDP or DeepSpeed plugin from that
environment. Also, for each CPU launch line docs/scale.md names, how many processes Accelerate's own launcher
choice starts and what posttrain says about it at the start of the run (`trainer.launch`). Nothing is launched
(test_accelerate_ddp.py launches ddp.yaml and fsdp2.yaml) and neither deepspeed nor a GPU is needed."""

import os
from pathlib import Path
from unittest import mock

import pytest
import torch

ACCELERATE = Path(__file__).parents[2] / "configs" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}


def _launch_env(path: Path):
    """What `accelerate launch --config_file PATH -m posttrain.cli train run.yaml` resolves: its arguments, the
    parsed config and the launched processes' environment (accelerate.commands.launch.launch_command, minus the
    launch)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(path), "--main_process_port", "0", "-m", "posttrain.cli", "train", "run.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return args, defaults, prepare_deepspeed_cmd_env(args)[1]
    return args, defaults, prepare_multi_gpu_env(args)


def test_the_shipped_accelerate_configs_are_the_four_documented():
    assert sorted(p.stem for p in ACCELERATE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_accelerate_config_parses_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = ACCELERATE / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == EXPECTED[name]
    assert not cfg.use_cpu and cfg.num_machines == 1
    # The nested sections are not checked by the loader: each key must be an `accelerate launch` option (a typo
    # would be silently ignored), with the `fsdp_` prefix Accelerate adds to fsdp_config keys.
    options = {a.dest for a in launch_command_parser()._actions}
    nested = [*(cfg.fsdp_config or {}), *(cfg.deepspeed_config or {})]
    assert nested or name == "ddp"
    unknown = [k for k in nested if (k if k.startswith("fsdp") or name != "fsdp2" else f"fsdp_{k}") not in options]
    assert not unknown, f"{path}: not accelerate launch options: {unknown}"


def test_the_fsdp2_config_gives_accelerate_an_fsdp2_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, _, env = _launch_env(ACCELERATE / "fsdp2.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's no-offload policy (CPUOffloadPolicy offloads)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_the_deepspeed_configs_give_accelerate_their_zero_stage(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    _, _, env = _launch_env(ACCELERATE / f"{name}.yaml")
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # reads the launch environment; does not import deepspeed
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == stage and zero["stage"] == stage
    # posttrain accumulates micro-batches itself: DeepSpeed must not accumulate on top (see the file's header)
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    if stage == 3:  # the final model is saved whole
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_ddp_config_launches_one_process_per_gpu():
    args, cfg, env = _launch_env(ACCELERATE / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def _started(argv: list[str]) -> tuple[int, dict[str, str]]:
    """How many processes `accelerate launch ARGV train.py` starts on this machine and the environment they see:
    Accelerate's own dispatch (`launch_command`: which launcher, with what environment), stopped where a launcher
    would start processes (its single-process launcher's `_run_subprocess`, torchrun's `_run_torchrun`). The
    environment is cleared of launch variables first, and a default `accelerate config` file is not read."""
    from accelerate.commands import launch

    seen = {}

    def one(cmd, env, quiet):
        seen.update(processes=1, env=env)

    def torchrun(args):
        seen.update(processes=int(args.nproc_per_node), env=dict(os.environ))

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_SIZE"))}
    with (
        mock.patch.dict(os.environ, clean, clear=True),
        mock.patch.object(launch, "default_config_file", "/nonexistent/default_config.yaml"),
        mock.patch.object(launch, "_run_subprocess", one),
        mock.patch.object(launch, "_run_torchrun", torchrun),
    ):
        launch.launch_command(launch.launch_command_parser().parse_args([*argv, "--main_process_port", "0", "train.py"]))
    return seen["processes"], seen["env"]


MULTI_CPU = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: 'no'\nnum_machines: 1\n" \
            "num_processes: 2\nmachine_rank: 0\nuse_cpu: true\n"  # fmt: skip
ALONE = "note: accelerate launch was asked for several processes but started this one alone"
PRECISION = "note: the launch asked for mixed_precision bf16, but posttrain takes the precision from model.dtype"
FSDP = "note: the launch asked for FSDP (an Accelerate FSDP config), but Accelerate shards only on GPUs"
DYNAMO = "note: the launch asked for dynamo_backend inductor (ACCELERATE_DYNAMO_BACKEND)"


@pytest.mark.parametrize("argv, processes, notes", [
    (["--config_file", "ddp"], 2, [PRECISION]),  # the shipped file, as docs/scale.md launches it on CPUs
    (["--config_file", "ddp", "--mixed_precision", "no"], 2, []),
    (["--multi_gpu", "--num_processes", "2"], 2, []),
    (["--config_file", "ddp", "--cpu", "--num_processes", "2"], 1, [ALONE, PRECISION]),
    (["--cpu", "--num_processes", "2"], 1, [ALONE]),
    (["--config_file", "multi_cpu"], 1, [ALONE]),  # MULTI_CPU without --mpirun_hostfile
    (["--cpu", "--num_processes", "1"], 1, []),
    (["--cpu"], 1, []),
    (["--config_file", "fsdp2", "--mixed_precision", "no"], 2, [FSDP]),  # 2 processes, not sharded on CPUs
    (["--cpu", "--dynamo_backend", "inductor"], 1, [DYNAMO]),  # posttrain compiles with model.compile
    (["--cpu", "--dynamo_backend", "no"], 1, []),
])  # fmt: skip
def test_a_launch_that_starts_fewer_processes_or_another_precision_than_asked_is_noted(argv, processes, notes, tmp_path):
    """On a CPU-only machine (the processes compute in float32: model.dtype auto), what Accelerate starts for each
    launch line and what posttrain says about it at the start of the run (`trainer.launch.launch_notes`)."""
    from posttrain.trainer.launch import launch_notes

    (tmp_path / "multi_cpu.yaml").write_text(MULTI_CPU, encoding="utf-8")
    files = {"ddp": str(ACCELERATE / "ddp.yaml"), "fsdp2": str(ACCELERATE / "fsdp2.yaml"),
             "multi_cpu": str(tmp_path / "multi_cpu.yaml")}  # fmt: skip
    started, env = _started([files.get(a, a) for a in argv])
    assert started == processes
    # what Accelerate makes of these processes on CPUs (seen in test_accelerate_ddp.py's launches)
    distributed = "MULTI_CPU" if started > 1 else "NO"
    said = launch_notes(env, processes=started, distributed=distributed, precision="no", dtype="auto",
                        compute="float32", device="cpu")  # fmt: skip
    assert len(said) == len(notes) and all(line.startswith(n) for line, n in zip(said, notes, strict=True)), said
    if ALONE in notes:  # it names a launch that starts N processes
        assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N" in said[0]


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with 2 GPUs visible Accelerate starts 2 processes")
def test_num_processes_alone_starts_one_process_without_two_gpus():
    from posttrain.trainer.launch import launch_notes

    started, env = _started(["--num_processes", "2"])
    assert started == 1
    said = launch_notes(env, processes=1, distributed="NO", precision="no", dtype="auto", compute="float32",
                        device="cpu")  # fmt: skip
    assert len(said) == 1 and said[0].startswith(ALONE)


def test_accumulation_steps_from_the_launch_are_said_to_be_unused():
    """`accelerate launch --use_deepspeed --gradient_accumulation_steps 4` (or the variable exported by hand) asks
    for accumulation posttrain does not do that way: it accumulates optim.batch_size / optim.micro_batch_size
    micro-batches itself (and `train._accelerator` keeps Accelerate from dividing each gradient by 4)."""
    from posttrain.trainer.launch import launch_notes

    cpu = {"processes": 1, "distributed": "NO", "precision": "no", "dtype": "auto", "compute": "float32",
           "device": "cpu"}  # fmt: skip
    (said,) = launch_notes({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, **cpu)
    assert said.startswith("note: the launch asked for gradient_accumulation_steps 4 "
                           "(ACCELERATE_GRADIENT_ACCUMULATION_STEPS), which posttrain does not use")  # fmt: skip
    assert launch_notes({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}, **cpu) == []


def test_the_precision_note_names_what_the_run_uses_and_how_to_match_it():
    from posttrain.trainer.launch import launch_notes

    gpu = {"processes": 2, "distributed": "MULTI_GPU", "dtype": "auto", "compute": "bfloat16", "device": "cuda"}
    assert launch_notes({"ACCELERATE_MIXED_PRECISION": "bf16"}, precision="bf16", **gpu) == []
    (said,) = launch_notes({"ACCELERATE_MIXED_PRECISION": "no"}, precision="bf16", **gpu)
    assert said.startswith("note: the launch asked for mixed_precision no, but posttrain takes the precision from "
                           "model.dtype (auto: bfloat16 on cuda), so this run uses mixed_precision bf16.")  # fmt: skip
    assert said.endswith("or launch with --mixed_precision bf16 to match")


def test_fsdp_from_accelerate_is_noted_only_where_accelerate_did_not_shard():
    from posttrain.trainer.launch import launch_notes

    _, env = _started(["--config_file", str(ACCELERATE / "fsdp2.yaml"), "--mixed_precision", "no"])
    run = {"processes": 2, "precision": "no", "dtype": "float32", "compute": "float32"}
    assert launch_notes(env, distributed="FSDP", device="cuda", **run) == []  # sharded: as asked
    (said,) = launch_notes(env, distributed="MULTI_CPU", device="cpu", **run)
    assert said.startswith(FSDP) and "run.sharding=fsdp2" in said


def test_an_fsdp1_config_is_refused_where_accelerate_would_wrap_the_model(tmp_path):
    """FSDP1 wraps the model in a module posttrain does not unwrap: refused on a launch that would run it (FSDP),
    with the shipped fsdp2.yaml accepted; the same FSDP1 config on CPUs runs data parallelism (noted, not refused)."""
    from posttrain.trainer.launch import fsdp1_refusal

    _, _, env = _launch_env(ACCELERATE / "fsdp2.yaml")
    assert fsdp1_refusal(env, distributed="FSDP") is None
    v1 = tmp_path / "fsdp1.yaml"  # the shipped config without its fsdp_version line: Accelerate's default, 1
    v1.write_text("".join(line for line in (ACCELERATE / "fsdp2.yaml").read_text().splitlines(keepends=True)
                          if "fsdp_version" not in line))  # fmt: skip
    _, _, env1 = _launch_env(v1)
    assert env1["FSDP_VERSION"] == "1"
    said = fsdp1_refusal(env1, distributed="FSDP")
    assert "FSDP version 1" in said and "fsdp_version: 2" in said
    assert fsdp1_refusal(env1, distributed="MULTI_CPU") is None


@pytest.mark.parametrize("dtype,compute,rollout_dtype,cpu_bf16,device,said", [
    ("bfloat16", "bfloat16", None, False, "cpu", ["model.dtype=bfloat16 computes in bfloat16, but this CPU"]),
    ("auto", "float32", "bfloat16", False, "cpu", ["algorithm.rollout.dtype=bfloat16 samples in bfloat16, but"]),
    ("bfloat16", "bfloat16", None, True, "cpu", []),  # the CPU has the instructions
    ("auto", "float32", None, False, "cpu", []),  # nothing in bfloat16
    ("auto", "bfloat16", None, False, "cuda", []),  # a GPU: the CPU's instructions do not matter
])  # fmt: skip
def test_bfloat16_on_a_cpu_without_its_instructions_is_said(dtype, compute, rollout_dtype, cpu_bf16, device, said):
    """bfloat16 compute or sampling on a CPU that emulates bfloat16 products: one note each, naming what to set."""
    from posttrain.trainer.launch import launch_notes

    notes = launch_notes({}, processes=1, distributed="NO", precision="bf16" if compute == "bfloat16" else "no",
                         dtype=dtype, compute=compute, device=device, cpu_bf16=cpu_bf16, rollout_dtype=rollout_dtype)  # fmt: skip
    assert len(notes) == len(said) and all(n.startswith("note: " + s) for n, s in zip(notes, said))
    assert all("AVX512-BF16 or AMX" in n and "float32" in n for n in notes)

