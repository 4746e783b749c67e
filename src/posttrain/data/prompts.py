"""The prompts of an RL run: each row rendered with the chat template and the generation prompt, its other columns
kept for the reward functions.

A prompt that leaves no room for `rollout.max_new_tokens` within `data.max_length`, or that uses a column name
the rollout passes to the rewards itself (`schema.RESERVED_PROMPT_COLUMNS`, refused by `load_rows`, so by
`posttrain data validate` too), is an error naming its line, before any model loads.
What the rewards need from the rows is checked by `rewards.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data.columns import run_columns
from posttrain.data.prepared import PreparedData
from posttrain.data.render import marker_problems, render_prompt
from posttrain.data.schema import load_rows, places, problem_at
from posttrain.errors import ConfigError, DataError


@dataclass
class PromptExample:
    """One prompt row, rendered: its ids (chat template + generation prompt), its text and its other columns."""

    prompt_ids: list[int]
    prompt: str
    columns: dict[str, Any]
    messages: list[dict] | None = None  # the whole prompt as chat messages (a reward model scores all of them)
    line: int | None = None  # where the row is in data.train (to name prompts a run does not sample)


def read_prompt_rows(cfg) -> list:
    """The rows of `data.train` as prompts (`load_rows(..., "prompts")`), refusing a run without one."""
    if not cfg.data.train:
        raise ConfigError("data.train is not set: give a prompts file (e.g. `posttrain data make --kind prompts`)")
    return load_rows(cfg.data.train, "prompts", run_columns(cfg), skip_bad=cfg.data.skip_bad_rows)


def render_prompts(cfg, tokenizer, rows) -> PreparedData:
    """Render every prompt row of an RL run; rows too long for the run's lengths are errors naming their lines
    (all of them at once; `load_rows` refused reserved columns)."""
    max_new = cfg.algorithm.rollout.max_new_tokens
    room = cfg.data.max_length - max_new
    examples, problems = [], []
    for row in rows:
        line = getattr(row, "line", None)
        if marked := marker_problems(tokenizer, [row], source=cfg.data.train):  # said with the rest
            problems.extend(marked)
            continue
        ids = render_prompt(tokenizer, row)
        if len(ids) > room:
            problems.append(problem_at(cfg.data.train, row, "prompt", (
                f"prompt is {len(ids)} tokens; data.max_length ({cfg.data.max_length}) minus "
                f"algorithm.rollout.max_new_tokens ({max_new}) leaves {room}")))  # fmt: skip
            continue
        msgs = row["prompt"]
        text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
        columns = {k: v for k, v in row.items() if k != "prompt"}
        examples.append(PromptExample(prompt_ids=ids, prompt=text, columns=columns, messages=list(msgs), line=line))
    if problems:
        raise DataError(problems, header=f"{cfg.data.train}: prompts this run cannot use:")
    at, noun = places(rows)  # every row is an example here (a row that cannot be one was raised above)
    return PreparedData(train=examples, collate=lambda items: items, notes=[], train_lines=[(n,) for n in at],
                        train_noun=noun)  # fmt: skip
