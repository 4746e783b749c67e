"""`posttrain quickstart [sft|dpo|grpo|ppo|rloo]`: the measured recipes (`posttrain.quickstart`, `posttrain.recipes`;
their settings are in configs/quickstart/)."""

from __future__ import annotations

from posttrain.config import quickstart_methods
from posttrain.errors import EXIT_OK, UserError


def add_parser(sub) -> None:
    q = sub.add_parser(
        "quickstart", help="train the embedded SmolLM2 with LoRA and show held-out before/after"
    )
    q.add_argument(
        "method",
        nargs="?",
        default="sft",
        choices=quickstart_methods(),
        help="sft (default): structured-output SFT; "
        + ", ".join(m for m in quickstart_methods() if m != "sft")
        + ": the arithmetic recipes (README)",
    )
    q.add_argument("--output-dir", help="run folder (default: runs/quickstart or runs/quickstart-METHOD)")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the built-in recipe)")
    q.add_argument("--n-eval", type=int, default=None,
                   help="held-out prompts to evaluate (sft only; default: the recipe's; the others score 200)")
    q.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming it")
    q.set_defaults(func=run, loads_models=True)


def run(args) -> int:
    from posttrain.quickstart import run_quickstart
    from posttrain.recipes import run_recipe

    if args.method != "sft":
        if args.n_eval is not None:
            raise UserError(
                "--n-eval applies to the sft quickstart; the arithmetic recipes score the 200 held-out prompts "
                f"set in configs/quickstart/{args.method}.yaml (recipe.n_heldout)"
            )
        run_recipe(args.method, output_dir=args.output_dir, steps=args.steps, fresh=args.fresh)
        return EXIT_OK
    run_quickstart(
        output_dir=args.output_dir or "runs/quickstart",
        steps=args.steps,
        n_eval=args.n_eval,
        fresh=args.fresh,
    )
    return EXIT_OK
