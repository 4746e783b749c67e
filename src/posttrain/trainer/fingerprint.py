"""What a run was started on, kept in its folder so that `--resume` continues the same run or says what changed.

`data_fingerprint.json` holds the sha256 of the bytes of `data.train` and `data.eval` (for a `datasets` folder:
every file under it, in sorted order, each with its relative path) and the run's steps per epoch.

Why the bytes of the files, not the rendered examples: the check runs before the tokenizer loads or any row is
rendered (a refused resume costs seconds), it can name the file that changed, and any change to the data is one
the user should hear about before a run mixes two datasets (a different tokenizer or `data.max_length` is
already refused as a config change). Even a change that renders the same (reformatted JSON) is refused: it is
cheap to undo, and "the same bytes" is a rule a user can check with `sha256sum`.

Steps per epoch are recorded because the step number is the data position (`trainer.batches`): resumed with
another number of processes or another posttrain version that cuts epochs differently, the same step would
point at other examples.

`environment.json` holds what the run computes on (`run_environment`): the versions of posttrain and the libraries
that compute, the device (a GPU by name) and the CPU instruction set torch's kernels use, per segment of steps. A
resume on another one is allowed (a run moved to a faster machine is a normal thing to do) but said
(`record_environment`), because its steps are then not bit for bit those the uninterrupted run would have taken.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.files import write_whole

FILE = "data_fingerprint.json"
ENVIRONMENT = "environment.json"
_LIBRARIES = ("posttrain", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "vllm",
              "tokenizers", "jinja2", "gguf", "math-verify", "sympy")  # fmt: skip
"""Whose release changes what a run computes: the kernels and models, the token ids (tokenizers), the chat
templates' rendering (jinja2), the embedded model's conversion (gguf) and the rewards' reading of answers."""
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path and bytes of each, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def data_fingerprint(cfg) -> dict[str, dict[str, str]]:
    """{field: {"path", "sha256"}} for `data.train` and `data.eval`, where set and present on disk."""
    out = {}
    for field in ("train", "eval"):
        path = getattr(cfg.data, field)
        if path and Path(path).exists():
            out[f"data.{field}"] = {"path": str(path), "sha256": file_digest(path)}
    return out


def weights_fingerprint(cfg) -> dict[str, dict[str, str]]:
    """{setting: {"path", "sha256"}} for the models a run starts from (`model.name`, `algorithm.reward_model`, a
    `reward_model` reward's `path`): `models.saving.model_digest`, the `weights_digest` of a local folder (a run folder's `final/`) or file, of
    the embedded model's GGUF file, or of a hub model's cached snapshot; a model that cannot be located now is left
    out (its setting is checked by name as a config change)."""
    from posttrain.models.saving import model_digest

    named = [("model.name", cfg.model.name), ("algorithm.reward_model", getattr(cfg.algorithm, "reward_model", None))]
    named += [(f"algorithm.rewards[{i}]", spec.get("args", {}).get("path"))
              for i, spec in enumerate(getattr(cfg.algorithm, "rewards", None) or [])
              if isinstance(spec, dict) and spec.get("name") == "reward_model" and isinstance(spec.get("args"), dict)]  # fmt: skip
    out = {}
    for setting, name in named:
        if isinstance(name, str) and name and (digest := model_digest(name)):
            out[setting] = {"path": name, "sha256": digest}
    return out


def check_same_weights(run_dir: Path, recorded: dict, current: dict) -> None:
    """Refuse a resume whose base model (or reward model) holds other weights than the run started from: a
    `model.name` folder trained further (a run's own final/), or replaced; the checkpoints hold only what the run
    trains (an adapter) or start from them, so the resumed steps would mix two models."""
    from posttrain.models.saving import model_digest

    changed = [f"{setting} ({old['path']})" for setting, old in recorded.items()
               if setting.startswith(("model.name", "algorithm.reward")) and setting in current
               and current[setting]["sha256"] != old["sha256"] and _comparable(old["sha256"])
               # a digest of every weight file, as made before it read only the files a model loads
               and model_digest(current[setting]["path"], loaded_only=False) != old["sha256"]]  # fmt: skip
    if changed:
        raise ConfigError(
            f"--resume: the weights of {' and '.join(changed)} changed since {run_dir} was started (a digest of "
            f"the weight files, recorded in {Path(run_dir) / FILE}); a resumed run must continue from the same "
            "model. Restore it, or set run.output_dir to a new folder to start a run from the new weights."
        )


def _comparable(recorded: str) -> bool:
    """Whether a recorded weights digest is one this version makes: a run started by the first version that kept
    them recorded a hub model's revision, and a run folder's top folder (the sha256 of no file), which its resume
    must not take for changed weights."""
    return not recorded.startswith("revision ") and recorded != hashlib.sha256().hexdigest()


def write_fingerprint(run_dir: Path, fingerprint: dict, steps_per_epoch: int) -> None:
    _write_json(Path(run_dir) / FILE, {**fingerprint, "steps_per_epoch": steps_per_epoch})


def read_fingerprint(run_dir: Path) -> dict | None:
    """The recorded fingerprint, or None for a run folder that has none (started before posttrain kept one)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path}: unreadable; restore it or start a new run folder") from None


def check_same_data(run_dir: Path, recorded: dict, current: dict) -> None:
    """Refuse a resume whose data files differ from the ones the run was started on, naming each file."""
    changed = []
    for field in ("data.train", "data.eval"):
        old, new = recorded.get(field), current.get(field)
        if old is not None and (new is None or old["sha256"] != new["sha256"]):
            changed.append(f"{field} ({old['path']})")
    if changed:
        raise ConfigError(
            f"--resume: {' and '.join(changed)} changed since {run_dir} was started (sha256 of the file's bytes, "
            f"recorded in {Path(run_dir) / FILE}); a resumed run must continue on the same data. Restore the "
            "original file, or set run.output_dir to a new folder to train on the new data."
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def inputs_fingerprint(cfg) -> dict[str, dict[str, str]]:
    """{what: {"path", "sha256"}} for what else a run's steps depend on and its config does not hold: the files
    of the reward functions it imports (`algorithm.rewards`' `file.py:function`) and the tokenizer and chat
    template files of a local `model.name` folder (the rows' tokens). A resume refuses the tokenizer files changed
    and says a reward file changed (`check_same_inputs`): a rewritten reward scored steps 3-4 of a resumed run 92
    where steps 1-2 scored 0.1, and an edited template trained other tokens, both silently."""
    from posttrain.models.saving import model_folder
    from posttrain.rewards.spec import is_file_spec

    out = {}
    specs = cfg.algorithm.reward_specs() if hasattr(cfg.algorithm, "reward_specs") else []
    for i, spec in enumerate(specs):
        name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and is_file_spec(name):
            path = Path(name.rpartition(":")[0]).expanduser()
            if path.is_file():
                out[f"algorithm.rewards[{i}] file"] = {"path": str(path.resolve()), "sha256": file_digest(path)}
    if digest := tokenizer_digest(cfg.model.name):
        out["model.name tokenizer"] = {"path": str(model_folder(Path(cfg.model.name).expanduser())), "sha256": digest}
    return out


def tokenizer_digest(name: str) -> str | None:
    """sha256 of the tokenizer and chat template files of a local model folder (a run folder's `final/`), None for
    a model that is not one (a hub name, the embedded model: their weights' digest covers them)."""
    from posttrain.models.saving import model_folder

    folder = Path(name).expanduser()
    if not folder.is_dir():
        return None
    folder = model_folder(folder)
    files = [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def check_same_inputs(run_dir: Path, recorded: dict, current: dict) -> str | None:
    """Refuse a resume whose model tokenizer or chat template files changed since the run began (the rows would be
    other tokens from the checkpoint on); return a warning for a reward file that changed (`inputs_fingerprint`):
    rewriting a reward that failed on every sample and resuming is how such a run is saved (the run's own stop
    message says so), but the steps from the checkpoint on are then scored by another function, which is said.
    A file not found now is the reward loader's to say (a relative path read from another folder)."""
    def changed(k: str) -> bool:
        return k in current and current[k]["sha256"] != recorded[k]["sha256"]

    if "model.name tokenizer" in recorded and changed("model.name tokenizer"):
        raise ConfigError(
            f"--resume: the tokenizer or chat template files of model.name ({recorded['model.name tokenizer']['path']}) "
            f"changed since {run_dir} was started (recorded in {Path(run_dir) / FILE}): the rows would be other tokens "
            "from the checkpoint on than before it. Restore the files, or set run.output_dir to a new folder to "
            "start another run."
        )
    rewritten = [f"{k.removesuffix(' file')} ({recorded[k]['path']})" for k in recorded if k.endswith(" file") and changed(k)]
    if not rewritten:
        return None
    return (f"warning: the reward file of {' and '.join(rewritten)} changed since {run_dir} was started: the steps "
            "from the checkpoint on are scored by the function as it is now, those before it by the one it was")


def check_same_plan(run_dir: Path, recorded: dict | None, steps_per_epoch: int) -> None:
    """Refuse a resume whose epochs would be cut into another number of steps (the step is the data position)."""
    if recorded is None or recorded.get("steps_per_epoch") in (None, steps_per_epoch):
        return
    raise ConfigError(
        f"--resume: {run_dir} was started with {recorded['steps_per_epoch']} steps per epoch and this run would "
        f"have {steps_per_epoch} (another number of processes, or a posttrain version that cuts epochs "
        "differently), so its step numbers would point at other examples. Resume with the same number of "
        "processes, or set run.output_dir to a new folder."
    )


def run_environment(device) -> dict[str, str | None]:
    """What this process computes on: posttrain's and the computing libraries' versions (None: not installed), the
    Python release, the device (`cpu`, or a GPU's name), the instruction set of torch's CPU kernels (AVX2 and
    AVX-512 kernels sum in other orders) and torch's thread count (a sum over more than 65,536 float32 values splits
    into per-thread parts: a logged loss differed in its 7th digit between 1 and 2 threads)."""
    import platform
    from importlib import metadata

    import torch

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    device = torch.device(device)
    return {
        **{name: version(name) for name in _LIBRARIES},  # posttrain's as installed (importing it here is a cycle)
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def record_environment(run_dir: Path, now: dict, *, resumed_at: int | None = None) -> str | None:
    """Keep what the run computes on in its environment.json, as `segments`: each the step it starts after and the
    environment (`run_environment`) the steps from there ran on. A new run (`resumed_at` None) writes its first
    segment; a resume from step `resumed_at` on another environment than the last segment's adds one and returns
    the note naming what differs (None: the same, or nothing known to compare with: a folder from before this
    record, or a file that cannot be read, which then starts the record at this resume)."""
    path = Path(run_dir) / ENVIRONMENT
    recorded = _segments(path) if resumed_at is not None else []
    # a segment from this step on was abandoned (its run stopped before saving past it): these steps run again
    segments = [x for x in recorded if x["step"] < resumed_at] if resumed_at is not None else []
    last = segments[-1] if segments else None
    if last is not None:
        # what the last segment recorded (a record from before a field was added says nothing of it)
        changed = [f"{k} {last.get(k)} -> {v}" for k, v in now.items() if k in last and last[k] != v]
        if not changed:
            if len(segments) < len(recorded):  # an abandoned segment dropped
                _write_json(path, {"segments": segments})
            return None
    segments.append({"step": resumed_at or 0, **now})
    _write_json(path, {"segments": segments})
    if last is None:
        return None
    return (f"note: this resume computes on another machine or software than steps {last['step'] + 1}-{resumed_at} "
            f"ran on ({'; '.join(changed)}; {ENVIRONMENT}): the loss is the same function, but float rounding "
            f"differs, so the steps after step {resumed_at} are not bit for bit those the uninterrupted run would have "
            "taken")


def _segments(path: Path) -> list[dict]:
    """environment.json's segments; [] for a missing file or one whose shape is not the record's."""
    try:
        segments = json.loads(path.read_text(encoding="utf-8"))["segments"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    ok = isinstance(segments, list) and all(isinstance(x, dict) and isinstance(x.get("step"), int) for x in segments)
    return list(segments) if ok else []


def _write_json(path: Path, data: dict) -> None:
    write_whole(path, json.dumps(data, indent=1))
