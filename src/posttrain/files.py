"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def naming(path: str | Path):
    """An `OSError` raised inside without a file name (`write()` on a full disk names none) gets `path`, so the
    error a user reads says which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_whole(path: str | Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: `content` (text as UTF-8, bytes, or a function that writes the file it is
    given) goes to a hidden temporary file beside it, which is then renamed over it, so a run killed mid-write
    never leaves half a file for a later run, resume or reader to take for a whole one; a write that fails (a full
    disk) removes its temporary file.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_whole(folder / "a.json", '{"x": 1}'); (folder / "a.json").read_text(), sorted(os.listdir(folder))
    ('{"x": 1}', ['a.json'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming(path):
            if isinstance(content, str):
                tmp.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                content(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOW_SPACE_BYTES = 16 * 2**20
"""Free bytes under which a failed write is put down to a full disk (`out_of_space`)."""


def out_of_space(err: BaseException, folder: str | Path) -> str | None:
    """Why writing into `folder` failed with `err`, when a full disk is the cause: "the disk is full (N MB free)";
    else None. Libraries report it in several ways: an `OSError` with errno ENOSPC or EDQUOT (anywhere in the
    exception's chain), safetensors' "No space left on device" in a message, torch's zip writer a failed write
    position ("unexpected pos ...") or an iostream error, which name no cause: those alone count when under
    `LOW_SPACE_BYTES` are left where it wrote (any other error stays what it is, on a small disk too).

    >>> out_of_space(OSError(28, "No space left on device"), "/")[:17]
    'the disk is full '
    """
    import errno
    import shutil

    place = Path(folder)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        free = None
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or any(
        "no space left" in str(e).lower() or "disk quota" in str(e).lower() for e in chain
    )
    opaque = any(("unexpected pos" in str(e) or "iostream" in str(e) or "basic_ios" in str(e)) for e in chain)
    if not said and not (opaque and free is not None and free < LOW_SPACE_BYTES):
        return None
    return "the disk is full" + (f" ({free / 2**20:.1f} MB free at {place})" if free is not None else "")


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_BLOCKS, _BLOCK = 16, 1 << 16


def weights_digest(path: str | Path, *, loaded_only: bool = True) -> str:
    """A digest of the weights in a file or a folder (the weight files it is loaded from: its safetensors files, or
    else its other weight files, by suffix): each file's relative path, size
    and 16 blocks of 64 KiB spread over it. Not every byte: a 14 GB model read whole would make every resume wait
    a minute, and a model trained further differs in every block.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "w.safetensors"; _ = f.write_bytes(bytes(300_000))
    >>> a = weights_digest(f); _ = f.write_bytes(bytes(299_999) + b"x"); a == weights_digest(f)
    False
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHTS) if path.is_dir() else [path]
    # the files transformers loads: safetensors where a folder has them (a hub repo downloaded whole also holds
    # pytorch_model.bin, which is never read: its arrival changed the digest, "other weights")
    if loaded_only:  # (False: every weight file, as digests were made before; `check_same_weights` compares both)
        files = [f for f in files if f.suffix == ".safetensors"] or files
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for i in range(_BLOCKS):
                fh.seek(max(0, (size - _BLOCK) * i // (_BLOCKS - 1)))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run folder keeps its checkpoints (`trainer.checkpoint`), one `step-NNNNNN` folder each."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run folder's complete checkpoints, oldest first (temporary folders of an interrupted save are ignored);
    here, below every layer, so that what reads a run folder (`models.saving.stale_final`) counts its steps as the
    trainer does."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder that `list_checkpoints` found.

    >>> checkpoint_step(Path("run/checkpoints/step-000040"))
    40
    """
    return int(_STEP_DIR.match(path.name).group(1))
