"""Files written whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_whole(path: str | Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: `content` (text as UTF-8, bytes, or a function that writes the file it is
    given) goes to a hidden temporary file beside it, which is then renamed over it, so a run killed mid-write
    never leaves half a file for a later run, resume or reader to take for a whole one.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_whole(folder / "a.json", '{"x": 1}'); (folder / "a.json").read_text(), sorted(os.listdir(folder))
    ('{"x": 1}', ['a.json'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(content, str):
        tmp.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        content(tmp)
    os.replace(tmp, path)
