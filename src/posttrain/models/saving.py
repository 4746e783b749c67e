"""Save a trained model or adapter, load it back, and merge a LoRA adapter into its base.

A saved folder holds safetensors weights (the full model, or only the LoRA adapter), the tokenizer, and
`posttrain_model.json` saying what it is:

    {"kind": "adapter" | "full", "technique": "full" | "lora" | "qlora" | "merged", "base_model": NAME, ...}

`base_model` is the name the run used (e.g. `smollm2-135m-instruct`), resolved again with `resolve_model` when
the folder is loaded, so an adapter trained on the embedded model loads on any machine with the wheel. This
module does not write checkpoints (optimizer, RNG, data position): that is the trainer's job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.errors import ModelNotFoundError, UserError
from posttrain.files import checkpoint_step, list_checkpoints, weights_digest
from posttrain.models.adapters import is_adapter_model
from posttrain.models.generation import eos_token_ids
from posttrain.models.hub import prepare_hub_libraries, quiet_loading
from posttrain.models.loading import default_device, load_model, resolve_dtype, resolve_model

INFO_FILE = "posttrain_model.json"
HEAD_FILE = "score_head.safetensors"
"""A scalar head (`models.heads.ScalarHeadModel`) saved beside the model: its weights..."""
HEAD_INFO = "score_head.json"
"""...and its kind ("reward" or "value") and hidden size."""


def _unwrap(model):
    # A model wrapped by accelerate/DDP keeps the real one in `.module`.
    return getattr(model, "module", model)


def save_model(model, tokenizer, out_dir: str | Path, *, base_model: str | None = None,
               state_dict: dict | None = None, step: int | None = None) -> Path:
    """Write the adapter (LoRA/QLoRA) or the full model as safetensors, the tokenizer and `posttrain_model.json`.

    `base_model` defaults to the name recorded by `load_model` (`model.posttrain_info`). `state_dict`: the weights
    to write instead of the model's own (a sharded model's, gathered by `models.sharding.full_state`). `step`: the
    training step the weights are of, recorded (a run's `final/`, which a resume checks against its last step).
    """
    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(getattr(model, "posttrain_info", None) or {})
    if base_model is not None:
        info["base_model"] = base_model
    adapter = is_adapter_model(model)
    if adapter:
        info["technique"] = (
            "qlora" if getattr(model, "is_loaded_in_4bit", False) else info.get("technique", "lora")
        )
    else:
        info.setdefault("technique", "full")
        if info["technique"] in ("lora", "qlora"):  # the adapter was merged or removed: a plain model now
            info["technique"] = "full"
    if not info.get("base_model"):
        info["base_model"] = getattr(model.config, "_name_or_path", None) or getattr(
            getattr(model, "peft_config", {}).get("default", None), "base_model_name_or_path", None
        )
    if info.get("base_model") and (local := Path(str(info["base_model"])).expanduser()).exists():
        # a local folder or file by its absolute path: an adapter trained on `runs/sft/final` loaded only from the
        # folder it was trained in, its base named relative to there
        info["base_model"] = str(local.resolve())
    if adapter and info.get("base_model") and (base := model_digest(str(info["base_model"]))):
        info["base_sha256"] = base  # the weights it was trained on: loaded onto others, it is another model
    with _stops_in_generation_config(model, tokenizer, adapter):
        model.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(out)
    info["kind"] = "adapter" if adapter else "full"
    if step is not None:
        info["step"] = step
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def _stops_in_generation_config(model, tokenizer, adapter: bool):
    """While a full model is saved, its generation config's `eos_token_id` lists every token that ends a
    completion (`generation.eos_token_ids`: the chat template's end-of-turn token with the EOS): a base whose EOS
    is `<|endoftext|>` and whose template closes turns with `<|im_end|>` (Qwen2.5 and Gemma bases) was saved
    stopping on EOS alone, so plain transformers' `generate` ran past every trained stop. The model's own config
    is left as it was afterwards. An adapter folder saves no generation config (its base's is used)."""
    gen = getattr(model, "generation_config", None)
    if adapter or gen is None:
        yield
        return
    before = gen.eos_token_id
    stops = eos_token_ids(model, tokenizer)
    first = tokenizer.eos_token_id if tokenizer.eos_token_id in stops else stops[0] if stops else None
    ordered = [first, *(i for i in stops if i != first)] if stops else []  # EOS first, as model cards list it
    gen.eos_token_id = ordered[0] if len(ordered) == 1 else ordered or before
    try:
        yield
    finally:
        gen.eos_token_id = before


def model_digest(name: str, *, loaded_only: bool = True) -> str | None:
    """The `weights_digest` of a model named as `model.name` takes it: a local folder (a run folder's `final/`) or
    file, the embedded model's GGUF file, or a hub model's cached snapshot; None when it cannot be located or read
    now."""
    from posttrain.models.loading import EMBEDDED_MODELS, embedded_gguf

    try:
        if name.strip().lower() in EMBEDDED_MODELS:
            return weights_digest(embedded_gguf(name.strip().lower()), loaded_only=loaded_only)
        if Path(name).expanduser().exists():
            return weights_digest(model_folder(Path(name).expanduser()), loaded_only=loaded_only)
        return _hub_digest(name, loaded_only=loaded_only)
    except Exception:  # noqa: BLE001 (unreadable now: a check is not refused for it)
        return None


def _hub_digest(name: str, *, loaded_only: bool = True) -> str | None:
    """The `weights_digest` of a hub model's cached snapshot (not its revision: a model card's commit changes that
    and not the weights), None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(name, "config.json")
    return weights_digest(Path(hit).parent, loaded_only=loaded_only) if isinstance(hit, str) else None


def model_folder(path: Path) -> Path:
    """`path/final` for a run folder (a `final/` and no model of its own), else `path` as it is."""
    if (path / "final").is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return path / "final"
    return path


def _trained_dir(path: str | Path) -> Path:
    """A saved model folder: `path` itself, or `<path>/final` for a run folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"trained model {str(path)!r} not found: no such folder ({p.resolve()}).")
    p = model_folder(p)
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is neither a saved model (config.json), an adapter (adapter_config.json), nor a run "
            "folder with a `final/` model; did the run finish? Its checkpoints are under checkpoints/."
        )
    return p


def read_info(folder: str | Path) -> dict:
    """`posttrain_model.json` of a saved folder, completed from `adapter_config.json` when missing."""
    folder = Path(folder)
    info: dict = {}
    if (folder / INFO_FILE).is_file():
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    if (folder / "adapter_config.json").is_file():
        info.setdefault("kind", "adapter")
        info.setdefault("technique", "lora")
        if not info.get("base_model"):
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            info["base_model"] = cfg.get("base_model_name_or_path")
    else:
        info.setdefault("kind", "full")
    return info


def _load_base_and_adapter(folder: Path, info: dict, *, device, quantised: bool, dequantised: bool = False):
    """The adapter of `folder` on its base: the 4-bit base it trained on (`quantised`), or a full-precision one,
    with the weights of that 4-bit base dequantised into it (`dequantised`: the QLoRA model as trained, in
    weights that can hold a merged update) or the base's own."""
    from peft import PeftModel

    base_name = info.get("base_model")
    if not base_name:
        raise ModelNotFoundError(
            f"{folder}: the adapter does not say which base model it belongs to (no base_model in {INFO_FILE} "
            "or base_model_name_or_path in adapter_config.json)."
        )
    technique = TechniqueConfig(name="qlora") if quantised else TechniqueConfig(name="full")
    if quantised:
        technique.quant_type = info.get("quant_type", "nf4")
        technique.double_quant = info.get("double_quant", True)
    if (trained_on := info.get("base_sha256")) and (now := model_digest(base_name)) and now != trained_on:
        print(f"warning: {folder} is an adapter trained on the weights of {base_name}, and the weights there are not "
              "those any more (replaced, or trained further): the adapter on them is not the model that was trained, "
              "and its answers and scores are not that model's; put the base it was trained on back",
              file=sys.stderr)  # fmt: skip
    base = load_model(ModelConfig(name=base_name), technique, device=device, train=False)
    if dequantised:
        _dequantise_into(base, info)
    model = PeftModel.from_pretrained(base, folder, is_trainable=False)
    model.eval()
    return model


@torch.no_grad()
def _dequantise_into(model, info: dict) -> None:
    """Replace each linear weight of `model` (full precision) that a QLoRA run held in 4 bits by that 4-bit weight,
    dequantised: the weights the adapter was trained against and the QLoRA model computes with."""
    import bitsandbytes as bnb

    technique = TechniqueConfig(name="qlora", quant_type=info.get("quant_type", "nf4"),
                                double_quant=info.get("double_quant", True))  # fmt: skip
    four_bit = load_model(ModelConfig(name=info["base_model"]), technique, device=torch.device("cpu"), train=False)
    modules = dict(model.named_modules())
    for name, module in four_bit.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = modules[name].weight
            target.copy_(weight.to(target.dtype).reshape(target.shape))
    del four_bit


def load_trained(path: str | Path, *, device=None):
    """Load a folder written by `save_model` (or a run folder, meaning `<run>/final`): returns (model, tokenizer).

    An adapter is attached to its base model, loaded as in training: a QLoRA adapter gets the same 4-bit base it
    was trained against. The model is in eval mode with no trainable parameters.
    """
    prepare_hub_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the hub mode settled (`models.hub`)

    folder = _trained_dir(path)
    info = read_info(folder)
    warn_stale_final(path, folder, info)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if info["kind"] == "adapter":
        model = _load_base_and_adapter(
            folder, info, device=device, quantised=info.get("technique") == "qlora"
        )
    else:
        device = torch.device(device) if device is not None else default_device()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype("auto", device)).to(device)
        model.requires_grad_(False)
        model.eval()
    model.posttrain_info = {k: info[k] for k in ("base_model", "technique") if k in info}
    return model, tokenizer


def checkpoint_dtype(name: str | None) -> torch.dtype | None:
    """The floating dtype a base model's checkpoint stores its weights in (its config's `dtype`), or None when
    unknown (a GGUF, which is converted to float32; a config that names none): a merge writes that, so merging a
    bf16 7B model gives 14 GB, not the 28 GB of the float32 it computed in."""
    if not name:
        return None
    from transformers import AutoConfig

    try:
        resolved = resolve_model(name)
        if resolved.gguf_file is not None:
            return None
        config = AutoConfig.from_pretrained(resolved.path)
    except Exception:  # noqa: BLE001 - the base loaded a moment ago; what cannot be read keeps its loaded dtype
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def stale_final(path: str | Path, folder: Path, info: dict) -> str | None:
    """When `path` is a run folder whose `final/` (`folder`, `info`) is older than its newest checkpoint (a finished
    run resumed for more steps and stopped before its end), what using `final/` means, in words; else None."""
    run = Path(path).expanduser()
    step = info.get("step")
    if folder == run or folder.parent != run or not isinstance(step, int):
        return None
    steps = [checkpoint_step(c) for c in list_checkpoints(run)]
    if not steps or max(steps) <= step:
        return None
    return (f"{folder} holds the weights of step {step}, but the run's newest checkpoint is step {max(steps)} (it "
            f"was resumed and stopped before its end): this uses step {step}; to use the newer weights, let the run "
            "finish (posttrain train <its config> --resume)")


def warn_stale_final(path, folder: Path, info: dict) -> None:
    if note := stale_final(path, folder, info):
        print(f"warning: {note}", file=sys.stderr)


def head_kind(folder: str | Path) -> str | None:
    """The scalar head saved beside a model (`heads.HEAD_FILE`): "reward" or "value" (PPO), or None."""
    folder = Path(folder)
    if not (folder / HEAD_FILE).is_file():
        return None
    info = json.loads((folder / HEAD_INFO).read_text(encoding="utf-8")) if (folder / HEAD_INFO).is_file() else {}
    return info.get("kind", "reward")  # as `heads.load_scalar_model` reads a head without its info file


def _check_merge_output(folder: Path, out: Path) -> None:
    """Refuse, before anything loads, an output folder whose replacement would lose work: the adapter itself, a
    folder holding it or inside it, and any non-empty folder but an earlier merge (which a merge replaces)."""
    source, target = folder.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents:
        where = "is" if target == source else "holds" if target in source.parents else "is inside"
        raise UserError(f"--out {out} {where} the adapter being merged ({folder}); choose a new output folder.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            earlier = out.is_dir() and (out / INFO_FILE).is_file() and read_info(out).get("technique") == "merged"
        except (OSError, ValueError):  # a posttrain_model.json that does not read: not known to be a merge
            earlier = False
        if not earlier:
            raise UserError(f"--out {out} exists and is not an earlier merge (only those are replaced); choose an empty "
                            "or new output folder. Nothing was written.")  # fmt: skip


@quiet_loading()
def merge_adapter(path: str | Path, out_dir: str | Path, *, qlora_base: str = "trained") -> Path:
    """Fold a LoRA adapter into its base (W + alpha/r * B A) and save a standalone safetensors model + tokenizer.

    A QLoRA adapter is merged into full-precision weights (4-bit weights cannot hold the update): by default
    (`qlora_base="trained"`) the 4-bit base it trained on, dequantised, so the merged model computes what the
    QLoRA model computed (float rounding apart), the model its evaluation measured; `qlora_base="original"` takes
    the base's own unquantised weights instead (the adapter then corrects a base it never saw: close to, not
    equal to, the trained model). The merge is computed in the precision the base loads in (float32 on a CPU)
    and written in the dtype the base's checkpoint stores (`checkpoint_dtype`: bf16 for most hub models, float32
    for the embedded GGUF). The folder is written to a temporary sibling, then renamed into place.

    A reward model's score head reads the backbone's last hidden states and is not part of the adapter, so it
    is copied as it is: the merged folder is a reward model too (`--judge`, `algorithm.reward_model`). A PPO
    run's value head only served training (advantages); the merged folder is the policy alone, and its
    `posttrain_model.json` says `"dropped_head": "value"`. `head_kind` tells a caller which happened.
    """
    prepare_hub_libraries()
    from transformers import AutoTokenizer

    folder = _trained_dir(path)
    info = read_info(folder)
    if info["kind"] != "adapter":
        raise UserError(f"{folder} holds a full model, not a LoRA adapter: there is nothing to merge.")
    warn_stale_final(path, folder, info)
    if qlora_base not in ("trained", "original"):
        raise UserError(f"qlora_base must be 'trained' or 'original', got {qlora_base!r}")
    out = Path(out_dir)
    _check_merge_output(folder, out)
    dequantised = info.get("technique") == "qlora" and qlora_base == "trained"
    model = _load_base_and_adapter(folder, info, device=torch.device("cpu"), quantised=False, dequantised=dequantised)
    merged = model.merge_and_unload()  # in the precision it loaded in (float32 on a CPU), then stored as the base is
    if (stored := checkpoint_dtype(info.get("base_model"))) is not None and stored != merged.dtype:
        merged.to(stored)
    merged.posttrain_info = {
        "base_model": info.get("base_model"),
        "technique": "merged",
        "merged_from": str(folder),
        **({"qlora_base": qlora_base} if info.get("technique") == "qlora" else {}),
    }
    head = head_kind(folder)
    if head == "value":
        merged.posttrain_info["dropped_head"] = "value"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_model(merged, AutoTokenizer.from_pretrained(folder), tmp, step=info.get("step"))
        if head == "reward":
            for name in (HEAD_FILE, HEAD_INFO):
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
