"""Models: find and load a causal LM (embedded default, local folder, GGUF, hub), LoRA/QLoRA, log-probabilities,
generation, saving and merging.

Importing this package is cheap: torch is the only heavy import; transformers, peft and bitsandbytes load when a
function needs them.
"""

from posttrain.models.adapters import (
    apply_lora,
    bnb_config,
    enable_gradient_checkpointing,
    is_adapter_model,
    lora_config,
)
from posttrain.models.generation import generate, render_prompt
from posttrain.models.loading import (
    EMBEDDED_MODELS,
    ResolvedModel,
    cache_root,
    convert_gguf,
    describe_trainable,
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from posttrain.models.logprobs import chunked_token_logps, gather_logps, selected_token_logps
from posttrain.models.saving import load_trained, merge_adapter, read_info, save_model

__all__ = [
    "EMBEDDED_MODELS",
    "ResolvedModel",
    "apply_lora",
    "chunked_token_logps",
    "gather_logps",
    "bnb_config",
    "cache_root",
    "convert_gguf",
    "describe_trainable",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "generate",
    "is_adapter_model",
    "load_model",
    "load_tokenizer",
    "load_trained",
    "lora_config",
    "merge_adapter",
    "read_info",
    "render_prompt",
    "resolve_dtype",
    "resolve_model",
    "save_model",
    "selected_token_logps",
]
