"""Message trees, one message per row (OpenAssistant's oasst1 and oasst2: ``message_id``, ``parent_id``, ``role``
``prompter``/``assistant``, ``text``, ``rank`` among siblings), turned into posttrain's rows: `posttrain data tree`.

A tree is a conversation that branches: each prompter message may have several assistant replies, ranked by
people (``rank`` 0 the best), and each reply several follow-ups. Rows:

- ``sft``: one row per assistant reply chosen for training, with the conversation before it as its prompt
  (messages) and the reply as its completion, so every chosen reply trains once, in its own context. With
  ``replies="best"`` (the default) a reply is chosen when it and every reply before it in its conversation is the
  best ranked of its siblings (an unranked only child counts as the best; of several unranked, the first in the
  file); ``"all"`` chooses every reply.
- ``preference``: one pair per ranked reply below the best of its siblings: the best as chosen, that one as
  rejected, the conversation up to their prompter message as the prompt (its `id`: ``BEST>WORSE``, the two
  replies' ids). A reply ranked the same as the best, or with its text, is no pair.

Nothing is dropped silently: messages marked ``deleted`` or failing review (``review_result`` false), with their
subtrees, messages whose tree's root is in another language than `lang`, and messages whose parent is not in
the file are counted in `TreeRows.skipped`, which the command prints. A message whose role is the same as its
parent's, or is neither name, is a problem naming its line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.readers import read_records_lenient
from posttrain.errors import DataError, Problem

KEYS = {"id": "message_id", "parent": "parent_id", "role": "role", "content": "text", "rank": "rank"}
"""The columns a tree file holds each part of a message in (oasst1's names; `posttrain data tree --key`)."""
ROLES = {"user": "prompter", "assistant": "assistant"}
"""The file's names of the two roles (oasst1's; `--role`)."""


@dataclass
class TreeRows:
    rows: list[dict]
    trees: int
    messages: int
    skipped: Counter = field(default_factory=Counter)
    """Messages left out, by reason (each with its subtree counted)."""


@dataclass
class _Node:
    id: str
    parent: str | None
    role: str
    content: str
    rank: float | None
    line: int | None
    lang: str | None
    children: list[_Node] = field(default_factory=list)


def tree_rows(path: str | Path, kind: str, *, keys: Mapping[str, str] = KEYS, roles: Mapping[str, str] = ROLES,
              replies: str = "best", lang: str | None = None) -> TreeRows:  # fmt: skip
    """The `kind` rows (``sft`` or ``preference``) of the message trees in `path`; `DataError` naming every
    message that cannot be read as one."""
    if kind not in ("sft", "preference"):
        raise ValueError(f"kind must be sft or preference, got {kind!r}")
    if replies not in ("best", "all"):
        raise ValueError(f"replies must be best or all, got {replies!r}")
    keys = {**KEYS, **keys}
    by_name = {theirs: ours for ours, theirs in {**ROLES, **roles}.items()}
    records, problems = read_records_lenient(path)
    nodes: dict[str, _Node] = {}
    skipped: Counter = Counter()
    removed: set[str] = set()
    name = str(path)
    for rec in records:
        d = rec.data
        missing = [keys[k] for k in ("id", "role", "content") if d.get(keys[k]) is None]
        if missing:
            problems += [Problem(name, rec.line, m, "missing: each message needs its id, role and text") for m in missing]
            continue
        role = by_name.get(d[keys["role"]])
        if role is None:
            problems.append(Problem(name, rec.line, keys["role"], f"{d[keys['role']]!r} is neither role "
                                    f"({', '.join(sorted(by_name))}; --role user=NAME reads another)"))  # fmt: skip
            continue
        ident = _id(d[keys["id"]])
        if ident in nodes:
            problems.append(Problem(name, rec.line, keys["id"], f"{ident!r} is the id of an earlier message too"))
            continue
        parent = _id(d.get(keys["parent"]))
        if parent == ident:
            problems.append(Problem(name, rec.line, keys["parent"], f"{ident!r} is its own parent"))
            continue
        nodes[ident] = _Node(ident, parent, role, str(d[keys["content"]]), _rank(d.get(keys["rank"])), rec.line,
                             d.get("lang"))  # fmt: skip
        if _flag(d.get("deleted")) is True or _flag(d.get("review_result")) is False:
            removed.add(ident)
    if problems:
        raise DataError(problems, header=f"{name}: {len(problems)} problem(s); no trees read")
    roots, orphans = [], []
    for node in nodes.values():
        if node.parent is None:
            roots.append(node)
        elif node.parent in nodes:
            nodes[node.parent].children.append(node)
        else:
            orphans.append(node)
    for node in orphans:  # (a split of the file, or a filtered one)
        skipped["parent not in the file"] += _size(node)
    reached = {n.id for n in [*roots, *orphans] for n in _subtree(n)}
    if cycle := [n for n in nodes.values() if n.id not in reached]:  # parents that lead back to themselves
        skipped["in a loop of parent links"] += len(cycle)
    for node in nodes.values():
        if node.parent is not None and node.parent in nodes and nodes[node.parent].role == node.role:
            problems.append(Problem(name, node.line, keys["role"], f"{node.role} replies to a {node.role} message "
                                    f"({keys['parent']} {node.parent!r}): turns alternate"))  # fmt: skip
    if problems:
        raise DataError(problems, header=f"{name}: {len(problems)} problem(s); no trees read")
    rows: list[dict] = []
    kept_trees = 0
    for root in roots:
        if lang is not None and root.lang != lang:
            skipped[f"another language than {lang}"] += _size(root)
            continue
        if root.role != "user":
            skipped["tree that begins with an assistant message"] += _size(root)
            continue
        kept_trees += root.id not in removed
        _walk(root, kind, replies, removed, rows, skipped)
    return TreeRows(rows, kept_trees, len(nodes), +skipped)  # (+: without the reasons that counted none)


def _id(value) -> str | None:
    """An id as text, the same whichever way a file wrote it: pandas writes integer ids of a column with nulls
    (a root's parent) as floats, 1.0, which would match no id 1.

    >>> _id(1.0), _id(7), _id("a1"), _id(None), _id(float("nan")), _id("")
    ('1', '7', 'a1', None, None, None)
    """
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return None  # (a root's parent written as "" or NaN)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _rank(value) -> float | None:
    """A reply's rank: a number, or a text of one (a CSV cell); anything else is unranked.

    >>> _rank(0), _rank("1.0"), _rank(None), _rank(True), _rank(""), _rank(float("nan"))
    (0.0, 1.0, None, None, None, None)
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None


def _flag(value) -> bool | None:
    """A true/false column (`deleted`, `review_result`) as a boolean, a CSV cell's text too; None when unset.

    >>> _flag(True), _flag("False"), _flag("true"), _flag(None), _flag("")
    (True, False, True, None, None)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _subtree(node: _Node) -> list[_Node]:
    """`node` and every message below it."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(n.children)
    return out


def _size(node: _Node) -> int:
    """Messages in the subtree of `node`, itself included."""
    return len(_subtree(node))


def _ordered(replies: list[_Node]) -> list[_Node]:
    """Sibling replies best first: ranked by rank (0 the best), then the unranked in file order."""
    return sorted(replies, key=lambda n: (n.rank is None, n.rank if n.rank is not None else 0, n.line or 0))


def _walk(root: _Node, kind: str, replies: str, removed: set[str], rows: list[dict], skipped: Counter) -> None:
    """The rows of the tree under `root`, depth first in file order (a loop, not recursion: oasst2's threads are
    shallow, but a file's need not be)."""
    todo: list[tuple[_Node, list[dict], bool]] = [(root, [], True)]  # (message, the conversation before it, best)
    while todo:
        node, before, best_path = todo.pop()
        if node.id in removed:
            skipped["deleted or failing review"] += _size(node)
            continue
        if node.role == "assistant" and kind == "sft" and (best_path or replies == "all") and node.content.strip():
            rows.append({"id": node.id, "prompt": [dict(m) for m in before], "completion": node.content})
        path = [*before, {"role": node.role, "content": node.content}]
        if node.role == "user":
            ordered = _ordered(node.children)
            kept = [c for c in ordered if c.id not in removed]
            if kind == "preference":
                ranked = [c for c in kept if c.rank is not None and c.content.strip()]
                rows += [{"id": f"{ranked[0].id}>{worse.id}", "prompt": [dict(m) for m in path],
                          "chosen": ranked[0].content, "rejected": worse.content} for worse in ranked[1:]
                         if worse.rank > ranked[0].rank and worse.content != ranked[0].content]  # fmt: skip
            best = kept[0] if kept else None  # the best of the replies not left out
            nxt = [(c, path, best_path and c is best) for c in ordered]
        else:
            nxt = [(c, path, best_path) for c in node.children]
        todo.extend(reversed(nxt))
