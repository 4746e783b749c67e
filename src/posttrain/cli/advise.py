"""`posttrain advise`: the command line of `posttrain.advisor.advise`.

A profile comes from `--profile FILE`, from one flag per profile key (flags override the file), or from
`--interactive` questions. `--data FILE` fills the data counts from a data file. Prints the recommendation,
or JSON with `--json`; `--write-config FILE` writes the first stage's `posttrain train` config (later stages
beside it). A `UserError` is printed as one paragraph and gives exit status 2. Like the advisor it imports
no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from posttrain.advisor.core import advise
from posttrain.advisor.profile import KEYS, Profile, ask, check_profile, coerce, load_profile
from posttrain.cli.estimate import format_duration
from posttrain.cli.output import add_columns, columns_given, print_failure
from posttrain.errors import EXIT_OK, UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "advise",
        help="which method (SFT, DPO, PPO, GRPO) and technique for a task, why, and what it costs",
        description="Recommend a post-training pipeline from a task profile (YAML, flags or questions).",
    )
    p.add_argument("--profile", metavar="FILE", help="flat YAML task profile (keys as the flags below)")
    p.add_argument("--interactive", action="store_true", help="ask for each profile key, one at a time")
    p.add_argument(
        "--data",
        metavar="FILE",
        help="a data file (JSONL, JSON, CSV, Parquet, a datasets folder): fills counts and lengths",
    )
    add_columns(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--write-config", metavar="FILE", help="write the first stage's train config here")
    keys = p.add_argument_group("profile keys (override --profile)")
    for key in KEYS:
        keys.add_argument(f"--{key.name.replace('_', '-')}", dest=f"key_{key.name}", metavar=key.kind.upper(), help=key.question)  # fmt: skip
    p.set_defaults(func=run, fails_as_document=True)
    return p


def _ask_on_stderr(question: str) -> str:
    sys.stderr.write(question)
    sys.stderr.flush()
    return input()


def _print_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _profile(args: argparse.Namespace) -> Profile:
    base = load_profile(args.profile) if args.profile else Profile()
    if args.interactive:
        # With --json, stdout carries only the JSON: questions go to stderr.
        asked = ask(input_fn=_ask_on_stderr, print_fn=_print_stderr) if args.json else ask()
        base = Profile(**{**base.to_dict(), **asked.to_dict()})
    flags = {k.name: coerce(k.name, getattr(args, f"key_{k.name}"), "command line") for k in KEYS}
    given = {k: v for k, v in flags.items() if v is not None}
    check_profile(Profile(**given), "the command line")  # two flags that contradict each other
    kept = base.to_dict()
    for one, other in (("gpu", "gpu_memory_gb"), ("gpu_memory_gb", "gpu")):
        if one in given:  # a flag naming the GPU replaces the profile's, however the profile named it
            kept.pop(other, None)
    return check_profile(Profile(**{**kept, **given}), "the profile (file, answers and flags)")


_HEADER = "# posttrain advise: "


def _written_by_advise(target: Path) -> bool:
    try:
        with target.open(encoding="utf-8") as f:
            return f.readline().startswith(_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _write_configs(advice, path: str) -> list[str]:
    """Each stage's config, the first at `path`, the later ones beside it. A file there already is replaced only
    when an earlier `advise` wrote it (its first line): a run config of the user's is never overwritten."""
    first = Path(path)
    targets = [first if i == 0 else first.with_name(f"{first.stem}-{i + 1}-{stage['stage']}{first.suffix}")
               for i, stage in enumerate(advice.configs)]  # fmt: skip
    for target in targets:
        if target.exists() and not _written_by_advise(target):
            raise UserError(f"--write-config: {target} exists and was not written by posttrain advise, so it is not "
                            "replaced; choose another file or remove it. Nothing was written.")  # fmt: skip
    written = []
    for i, (stage, target) in enumerate(zip(advice.configs, targets, strict=True)):
        header = f"{_HEADER}stage {i + 1} of {len(advice.configs)} ({stage['stage']})\n"
        if stage["note"]:
            header += f"# {stage['note']}\n"
        try:
            target.write_text(header + yaml.safe_dump(stage["config"], sort_keys=False), encoding="utf-8")
        except OSError as err:
            raise UserError(f"{target}: cannot write the config ({err.strerror})") from None
        written.append(str(target))
    return written


def format_advice(a) -> str:
    e = a.estimate
    out = _does_not_fit(a) if not a.fits else []
    out += [f"Recommendation: {' -> '.join(a.pipeline)}, technique {a.technique}", "", "Why:"]
    out += [f"  - {r}" for r in a.reasons]
    out += ["", "Risks to watch:"] + [f"  - {r}" for r in a.risks]
    if a.would_change:
        out += ["", "What would change it:"] + [f"  - {r}" for r in a.would_change]
    if a.alternatives:
        out += ["", "Alternatives:"]
        for alt in a.alternatives:
            if "technique" in alt:
                label = f"technique {alt['technique']}"
            else:
                instead = f", instead of {alt['instead_of']}" if alt["instead_of"] else ""
                label = f"{alt['method']} ({alt['slot']} stage{instead})"
            out.append(f"  - {label}: {' '.join(alt['reasons'])}")
    out += ["", _estimate_line(e), "", "Assumptions:"]
    out += [f"  - {n}" for n in a.assumptions]
    out += [
        "",
        f"Config for `posttrain train` (stage 1, {a.pipeline[0]}):",
        yaml.safe_dump(a.config, sort_keys=False),
    ]
    return "\n".join(out)


def _does_not_fit(a) -> list[str]:
    """The first lines when even the chosen technique does not fit: that, then what would."""
    e = a.estimate
    heaviest = max(e["stages"], key=lambda s: s["peak_memory_gb"])
    out = [
        f"Does not fit: {heaviest['method']} with {a.technique} needs {e['peak_memory_gb']:.1f} GB per GPU, more "
        f"than the {e['usable_memory_gb']:.1f} GB usable on each of {e['num_gpus']} x {e['gpu']}; nothing below "
        "runs as is."
    ]
    if e["would_fit"]:
        out.append("It would fit with: " + "; or ".join(f"{w['says']} ({w['peak_memory_gb']:.1f} GB per GPU)" for w in e["would_fit"]) + ".")  # fmt: skip
    return out + [""]


def _estimate_line(e: dict) -> str:
    where = f"peak {e['peak_memory_gb']:.1f} GB per GPU on {e['num_gpus']} x {e['gpu']}"
    if not e["fits"]:
        return f"Estimate: {where}: does not fit, so no time or cost"
    stages = ", ".join(
        f"{s['method']} {format_duration(s['hours'])} ${s['cost_usd']:,.2f}" for s in e["stages"]
    )
    return f"Estimate: {where}; {format_duration(e['hours'])}, ${e['cost_usd']:,.2f} ({stages})"


def run(args: argparse.Namespace) -> int:
    try:
        advice = advise(_profile(args), data=args.data, columns=columns_given(args, None, args.data))
        written = _write_configs(advice, args.write_config) if args.write_config else []
    except UserError as err:
        return print_failure("advise", args, err)
    if args.json:
        print(json.dumps(advice.to_dict(), indent=2))
    else:
        print(format_advice(advice))
    for path in written:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK
