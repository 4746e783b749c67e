"""YAML files a user writes (run configs, study settings, advisor profiles, GPU tables): read with PyYAML, plus
the two things its `safe_load` does not give.

- A mapping key written twice is an error naming both lines (`safe_load` silently keeps the second value).
- Where each key was written (`lines`: dotted key -> 1-based line; a list's items as `.0`, `.1`, the way
  pydantic locates a field), so that an error about a field's value can name the line to fix (`line_of`).
"""

from __future__ import annotations

from typing import Any

import yaml

from posttrain.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"  # `<<: *anchor` is not a setting of its own


def _duplicate_keys(node: yaml.Node, path: str, source: str, seen_nodes: set[int], hint: str = "") -> None:
    """Raise for the first mapping key written twice under `node` (PyYAML itself keeps the last one silently)."""
    if id(node) in seen_nodes:  # an alias of a node already checked (or a recursive structure)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                _duplicate_keys(value_node, path, source, seen_nodes, hint)
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            dotted = f"{path}.{key}" if path else key
            if key in lines:
                raise ConfigError(
                    f"{source}:{line}: {dotted} is given twice (lines {lines[key]} and {line}); YAML would "
                    f"silently keep only the second one. Delete one of them{hint}"
                )
            lines[key] = line
            _duplicate_keys(value_node, dotted, source, seen_nodes, hint)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", source, seen_nodes, hint)


def _key_lines(node: yaml.Node, path: str, out: dict[str, int], seen_nodes: set[int]) -> None:
    """Record the line of every key (and list item) under `node` in `out`, by dotted path. An alias's keys are
    recorded where the anchor was written only: the alias's own line stands for them (`line_of` falls back to
    the nearest enclosing key)."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                _key_lines(value_node, path, out, seen_nodes)
                continue
            dotted = f"{path}.{key_node.value}" if path else str(key_node.value)
            out.setdefault(dotted, key_node.start_mark.line + 1)
            _key_lines(value_node, dotted, out, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{path}.{i}" if path else str(i)
            out.setdefault(dotted, item.start_mark.line + 1)
            _key_lines(item, dotted, out, seen_nodes)


def load_yaml(text: str, source: str, prefix: str = "", lines: dict[str, int] | None = None, *,
              hint: str = "") -> Any:  # fmt: skip
    """`yaml.safe_load`, but a key written twice in any mapping is a `ConfigError` naming both lines and the
    dotted key (`prefix` starts it: an override's own key; `hint` ends the message). `lines`, when given, receives
    each key's line.
    Malformed YAML raises PyYAML's own `yaml.YAMLError` (its `problem_mark` has the line) for the caller to name.

    >>> where = {}
    >>> load_yaml("optim:\\n  lr: 1.0e-4\\nrewards:\\n  - name: exact\\n", "run.yaml", lines=where)
    {'optim': {'lr': 0.0001}, 'rewards': [{'name': 'exact'}]}
    >>> where
    {'optim': 1, 'optim.lr': 2, 'rewards': 3, 'rewards.0': 4, 'rewards.0.name': 4}
    """
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        _duplicate_keys(node, prefix, source, set(), hint)
        if lines is not None:
            _key_lines(node, prefix, lines, set())
    return yaml.safe_load(text)


def line_of(where: str, lines: dict[str, int] | None) -> int | None:
    """The line of the field at dotted path `where`, or of the nearest key above it that the file writes (a
    missing field: its section's line); None when the file writes none of them.

    >>> line_of("optim.lr", {"optim": 1, "optim.lr": 2})
    2
    >>> line_of("optim.eps", {"optim": 1, "optim.lr": 2})
    1
    >>> line_of("run.seed", {"optim": 1}) is None
    True
    """
    parts = where.split(".")
    for n in range(len(parts), 0, -1):
        if (line := (lines or {}).get(".".join(parts[:n]))) is not None:
            return line
    return None
