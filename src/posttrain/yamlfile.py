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


def _walk(node: yaml.Node, path: str, shown: str, source: str, hint: str, lines: dict[str, int] | None,
          seen_nodes: set[int]) -> None:  # fmt: skip
    """Raise for the first mapping key written twice under `node` (PyYAML itself keeps the last one silently,
    named `shown`: a list item as ``[i]``), and record in `lines` (when given) the line of every key and list
    item by dotted `path` (a list item as ``.i``). An alias of a node already walked is not walked again: its keys
    keep the anchor's lines, and `line_of` falls back to the nearest enclosing key."""
    if id(node) in seen_nodes:  # an alias of a node already walked (or a recursive structure)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                _walk(value_node, path, shown, source, hint, lines, seen_nodes)
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            dotted, named = (f"{path}.{key}" if path else key), (f"{shown}.{key}" if shown else key)
            if key in first:
                raise ConfigError(
                    f"{source}:{line}: {named} is given twice (lines {first[key]} and {line}); YAML would "
                    f"silently keep only the second one. Delete one of them{hint}"
                )
            first[key] = line
            if lines is not None:
                lines.setdefault(dotted, line)
            _walk(value_node, dotted, named, source, hint, lines, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{path}.{i}" if path else str(i)
            if lines is not None:
                lines.setdefault(dotted, item.start_mark.line + 1)
            _walk(item, dotted, f"{shown}[{i}]", source, hint, lines, seen_nodes)


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
    loader = yaml.SafeLoader(text)  # parsed once: the checked node is the one built (as `yaml.safe_load` does)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _walk(node, prefix, prefix, source, hint, lines, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError, source: str) -> str:
    """PyYAML's error for malformed YAML in `source`, as one line naming the line it found.

    >>> try:
    ...     yaml.safe_load("a: [1,\\n")
    ... except yaml.YAMLError as err:
    ...     print(yaml_problem(err, "run.yaml"))
    run.yaml:2: not valid YAML: expected the node content, but found '<stream end>'
    """
    mark = getattr(err, "problem_mark", None)
    where = f":{mark.line + 1}" if mark is not None else ""
    return f"{source}{where}: not valid YAML: {getattr(err, 'problem', err)}"


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
