"""Scores kept beside the data that made them, keyed by everything that made them, so that a rerun reuses them.

The quickstart scores the base model on its held-out prompts before training (a minute of greedy decoding on
a CPU); the base model does not change between runs, so a second run, or a rerun after an interruption, reads
the scores back instead. A cached score is reused only when its key is the one the run would compute now:

- `model`: the sha256 of the model's files (`trainer.fingerprint.file_digest` of the resolved folder or GGUF
  file: weights, config and tokenizer), so a reconverted or replaced model is scored again;
- `rows`: the sha256 of the held-out file's bytes (the same digest `data_fingerprint.json` keeps);
- `decoding`: how the answers were generated and scored (greedy or the temperature, `max_new_tokens`, the batch
  size, which decides padding and so float rounding; the task whose verifier scored them, with the sha256 of the
  code that defines it, and posttrain's version with the sha256 of all its code (`code_digest`), so any change of
  the code that generates or scores, an upgrade or a local edit, scores again (the version alone stayed 0.1.0 while
  the code changed, and a changed `pair_accuracy` reused the old scores: an audit); whatever else the caller names
  in `extra`), the torch and transformers versions that decoded them, and the
  machine: the device (a GPU by name), the dtype the model decodes in (`model.dtype: auto` is bfloat16 on a GPU)
  and, on a CPU, the instruction set torch's kernels use (`torch.backends.cpu.get_cpu_capability()`: AVX2 and
  AVX-512 kernels sum in other orders, so a greedy answer can differ). A run folder moved to another machine
  scores its base model again.

A file that cannot be read as a cache (cut by a kill mid-write, edited by hand) is scored again with a warning
on stderr; a key that differs is scored again, and `lookup` says which part differed. The
file is written to a temporary name and renamed, so a reader never sees half of it. The layout,
``{"scores": {...}, "made_from": {...}}``, is read by `posttrain report` (`report.rundata`), which shows the
scores of a run that has not finished.

This module does not decide what to score or how; it only stores and matches.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path

from posttrain.files import write_whole
from posttrain.models.loading import default_device, resolve_dtype, resolve_model
from posttrain.trainer.fingerprint import file_digest


def model_digest(name: str) -> str | None:
    """sha256 of a model's files on this machine (`file_digest` of its folder or GGUF file), or None for a hub
    name: its files are in the hub cache under a revision this module does not track, so it is never cached."""
    resolved = resolve_model(name)
    if resolved.source == "hub":
        return None
    return file_digest(Path(resolved.path) / (resolved.gguf_file or ""))


@lru_cache(maxsize=4)
def code_digest(root: Path | None = None) -> str:
    """sha256 of posttrain's own code: every `.py` file of the package (`root`, default the one imported), by its
    path within the package and its bytes (so the same code gives the same digest wherever it is installed). Read
    once per process."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def decoding_settings(*, max_new_tokens: int, batch_size: int, temperature: float = 0.0, dtype: str = "auto",
                      device=None, task: str | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """The `decoding` part of a key: the generation settings, the versions of the libraries that decode, and the
    machine that decodes (`device`, default `default_device()`; `dtype`: the model's `model.dtype`); the `task`
    whose verifier scores, by the digest of its code, and posttrain's version; `extra` settings of the caller's."""
    import inspect
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    from posttrain.data import TASKS

    try:
        ours = version("posttrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = None

    device = torch.device(device) if device is not None else default_device()
    verifier = None
    if task is not None:
        verifier = {"task": task, "sha256": file_digest(inspect.getfile(type(TASKS[task])))}
    return {
        "posttrain": ours,
        "code": code_digest(),
        "verifier": verifier,
        **(extra or {}),
        "temperature": float(temperature),
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."),
        "cpu": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
    }


def scores_key(model: str, rows_file: str | Path, decoding: dict) -> dict | None:
    """What made a set of scores (module docstring), or None when the model cannot be fingerprinted."""
    digest = model_digest(model)
    if digest is None:
        return None
    return {"model": {"name": model, "sha256": digest}, "rows": {"path": str(rows_file),
            "sha256": file_digest(rows_file)}, "decoding": decoding}  # fmt: skip


WHAT = {"model": "model files", "rows": "held-out rows", "decoding": "decoding settings"}


def _comparable(key: dict) -> dict:
    """The parts of a key that must match: digests and settings, not where the files were (a moved run folder
    or a renamed model path with the same bytes still matches)."""
    return {"model": key["model"]["sha256"], "rows": key["rows"]["sha256"], "decoding": key["decoding"]}


def lookup(path: Path, key: dict | None) -> tuple[dict | None, str | None]:
    """(the scores in `path`, None) when they were made from `key`; else (None, why not, in words: no file,
    other model files, other rows, other decoding settings, or an unreadable file, which also warns on stderr)."""
    if key is None:
        return None, "the model is a hub name, whose files are not fingerprinted"
    if not path.is_file():
        return None, "no cached scores yet"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and "made_from" not in cached and "scores" not in cached:
            return None, "the cached scores do not say what made them (written by an older posttrain)"
        made_from, scores = _comparable(cached["made_from"]), cached["scores"]
        if not isinstance(scores, dict):
            raise TypeError("'scores' is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        print(f"warning: {path} cannot be read as cached scores ({type(err).__name__}: {err}); scoring again "
              "and writing it anew", file=sys.stderr)  # fmt: skip
        return None, "the cached file was unreadable"
    now = _comparable(key)
    changed = [WHAT[part] for part in WHAT if made_from[part] != now[part]]
    if changed:
        return None, f"the {' and '.join(changed)} changed since they were cached"
    return scores, None


def write_scores(path: Path, key: dict | None, scores: dict) -> None:
    """`scores` and the key they were made from, written to a temporary file and renamed into `path`. Without
    a key (a hub model) the scores are still written, for the report, and never match a later key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    made_from = key if key is not None else {"model": {"sha256": None}, "rows": {"sha256": None}, "decoding": None}
    write_whole(path, json.dumps({"scores": scores, "made_from": made_from}, indent=1))
