"""The Accelerate config files in configs/accelerate/ go through Accelerate's own launch path, short of starting
processes: `accelerate launch --config_file` reads them (`load_config_from_file`, which refuses unknown keys), turns
them into the environment the launched processes see, and Accelerate builds its FSDP or DeepSpeed plugin from that
environment. Nothing is launched and neither deepspeed nor a GPU is needed."""

import os
from pathlib import Path
from unittest import mock

import pytest

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
