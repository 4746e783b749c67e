"""`posttrain merge`: fold a LoRA adapter into its base and save a standalone model."""

from __future__ import annotations

from pathlib import Path

from posttrain.cli.output import check_output_folder
from posttrain.errors import EXIT_OK, UserError


def add_parser(sub) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base and save a standalone model")
    m.add_argument("adapter", help="run folder or adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged safetensors model")
    m.add_argument("--qlora-base", choices=("trained", "original"), default=None,
                   help="a QLoRA adapter: merge it into the 4-bit base it trained on, dequantised (trained, the "
                        "default: the merged model computes what the trained one did), or into the base's own "
                        "full-precision weights (original)")  # fmt: skip
    m.set_defaults(func=run, loads_models=True)


def run(args) -> int:
    from posttrain.models import merge_adapter
    from posttrain.models.saving import head_kind, model_folder, read_info

    check_output_folder(args.out, "--out")
    given = Path(args.adapter).expanduser()
    if args.qlora_base is not None and given.is_dir() and read_info(model_folder(given)).get("technique") != "qlora":
        raise UserError(f"--qlora-base {args.qlora_base}: {args.adapter} is not a QLoRA adapter, whose 4-bit base "
                        "it chooses between; leave it out")  # fmt: skip
    earlier = Path(args.out).is_dir() and any(Path(args.out).iterdir())  # an earlier merge (the check allows only that)
    out = merge_adapter(args.adapter, args.out, qlora_base=args.qlora_base or "trained")
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
