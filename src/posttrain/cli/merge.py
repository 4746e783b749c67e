"""`posttrain merge`: fold a LoRA adapter into its base and save a standalone model."""

from __future__ import annotations

from pathlib import Path

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
    earlier = Path(args.out).is_dir() and any(Path(args.out).iterdir())  # an earlier merge (the check allows only that)
    out = merge_adapter(args.adapter, args.out)
    where = f"{out}" + (" (replacing the merged model there)" if earlier else "")
    if head_kind(out) == "reward":
        print(f"merged reward model written to {where}, with its score head (usable as --judge or "
              "algorithm.reward_model)")  # fmt: skip
    elif read_info(out).get("dropped_head") == "value":
        print(
            f"merged policy written to {where}; the PPO value head was used only in training and is not written"
        )
    else:
        print(f"merged model written to {where}")
    return EXIT_OK
