"""`posttrain train`: run a training config (`posttrain.train.train`) and print its summary; `--help-config` lists
every config field with its default and which methods read it."""

from __future__ import annotations

import os
import sys

from posttrain.cli import allocator
from posttrain.cli.output import Output, add_json
from posttrain.errors import UserError


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="run a training config: posttrain train RUN.yaml [key=value ...]")
    t.add_argument(
        "config", nargs="?", help="run YAML file (see configs/); may be left out when overrides say it all"
    )
    t.add_argument(
        "overrides", nargs="*",
        help="dotted overrides, e.g. optim.lr=1e-4 run.max_steps=50; they win over the run file, a key given "
        "twice takes the last value, and a mapping ('optim={lr: 1e-4}') sets its keys and keeps the section's others (one naming another "
        "name, 'algorithm={name: sft}', replaces the section)",
    )  # fmt: skip
    t.add_argument(
        "--resume", action="store_true",
        help="continue from the run folder's latest checkpoint, on the same data and config (only run length, "
        "logging, checkpoint and sharding settings may change, and the memory settings that keep the math: "
        "optim.micro_batch_size, model.gradient_checkpointing, model.compile_memory_budget, "
        "algorithm.rollout.generation_batch_size); a finished run trains nothing",
    )  # fmt: skip
    t.add_argument(
        "--help-config", action="store_true",
        help="list every config field with its default and which methods/techniques read it",
    )  # fmt: skip
    add_json(t)
    from posttrain.cli.output import add_columns

    add_columns(t, hidden=True)  # the other commands' flags: said in the config's form (`_columns_as_settings`)
    t.set_defaults(func=run, loads_models=True)


def _columns_as_settings(args) -> None:
    """--column and the other layout flags are the other commands' (data validate, evaluate, ...); a run reads the
    same from its config: refused with the overrides that say it (argparse's 'unrecognized arguments' said
    nothing of data.columns)."""
    from posttrain.cli.output import LAYOUT_FLAGS
    from posttrain.config_rules import show

    given = [(setting, list(pairs) if setting == "data.ignore_columns" else dict(pairs))
             for _, attr, setting in LAYOUT_FLAGS if (pairs := getattr(args, attr))]  # fmt: skip
    if given:
        overrides = " ".join(f"'{setting}={show(value)}'" for setting, value in given)
        raise UserError(f"posttrain train reads a file's own names from the run's config, not from --column and its "
                        f"kin (those are for data validate, generate, evaluate, diagnose, advise): give {overrides} "
                        "on the command line, or the same under data: in the run file")


def run(args) -> Output:
    if args.help_config:
        return help_config()
    from posttrain.algorithms import load_config
    from posttrain.train import train
    from posttrain.trainer.runlock import launch_rank
    from posttrain.trainer.summary import format_summary, run_summary

    _columns_as_settings(args)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # no run file: defaults + overrides
    if config is None and not overrides:
        raise UserError(
            "posttrain train needs a run file or overrides: posttrain train RUN.yaml [key=value ...]"
        )
    cfg = load_config(config, overrides)
    if launch_rank() == 0:
        print(f"memory allocator: {allocator.running()} (set by {allocator.VARIABLE}=auto|tcmalloc|jemalloc|system; "
              "see the README's Set-up)", file=sys.stderr)  # fmt: skip
    result = train(cfg, resume=args.resume)
    if launch_rank() != 0:  # one summary per run: rank 0's (the others' history is their own shard's)
        return Output(doc=None)
    summary = run_summary(result)
    return Output(doc=summary, text=format_summary(summary))


def help_config() -> Output:
    """Every config field: its default, its doc, its method (None: a shared section) and what reads it."""
    from posttrain.algorithms import RunConfig
    from posttrain.config import describe_fields
    from posttrain.config_rules import reads

    fields = [{"name": n, "default": d, "doc": doc, "method": m, "read_by": reads(n, RunConfig, m)}
              for n, d, doc, m in describe_fields(RunConfig)]  # fmt: skip
    lines, shown = [], None
    for f in fields:
        if f["method"] != shown and f["method"] is not None:
            lines.append(f"\n# algorithm.name: {f['method']}")
        shown = f["method"]
        doc = f["doc"].replace("\n", "\n    ")  # every line of a long doc under its field
        lines.append(f"{f['name']} = {f['default']}\n    {doc}\n    read by: {f['read_by']}")
    return Output(doc={"fields": fields}, text="\n".join(lines))
