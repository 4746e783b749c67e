"""`posttrain estimate`: the command line of `posttrain.estimator`.

Thin: parses flags that mirror the `EstimateInputs` fields, builds one from them, calls `estimate_for` (or
`reality_check` for `--table`) and prints a table or JSON. With `--data FILE` the sequence length and the tokens
trained on come from the file's rows (read and checked as `posttrain data validate` does, measured as `posttrain
advise --data` measures them), unless given. A `UserError` is printed as one paragraph and gives exit status 2.
Like the estimator it imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from posttrain.cli.output import (
    LAYOUT_FLAGS,
    add_columns,
    columns_given,
    fraction,
    number,
    positive,
    print_failure,
)
from posttrain.errors import EXIT_OK, UserError
from posttrain.estimator.core import Estimate, estimate_for
from posttrain.estimator.hardware import USABLE_FRACTION, load_gpu_table
from posttrain.estimator.inputs import (
    DEFAULT_CHECKPOINTING,
    DEFAULT_MICRO_BATCH,
    ENGINES,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    REFERENCES,
    TECHNIQUES,
    EstimateInputs,
)
from posttrain.estimator.memory import GROUP_METHODS, SHARD_STAGE
from posttrain.estimator.models import parse_size
from posttrain.estimator.table import format_table, reality_check


def _count(text: str) -> float:
    """A token count such as ``1e9``, ``500M`` or ``2B``."""
    try:
        value = float(text)
    except ValueError:
        value = parse_size(text) or 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count (e.g. 1e9, 500M, 2B)")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "estimate",
        help="memory per GPU, GPUs that fit, FLOPs, hours and cost of a post-training setup",
        description="Estimate memory, compute, time and cost before training (no GPU or torch needed).",
    )
    _setup_flags(p.add_argument)
    _rl_and_hardware_flags(p.add_argument)
    p.add_argument("--data", metavar="FILE", help="size seq_len and the tokens trained on from a data file's rows "
                   "(SFT, preference or prompts, as the method reads; given flags win)")  # fmt: skip
    p.add_argument("--epochs", type=positive, default=None, help="passes over --data (default 1)")
    add_columns(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--table", action="store_true", help="the reality check: every method x technique for --model"
    )
    defaults = {a.dest: a.default for a in p._actions if a.dest not in TABLE_READS | {"help"}}
    p.set_defaults(func=run, fails_as_document=True, table_ignores=defaults)
    return p


TABLE_READS = {"model", "gpu", "seq_len", "group_size", "completion_len", "tokens", "gpu_table", "json", "table"}
"""The flags `--table` reads; its rows fix the rest (every method and technique, micro-batch 1, gradient
checkpointing, bf16 mixed precision, AdamW, FSDP), so another flag given with it is refused."""


def _from_data(args: argparse.Namespace) -> list[str]:
    """`--data`: seq_len and tokens from the file where not given (the args are set), and what was done, in words."""
    from posttrain.advisor.datafile import SHAPE_METHODS, seq_len_for, summarise, tokens_per_row
    from posttrain.estimator.inputs import DEFAULT_GROUP_SIZE

    s = summarise(args.data, columns_given(args, None, args.data))
    method = args.method.strip().lower()
    if method in METHODS and method not in SHAPE_METHODS[s.shape]:
        raise UserError(f"{args.data} holds {s.shape} rows, which --method {method} does not train on; estimate it "
                        f"with --method {' or '.join(SHAPE_METHODS[s.shape])}")  # fmt: skip
    notes = []
    if args.seq_len is None:
        args.seq_len = seq_len_for(s, args.completion_len)
        notes.append(f"seq_len {args.seq_len} from {args.data}: 95% of its {s.rows:,} rows are up to ~{s.p95_tokens:,.0f} "
                     "tokens (characters / 4), x 1.5 for the chat template, to a power of two"
                     + ("" if s.shape != "prompts" else (
                         ", plus the completion: " + (f"--completion-len {args.completion_len}" if args.completion_len
                                                      else "as many tokens as the prompts' room (half the sequence)"))))  # fmt: skip
    epochs = args.epochs or 1
    if args.tokens is None:
        group = args.group_size or DEFAULT_GROUP_SIZE.get(method, 1)
        per, what = tokens_per_row(s.shape, s.mean_tokens, args.seq_len, group)
        args.tokens = max(1.0, s.rows * per * epochs)
        notes.append(f"tokens {args.tokens:.3g} from {args.data}: {s.rows:,} rows x {what} x {epochs:g} epoch(s)")
    elif args.epochs is not None:
        raise UserError("--epochs sizes the tokens from --data; --tokens gives them already: give one of the two")
    return notes


def _refuse_flags_the_table_ignores(args: argparse.Namespace) -> None:
    given = [f"--{k.replace('_', '-')}" for k, default in args.table_ignores.items() if getattr(args, k) != default]
    if given:
        raise UserError(f"--table prints every method and technique at fixed settings (micro-batch 1, gradient "
                        f"checkpointing, bf16 mixed precision, AdamW, FSDP on the GPUs it needs) and reads only "
                        f"--model, --gpu, --seq-len, --group-size, --completion-len, --tokens and --gpu-table; "
                        f"{', '.join(given)} would be ignored: drop {'it' if len(given) == 1 else 'them'}, or "
                        "leave out --table for one estimate with them")  # fmt: skip


def _setup_flags(a) -> None:
    """The model, method, technique and batch shape (each flag is the `EstimateInputs` field of its name)."""
    a("--model", default="7b", help="a size (7b, 135m), a known name (llama-3-8b) or a config.json path")
    a("--method", default="sft", help=f"one of {', '.join(METHODS)}")
    a("--technique", default="full", help=f"one of {', '.join(TECHNIQUES)} (8bit: LoRA on an int8 base)")
    a("--precision", default="bf16-mixed", help=f"one of {', '.join(PRECISIONS)}")
    a("--optimizer", default="adamw", help=f"one of {', '.join(OPTIMIZERS)}")
    by_method = ", ".join(f"{m} {n}" for m, n in DEFAULT_MICRO_BATCH.items())
    a("--batch-size", type=int, default=None, help="micro-batch per GPU: sequences, pairs (DPO) or prompts (RL); "
      f"default by method: {by_method}")  # fmt: skip
    a("--seq-len", type=int, default=None, help="tokens per sequence, prompt + response (default 2048, or from --data)")
    on = ", ".join(t for t, v in DEFAULT_CHECKPOINTING.items() if v)
    off = ", ".join(t for t, v in DEFAULT_CHECKPOINTING.items() if not v)
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help=f"default by technique: on for {on}, off for {off}")  # fmt: skip
    a("--lora-rank", type=int, default=None, help="LoRA rank (default 16; lora, qlora and 8bit only)")
    a(
        "--lora-dropout",
        type=number,
        default=None,
        help="LoRA dropout (default 0; > 0 stores a copy of each adapted input)",
    )
    a("--num-gpus", type=int, default=1)
    a("--sharding", default="none", help=f"one of {', '.join(SHARD_STAGE)}")


def _rl_and_hardware_flags(a) -> None:
    a("--group-size", type=int, default=None, help="completions per prompt (GRPO, default 8; RLOO's k, default 4)")
    a(
        "--completion-len",
        type=int,
        default=None,
        help="generated tokens per sequence (RL; default seq_len/2)",
    )
    a("--tokens", type=_count, default=None, help="training tokens in total, e.g. 1e9 or 500M (default 1e8)")
    a("--gpu", default=None, help="GPU for time and cost (default: the smallest that fits)")
    a("--gpu-memory-gb", type=positive, default=None, help="a GPU known only by its memory")
    a("--gpu-table", default=None, metavar="FILE", help="YAML/JSON overriding or adding GPUs")
    a("--reference", default=None, help=f"DPO/PPO/GRPO/RLOO reference: one of {', '.join(REFERENCES)}")
    a("--reward-model", default=None, help="a learned reward model (size or name) held in memory (PPO/GRPO/RLOO)")
    a("--reward-function", action="store_true", help="the reward is computed by a program (PPO/GRPO/RLOO)")
    a("--value-model", default=None, help="PPO: 'head' (the default), a value head on the policy as posttrain's "
      "ppo holds it; or a separate critic's size or name ('policy': the policy's own)")  # fmt: skip
    a("--rollout-engine", default="hf", help=f"one of {', '.join(ENGINES)}")
    a("--mfu", type=fraction, default=0.40, help="assumed fraction of peak FLOP/s")


_ONLY_FOR = {"lora_rank": ("technique", ("lora", "qlora", "8bit")), "lora_dropout": ("technique", ("lora", "qlora", "8bit")),
             "group_size": ("method", GROUP_METHODS)}  # fmt: skip
"""Flags read for some techniques or methods only: None when not given (the field's default then applies), and
refused where they would be ignored."""


def inputs_from_args(args: argparse.Namespace) -> EstimateInputs:
    """The flags as `EstimateInputs`: every flag is the field of the same name (a flag of `_ONLY_FOR` left out
    takes the field's default; given where it is not read, it is refused)."""
    fields = EstimateInputs.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    given = {k: v for k in _ONLY_FOR if (v := values.pop(k, None)) is not None}  # left out: the field's default
    if values.get("seq_len") is None:  # left out (and no --data to size it): the field's default
        values.pop("seq_len", None)
    inputs = EstimateInputs(**values)  # its method and technique as the estimator names them (aliases resolved)
    for key in given:
        by, readers = _ONLY_FOR[key]
        if getattr(inputs, by) not in readers:
            raise UserError(f"--{key.replace('_', '-')} applies to --{by} {' or '.join(readers)} only; this estimate "
                            f"is for --{by} {getattr(inputs, by)}, which would ignore it")  # fmt: skip
    return dataclasses.replace(inputs, **given) if given else inputs


def format_estimate(e: Estimate) -> str:
    i = e.inputs
    shard = "" if i["sharding"] == "none" else f", {i['sharding']}"
    lines = [
        f"{e.model} ({e.params / 1e9:.2f}B params, {e.trainable_params / 1e6:,.1f}M trained): {e.method}, "
        f"{e.technique}, {i['precision']}, {i['optimizer']}",
        f"peak memory per GPU: {e.peak_memory_gb:.1f} GB  (micro-batch {i['batch_size']} x {i['seq_len']} tokens, "
        f"{i['num_gpus']} GPU{'s' if i['num_gpus'] > 1 else ''}{shard}, gradient checkpointing "
        f"{'on' if i['gradient_checkpointing'] else 'off'})",
    ]
    for k, v in e.breakdown_gb.items():
        if v >= 0.0005:
            lines.append(f"  {k:<20} {v:9.3f} GB")
    lines.append(f"fits: {', '.join(e.fits) if e.fits else 'no single GPU in the table'}")
    flops = f"compute: {e.flops:.2e} FLOPs for {e.tokens:.2e} tokens"
    if e.fits_gpu:
        lines.append(f"{flops} -> {format_duration(e.hours)} on {e.num_gpus} x {e.gpu}, ${e.cost_usd:,.0f}")
    else:
        lines += _does_not_fit(e) + [f"{flops}; no time or cost for a setup that does not fit"]
    lines.append("assumptions:")
    lines += [f"  - {n}" for n in e.assumptions]
    return "\n".join(lines)


def _does_not_fit(e: Estimate) -> list[str]:
    gpus = f"{e.num_gpus} x {e.gpu}"
    lines = [
        f"does not fit {gpus}: {e.peak_memory_gb:.1f} GB per GPU, more than the {e.usable_memory_gb:.1f} GB usable "
        f"on each ({USABLE_FRACTION:.0%} of its memory)"
    ]
    if not e.would_fit:
        return lines + ["  nothing single fits: shorten seq_len, or pick a smaller model"]
    lines.append("would fit:")
    for w in e.would_fit:
        lines.append(f"  - {w['says']} ({w['peak_memory_gb']:.1f} GB per GPU): {change_flags(w['change'])}")
    return lines


def change_flags(change: dict) -> str:
    """An `EstimateInputs` change as the flags that make it.

    >>> change_flags({"num_gpus": 4, "sharding": "fsdp", "gradient_checkpointing": True, "gpu_memory_gb": None})
    '--num-gpus 4 --sharding fsdp --gradient-checkpointing'
    """
    out = []
    for key, value in change.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue  # a field cleared so that another applies (a named GPU instead of a size)
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out.append(f"{flag} {value}")
    return " ".join(out)


def run(args: argparse.Namespace) -> int:
    try:
        if args.table:
            _refuse_flags_the_table_ignores(args)
            args.seq_len = args.seq_len or 2048
            gpu = args.gpu or "H100-80GB"
            rows, settings = reality_check(
                model=args.model,
                gpu=gpu,
                seq_len=args.seq_len,
                group_size=args.group_size or 8,
                completion_len=args.completion_len or args.seq_len // 2,  # half, as one estimate assumes
                tokens=args.tokens or 1e8,
                gpu_table=load_gpu_table(args.gpu_table),
            )
            if args.json:
                print(json.dumps({"rows": [r.__dict__ for r in rows], "settings": settings}, indent=2))
            else:
                print(format_table(rows, settings, gpu))
            return EXIT_OK
        if args.data is None:
            if args.epochs is not None:
                raise UserError("--epochs counts passes over --data; without a data file give --tokens instead")
            if any(getattr(args, attr) for _, attr, _ in LAYOUT_FLAGS):
                columns_given(args, None, None)  # refused: the flags name what a file holds, and none is read
        notes = _from_data(args) if args.data is not None else []
        e = estimate_for(inputs_from_args(args))
        e.assumptions[:0] = notes
    except UserError as err:
        return print_failure("estimate", args, err)
    print(json.dumps(e.to_dict(), indent=2) if args.json else format_estimate(e))
    return EXIT_OK


def format_duration(hours: float) -> str:
    """Hours for long runs, minutes or seconds for short ones (a 64-row run is not "0.0 h").

    >>> format_duration(12.345), format_duration(0.25), format_duration(0.0001)
    ('12.3 h', '15.0 min', '0.4 s')
    """
    if hours >= 1:
        return f"{hours:,.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} min"
    return f"{hours * 3600:.1f} s"
