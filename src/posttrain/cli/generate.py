"""`posttrain generate`: sample completions from a run, a model folder or the embedded default."""

from __future__ import annotations

import sys

from posttrain.cli.output import (
    Once,
    Output,
    add_columns,
    add_json,
    add_stop,
    add_template_vars,
    columns_given,
    positive_int,
    settings,
    stop_note,
    temperature,
    top_p,
)
from posttrain.errors import UserError


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample from a run, a model folder or the embedded default")
    g.add_argument(
        "--model",
        action=Once,
        default="smollm2-135m-instruct",
        help="run folder, model/adapter folder, .gguf file, hub name or smollm2-135m-instruct",
    )
    g.add_argument("--prompt", action="append", help="a user message (repeatable)")
    g.add_argument("--prompts-file", help="a file of prompt rows (JSONL/JSON/CSV with a `prompt` field)")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=top_p, default=1.0, help="sampling only: the nucleus mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=None, help="sampling only: the seed of the draws (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (shown for --prompts-file)")
    add_stop(g)
    add_columns(g)
    add_template_vars(g)
    add_json(g)
    g.set_defaults(func=run, loads_models=True)


def run(args) -> Output:
    from posttrain.data import load_rows, plain_messages
    from posttrain.evaluation import load_for_inference
    from posttrain.models import generate

    if args.temperature == 0 and args.top_p != 1.0:
        raise UserError(f"--top-p {args.top_p} applies to sampling only; greedy decoding (--temperature 0, the "
                        "default) takes the most likely token. Give --temperature > 0 to sample, or leave --top-p out")  # fmt: skip
    if args.temperature == 0 and args.seed is not None:
        raise UserError(f"--seed {args.seed} applies to sampling only; greedy decoding (--temperature 0, the default) "
                        "draws nothing. Give --temperature > 0 to sample, or leave --seed out")  # fmt: skip
    args.seed = 0 if args.seed is None else args.seed
    if any(not p.strip() for p in args.prompt or []):
        raise UserError("--prompt is empty; give the text of a user message")
    items = [{"prompt": p} for p in args.prompt or []]
    columns = columns_given(args, "prompts", args.prompts_file, "--prompts-file")
    if args.prompts_file:
        rows = load_rows(args.prompts_file, "prompts", columns)
        items += [{**({"id": r["id"]} if "id" in r else {}), "prompt": r["prompt"]} for r in rows]
    if not items:
        raise UserError("give at least one --prompt TEXT or --prompts-file FILE")
    model, tokenizer = load_for_inference(args.model, dict(args.template_var))
    if note := stop_note(args):
        print(note, file=sys.stderr)
    if args.prompts_file:  # the file's rows, with their lines, before anything is decoded
        from posttrain.data.render import refuse_markers

        refuse_markers(tokenizer, rows, source=args.prompts_file)
    outs = generate(
        model,
        tokenizer,
        [item["prompt"] for item in items],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        progress="generate" if args.prompts_file and not args.no_progress else None,  # bar: a file's prompts
        stop=args.stop or None,
    )
    blocks = []
    for item, out in zip(items, outs):
        prompt = item["prompt"]
        item.update(prompt=plain_messages(prompt, "user"), completion=out)
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        blocks.append(f"### prompt\n{shown}\n### completion\n{out}\n")
    doc = {"model": args.model, "settings": {**settings(args, "max_new_tokens", "temperature", "top_p", "seed", "stop"),
                                              "template_var": dict(args.template_var)},
           "results": items}  # fmt: skip
    return Output(doc=doc, text="\n".join(blocks))
