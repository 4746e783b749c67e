"""Model architectures the estimator knows, and how a model argument becomes one.

A model argument is one of: a name from `ARCHITECTURES` (shapes copied from each model's published
`config.json` on the Hugging Face hub), a size such as ``7b``, ``1.5b``, ``135m`` or ``7e9``, or a local
`config.json` (or a folder holding one). Parameter counts are computed from the shapes, never typed in, so
they cannot drift from them.

This module does no memory or cost arithmetic; it only describes models.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from posttrain.errors import UserError


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer with a gated (SwiGLU) MLP, as in Llama, Mistral, Qwen2, SmolLM2."""

    name: str
    hidden: int  # h
    layers: int  # L
    heads: int  # a
    kv_heads: int  # grouped-query attention: K and V have kv_heads heads of head_dim
    intermediate: int  # f, the MLP width
    vocab: int  # V
    tied: bool  # LM head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    hf_id: str = ""  # the hub name a `posttrain train` config can load
    params_override: float | None = None  # set when the user gave a size: the shape is borrowed
    lean: bool = True  # a family whose layers posttrain trains with `models.layers.lean_layers` (fewer activations)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of the 7 linear maps of one block: q, k, v, o, gate, up, down."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]

    @property
    def block_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes)

    @property
    def block_params(self) -> int:
        bias = (self.hidden + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.block_linear_params + bias + 2 * self.hidden  # + two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def exact_params(self) -> int:
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.layers * self.block_params + self.hidden  # + final norm

    @property
    def params(self) -> float:
        return self.params_override if self.params_override is not None else float(self.exact_params)

    @property
    def linear_params(self) -> float:
        """Parameters in the blocks' linear layers: what QLoRA/int8 quantise and LoRA adapts.

        Embeddings, LM head and norms stay 16-bit in QLoRA (Dettmers et al. 2023, and peft/bitsandbytes
        skip `lm_head`); for a borrowed shape the fraction of the real model is kept.
        """
        frac = self.layers * self.block_linear_params / self.exact_params
        return self.params * frac

    def lora_params(self, rank: int) -> float:
        """LoRA adds r x (d_in + d_out) parameters per adapted matrix (Hu et al. 2021, sec. 4.1);
        here every linear map of every block is adapted (`target_modules: all-linear`)."""
        per_rank = self.layers * sum(i + o for i, o in self.linear_shapes)
        scale = math.sqrt(self.params / self.exact_params)  # adapters grow with width ~ sqrt(params)
        return rank * per_rank * scale

    @property
    def largest_layer_params(self) -> float:
        """The biggest single module (embedding or one block), for ZeRO-3's gather buffers."""
        return max(self.embed_params, self.block_params) * (self.params / self.exact_params)


def _a(name, h, layers, heads, kv, f, vocab, tied, hf_id, bias=False) -> Arch:
    return Arch(name, h, layers, heads, kv, f, vocab, tied, bias, hf_id)


LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2"})
"""config.json `model_type`s whose decoder layers `models.layers.lean_layers` patches (its `DECODER_LAYERS`)."""

# Shapes from each model's config.json on the Hugging Face hub (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings).
ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in [
        _a("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, False, "meta-llama/Llama-2-7b-hf"),
        _a("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, False, "meta-llama/Llama-2-13b-hf"),
        _a("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, False, "meta-llama/Llama-2-70b-hf"),
        _a("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, False, "meta-llama/Meta-Llama-3-8B"),
        _a("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, False, "meta-llama/Meta-Llama-3-70B"),
        _a("mistral-7b", 4096, 32, 32, 8, 14336, 32000, False, "mistralai/Mistral-7B-v0.1"),
        _a("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True, "Qwen/Qwen2.5-0.5B", bias=True),
        _a("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True, "Qwen/Qwen2.5-1.5B", bias=True),
        _a("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, "Qwen/Qwen2.5-7B", bias=True),
        _a("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False, "Qwen/Qwen2.5-14B", bias=True),
        _a("qwen2.5-32b", 5120, 64, 40, 8, 27648, 152064, False, "Qwen/Qwen2.5-32B", bias=True),
        _a("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, False, "Qwen/Qwen2.5-72B", bias=True),
        _a("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, "HuggingFaceTB/SmolLM2-135M"),
        _a("smollm2-360m", 960, 32, 15, 5, 2560, 49152, True, "HuggingFaceTB/SmolLM2-360M"),
        _a("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, "HuggingFaceTB/SmolLM2-1.7B"),
    ]
}

# Other spellings of the same shapes (instruct/chat variants share the base model's shape).
ALIASES = {
    "llama2-7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b",
    "llama2-70b": "llama-2-70b",
    "llama-3.1-8b": "llama-3-8b",
    "llama3-8b": "llama-3-8b",
    "meta-llama-3-8b": "llama-3-8b",
    "llama-3.1-70b": "llama-3-70b",
    "llama3-70b": "llama-3-70b",
    "meta-llama-3-70b": "llama-3-70b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b-v0.3": "mistral-7b",
}

_SUFFIXES = ("-instruct", "-chat", "-hf", "-it", "-base")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
_UNIT = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def normalise_name(name: str) -> str:
    """Lower-case, drop the hub owner and the instruct/chat suffixes.

    >>> normalise_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    'smollm2-135m'
    """
    key = name.strip().lower().rsplit("/", 1)[-1]
    changed = True
    while changed:
        changed = False
        for s in _SUFFIXES:
            if key.endswith(s):
                key, changed = key[: -len(s)], True
    return ALIASES.get(key, key)


def parse_size(text: str) -> float | None:
    """A parameter count from ``7b``, ``1.5B``, ``135m`` or ``7e9``; None if `text` is not a size.

    >>> parse_size("1.5b"), parse_size("135m"), parse_size("7e9"), parse_size("llama")
    (1500000000.0, 135000000.0, 7000000000.0, None)
    """
    m = _SIZE.match(text)
    if not m:
        return None
    value = float(m.group(1)) * _UNIT[m.group(2).lower()]
    if value <= 0:
        raise UserError(f"model size {text!r} must be positive (e.g. 7b, 1.5b, 135m)")
    if value < 1e6 and not m.group(2):
        return None  # a bare small number is more likely a typo than a model size
    return value


def nearest_arch(params: float) -> Arch:
    """The known architecture closest in log-parameter count: its shape stands in for an unnamed size."""
    return min(ARCHITECTURES.values(), key=lambda a: abs(math.log(a.exact_params / params)))


def _from_config_json(path: Path) -> Arch:
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{file}: cannot read a model config.json ({err})") from None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's shape

    def need(key: str, default=None) -> int:
        # a shape: a whole number above 0 (0 heads divided by zero, a null vocabulary was a TypeError, -2 layers
        # gave negative parameters)
        value = cfg.get(key)
        if value is None and default is not None:  # absent or null: the default (grouped-query heads: all heads)
            value = default
        elif key not in cfg:
            raise UserError(f"{file}: key {key!r} is missing; the estimator needs the model's shape from it")
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 1 \
                or value > 1e12 or value != int(value):
            raise UserError(f"{file}: {key} must be a whole number above 0 (a model's shape), got {value!r}")
        return int(value)

    heads = need("num_attention_heads")
    return Arch(
        name=str(cfg.get("_name_or_path") or file.parent.name or file.stem),
        hidden=need("hidden_size"),
        layers=need("num_hidden_layers"),
        heads=heads,
        kv_heads=need("num_key_value_heads", heads),
        intermediate=need("intermediate_size"),
        vocab=need("vocab_size"),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2"),
        hf_id=str(path),
        lean=cfg.get("model_type", "llama") in LEAN_MODEL_TYPES,
    )


def resolve_model(model: str | float | int) -> tuple[Arch, list[str]]:
    """The architecture for a model argument, and the assumptions made to get it."""
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        if model <= 0:
            raise UserError(f"model size {model} must be a positive parameter count (e.g. 7e9)")
        model = f"{float(model):g}"
    if not isinstance(model, str) or not model.strip():
        raise UserError("model must be a name (e.g. llama-3-8b), a size (e.g. 7b) or a path to config.json")
    key = normalise_name(model)
    if key in ARCHITECTURES:
        return ARCHITECTURES[key], []
    size = parse_size(model)
    if size is not None:
        base = nearest_arch(size)
        note = (
            f"model {model!r} is a size only: {size / 1e9:g}B parameters with the shape (layers, hidden, "
            f"heads, vocabulary {base.vocab:,}) of {base.name} for activations, logits and KV cache"
        )
        return replace(base, name=model, params_override=size), [note]
    path = Path(model).expanduser()
    if path.exists():
        return _from_config_json(path), [f"model shape read from {path}"]
    names = sorted(ARCHITECTURES) + sorted(ALIASES)
    close = difflib.get_close_matches(key, names, n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {model!r}: not a known architecture, a size (like 7b or 135m) or an existing "
        f"config.json path.{hint} Known: {', '.join(sorted(ARCHITECTURES))}."
    )
