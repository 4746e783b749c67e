"""`posttrain merge`: fold a LoRA adapter into its base and save a standalone model."""

from __future__ import annotations

from posttrain.cli.output import check_output_folder
from posttrain.errors import EXIT_OK


def add_parser(sub) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and save a standalone model")
    m.add_argument("adapter", help="run folder or adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged safetensors model")
    m.set_defaults(func=run, loads_models=True)


def run(args) -> int:
    from posttrain.models import merge_adapter
    from posttrain.models.saving import head_kind, read_info

    check_output_folder(args.out, "--out")
    out = merge_adapter(args.adapter, args.out)
    if head_kind(out) == "reward":
        print(f"merged reward model written to {out}, with its score head (usable as --judge or "
              "algorithm.reward_model)")  # fmt: skip
    elif read_info(out).get("dropped_head") == "value":
        print(
            f"merged policy written to {out}; the PPO value head was used only in training and is not written"
        )
    else:
        print(f"merged model written to {out}")
    return EXIT_OK
