"""LoRA and QLoRA: the peft and bitsandbytes configuration for a `TechniqueConfig`, and wrapping a model.

LoRA (Hu et al. 2021) freezes the base weights W and learns a low-rank update, W + (alpha / r) * B A, with A
(r x in) and B (out x r); B starts at zero so training starts from the base model. QLoRA (Dettmers et al. 2023)
stores the frozen base linears in 4-bit NormalFloat (NF4) with optional double quantisation of the block
constants, and computes in the run dtype. This module does not load weights (see `loading.py`); bitsandbytes
and peft are imported only when used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from posttrain.config import TechniqueConfig, deepspeed_zero_stage
from posttrain.errors import UserError
from posttrain.models.attention import checkpoint_contexts


def lora_config(technique: TechniqueConfig):
    """The peft `LoraConfig` for a technique section.

    `all-linear` is peft's own shortcut: every `nn.Linear` (or 4-bit linear) except the output layer (LM head),
    which would otherwise add an (r x vocabulary) adapter for little gain.
    """
    from peft import LoraConfig, TaskType

    targets = technique.target_modules
    return LoraConfig(
        r=technique.r,
        lora_alpha=technique.alpha,
        lora_dropout=technique.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def _adaptable(module) -> bool:
    """A layer peft's LoRA can wrap: a linear layer (GPT-2's `Conv1D` is one, transposed), an embedding, or a
    convolution; not a block (an MLP, an attention module) or an activation."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return isinstance(module, kinds) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _linear_names(model) -> list[str]:
    """The short names of a model's linear layers (`nn.Linear` and GPT-2's `Conv1D`: what all-linear adapts)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear | Conv1D) or type(m).__name__ == "Linear4bit"})  # fmt: skip


def lora_target_problem(model, technique: TechniqueConfig) -> str | None:
    """Why `technique.target_modules` cannot be applied to `model` as asked, in the user's words; None when it can.
    `model` may be a copy on the meta device built from the config alone (`check_lora_targets`), so the answer comes
    before any weight loads (it came after the whole load, and named the wrong layers: an audit). Refused: a target
    that matches no layer (a regex string is matched against each module's full name, which the message says); a
    list entry that matches none; a match LoRA cannot wrap (`mlp` matched the MLP blocks, and peft refused their
    activation); and the output layer or input embedding of a model whose two share their weights
    (tie_word_embeddings), where an adapter changes both and a merged model differs from the one trained."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = technique.target_modules
    if technique.name not in ("lora", "qlora") or targets == "all-linear":
        return None
    given = f"technique.target_modules = {targets!r}"
    linear = ", ".join(_linear_names(model))
    config = lora_config(technique)
    matched = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(config, n)]
    if not matched:
        regex = (" (a single string is a regular expression that must match a module's whole name, e.g. "
                 "'model.layers.0.self_attn.q_proj'; give a list of names, [q_proj, v_proj], to match by name)"
                 if isinstance(targets, str) else "")  # fmt: skip
        return f"{given} matches no layer of this model{regex}; its linear layers are named {linear} (or use all-linear)"
    if not isinstance(targets, str):
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in matched)]
        if unmatched:
            return (f"{given}: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no layer of this "
                    f"model, so {'it' if len(unmatched) == 1 else 'they'} would get no adapter; its linear layers are "
                    f"named {linear} (or use all-linear)")  # fmt: skip
    blocks = sorted({f"{n.rsplit('.', 1)[-1]} ({type(m).__name__})" for n, m in matched if not _adaptable(m)})
    if blocks:
        return (f"{given} matches {', '.join(blocks[:3])}, which LoRA cannot adapt (a block or an activation, not a "
                f"layer with weights of its own): name the linear layers inside it; this model's are {linear}")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "tie_word_embeddings", False):
        shared = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
        tied = sorted({n.rsplit(".", 1)[-1] for n, m in matched if id(m) in shared})
        if tied:
            return (f"{given} adapts {', '.join(tied)}, but this model's output layer and input embedding share one "
                    "weight (tie_word_embeddings): an adapter there changes both, and a merged model would differ "
                    "from the one trained. Leave lm_head and the embedding out (all-linear does), or train them with "
                    "technique.name=full")  # fmt: skip
    return None


def check_lora_targets(model_cfg, technique: TechniqueConfig) -> None:
    """`lora_target_problem` on a copy of the model built on the meta device from its config alone (no weights
    read), raised as a `UserError`: before a model loads. Nothing is said where the config cannot be read here (the
    load then says why) or the model cannot be built from it."""
    if technique.name not in ("lora", "qlora") or technique.target_modules == "all-linear":
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models.hub import prepare_hub_libraries
    from posttrain.models.loading import resolve_model

    prepare_hub_libraries()
    try:
        resolved = resolve_model(model_cfg.name)
        config = AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file,
                                            trust_remote_code=model_cfg.trust_remote_code)  # fmt: skip
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - a check ahead of the load, which reports what is wrong with the model
        return
    if why := lora_target_problem(model, technique):
        raise UserError(why)


BNB_MINIMUM = "0.46.1"
"""The oldest bitsandbytes QLoRA runs with: transformers 5 refuses to quantise with an older one, and 0.46 is the
first with a CPU backend (pyproject.toml's `qlora` extra)."""


def bitsandbytes_problem() -> str | None:
    """Why QLoRA cannot run with the bitsandbytes installed here (absent, or older than `BNB_MINIMUM`), in the
    user's words; None when it can. Checked before any model loads (an older one failed inside transformers'
    load, reported as a bug of posttrain's: an audit)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        found = version("bitsandbytes")
    except PackageNotFoundError:
        return ("technique.name=qlora needs the bitsandbytes package: `pip install 'bitsandbytes>="
                f"{BNB_MINIMUM}'` (or use technique.name=lora)")  # fmt: skip
    if Version(found) < Version(BNB_MINIMUM):
        return (f"technique.name=qlora needs bitsandbytes >= {BNB_MINIMUM} (the first with a CPU backend, and the "
                f"oldest transformers quantises with); this environment has {found}: `pip install -U "
                f"'bitsandbytes>={BNB_MINIMUM}'` (or use technique.name=lora)")  # fmt: skip
    return None


def bnb_config(technique: TechniqueConfig, compute_dtype):
    """The bitsandbytes 4-bit quantisation config for QLoRA (needs the `bitsandbytes` package, `BNB_MINIMUM`)."""
    if why := bitsandbytes_problem():
        raise UserError(why)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=technique.quant_type,
        bnb_4bit_use_double_quant=technique.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def use_portable_4bit_kernel(model) -> int:
    """Make every bitsandbytes 4-bit linear of `model` compute the same way on every CPU; returns how many.

    bitsandbytes 0.50.2 (`Linear4bit.forward`) repacks a 4-bit weight in place for a bf16 inference kernel the
    first time the layer runs on a CPU with AVX512-BF16, in eval mode, on an input that needs no gradient
    (`functional._convert_weight_packed_for_cpu`). We switch that off, because measured on the tiny test models:
    - it raises (`shape '[32, 0]' is invalid`) on a layer with fewer input features than the quantisation block
      (64), so QLoRA evaluation, generation and saving crashed on such CPUs only;
    - the kernel computes in bf16: eval-mode and generation logits then differ from training-mode logits (by
      1.6e-3 on a 64-wide model) and from every CPU without the feature, so results depend on the machine;
    - the packed layout stays after `model.train()`: a training step after an evaluation runs through the
      inference kernel, which has no backward (torch warns "silently incorrect behavior"; gradients changed).
    `support_avx512bf16_for_cpu` is the per-layer switch Linear4bit's constructor sets from the CPU's features;
    False is the path every other CPU (and every GPU) takes: dequantise, then a matmul in the compute dtype.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def apply_lora(
    model, technique: TechniqueConfig, *, gradient_checkpointing: bool = False, compute_dtype=None
):
    """Freeze `model` and wrap it in a peft `PeftModel` with fresh LoRA adapters (the only trainable weights).

    For a 4-bit model, peft's `prepare_model_for_kbit_training` freezes the base and casts every bf16/fp16
    parameter that is not 4-bit (norms, embeddings, LM head) to float32 for stable training. On CPU everything is
    already float32, so it casts nothing. On a bf16 GPU the norms stay upcast (tiny), but the embedding matrix and
    LM head (49152 x 576 for SmolLM2: 113 MB in fp32) are frozen and only read, so they are cast back to the
    compute dtype to keep the memory QLoRA exists to save.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantised = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantised:
        # Checkpointing is enabled below, the same way as for LoRA, so peft is told not to.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if compute_dtype is not None and compute_dtype != torch.float32:
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.to(compute_dtype)
    else:
        model.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        # With frozen embeddings the checkpointed layers' inputs do not require grad; non-reentrant checkpointing
        # copes with that, but peft's hook keeps the reentrant variant (and older torch) correct as well.
        model.enable_input_require_grads()
    # the check `train` runs before loading, on a copy built from the config (`check_lora_targets`): here for every
    # other caller, on the model itself (peft refuses only a list that matches nothing at all)
    if why := lora_target_problem(model, technique):
        raise UserError(why)
    linear = _linear_names(model)
    try:
        model = get_peft_model(model, lora_config(technique))
    except ValueError as err:  # no layer has those names: NoMatchingPeftModuleError (a ValueError) in the pinned
        # peft; a plain ValueError in peft 0.17, which pyproject.toml allows, so the message is what tells
        if "target module" not in str(err).lower() and "target_modules" not in str(err):
            raise
        raise UserError(f"technique.target_modules = {technique.target_modules!r} matches no layer of this model; "
                        f"its linear layers are named {', '.join(linear)} (or use all-linear)") from None  # fmt: skip
    if deepspeed_zero_stage() != 3:  # ZeRO-3 gathers lora_B's weight in a hook on lora_B's own forward
        fuse_lora_scaling(model)
    return model


def fuse_lora_scaling(model) -> int:
    """Give each plain LoRA linear layer of `model` (peft's `lora.Linear`, exactly that class: not QLoRA's 4-bit
    layers, not DoRA or other variants) a forward that adds its adapter's output to the base layer's with one
    `addmm`: result + s (x A^T) B^T, the scaling s applied inside the matrix product, where peft computes
    (x A^T) B^T, scales it and adds it in three passes over the (tokens x out_features) output, forward and
    backward. The same result bit for bit when s is a power of two (alpha = 2r, the default: 2.0) at the ranks
    people use (r = 8 to 64 measured), else within a rounding of it: at r = 256 the CPU's GEMM adds the base output
    before its last block of the rank, 9.5e-7 apart on a 576 -> 1536 layer (where that starts depends on the
    CPU's kernels). Old and new log-probs both run this path, so their ratio is unaffected. Under autocast it runs peft's computation without peft's round trip of the input through
    float32 (`_autocast_forward`); every other case the fused path does not cover (adapters disabled or merged,
    mixed dtypes, a LoRA bias or a variant, extra forward arguments) runs peft's own forward. Returns how
    many layers were given it. Measured on one (1110 x 576) -> 1536 layer, forward and backward: 15.4 against
    16.9 ms (2 CPU cores, benchmarks/README.md)."""
    from peft.tuners.lora.layer import Linear

    fused = FusedLoraLinear_of(Linear)
    n = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fused
            n += 1
    return n


@functools.cache
def FusedLoraLinear_of(base: type) -> type:  # noqa: N802 (names a class)
    """`base` (peft's `lora.Linear`) with `fuse_lora_scaling`'s forward, made once per process."""

    class FusedLoraLinear(base):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = [a for a in self.active_adapters if a in self.lora_A]
            dtype = self.base_layer.weight.dtype
            if (args or kwargs or self.disable_adapters or self.merged
                    or any(a in self.lora_variant or self.lora_B[a].bias is not None for a in names)):  # fmt: skip
                return super().forward(x, *args, **kwargs)
            if torch.is_autocast_enabled(x.device.type):
                return self._autocast_forward(x, names)
            if x.dtype != dtype or any(self.lora_A[a].weight.dtype != dtype or self.lora_B[a].weight.dtype != dtype
                                       for a in names):  # fmt: skip
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            flat = result.reshape(-1, result.shape[-1])
            for a in names:
                low = self.lora_A[a](self.lora_dropout[a](x))
                flat = torch.addmm(flat, low.reshape(-1, low.shape[-1]), self.lora_B[a].weight.t(),
                                   alpha=self.scaling[a])  # fmt: skip
            return flat.view(result.shape)

        def _autocast_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
            """peft's forward under autocast without its cast of `x` to the adapter's dtype (float32) before
            `lora_A`, which autocast casts straight back: `lora_A` then keeps `x` itself for its gradient (a norm's
            output, rebuilt in backward by `models.layers`), not a copy of it, and two copies of each adapted
            layer's input are not made. Bit for bit peft's result: a bfloat16 or float16 tensor is exact in float32,
            so autocast's cast of the float32 copy gives the values of `x` cast directly. Only with one active
            adapter (several share peft's float32 copy, and their input gradients are summed in float32 there),
            float32 adapter weights (peft's default beside a 16-bit base; a lower-precision adapter would round
            `x` once more), an input of 16 or 32 bits, and no dropout (peft drops out the float32 copy, rounding
            its rescaled values differently); otherwise peft's own forward."""
            if (len(names) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
                    or any(not isinstance(self.lora_dropout[a], torch.nn.Identity)
                           or self.lora_A[a].weight.dtype != torch.float32 for a in names)):  # fmt: skip
                return super().forward(x)
            result = self.base_layer(x)
            result_dtype = result.dtype
            for a in names:
                result = result + self.lora_B[a](self.lora_A[a](x)) * self.scaling[a]
            return result.to(result_dtype)

    FusedLoraLinear.__module__ = __name__
    return FusedLoraLinear


def is_adapter_model(model) -> bool:
    """Whether `model` is a peft model (its trainable weights are adapters)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def merged_for_sampling(model, dtype: torch.dtype | None = None) -> Iterator[bool]:
    """While sampling (no gradients): each LoRA layer's base weight swapped for a merged copy W + delta (delta from
    peft's `get_delta_weight`, summed over the active adapters) and the adapters disabled, so a decode step runs one
    matrix product per adapted layer instead of three and an add. Sampling at 32 rows is bound by per-call overhead,
    not FLOPs: peft's adapter products cost 12% of a LoRA rollout on the embedded model (benchmarks/README.md).
    The outputs are the adapted model's up to float rounding ((W + delta) x against W x + s B (A x)). On exit the
    original weight tensors are put back untouched (not `merge_adapter` then `unmerge_adapter`, whose W + d - d is
    not W in floating point, so the frozen base would drift every rollout). The merged copies cost one copy of the
    adapted weights while sampling (0.42 GB on the embedded model in fp32), freed after.

    `dtype` (`algorithm.rollout.dtype`): each merged copy is made in that dtype (computed in the weight's own, then
    cast), so no full-precision copy is held beside it.

    Yields whether it merged: only a peft model in eval mode whose adapted layers are all plain linear layers
    (`torch.nn.Linear`, GPT-2's `Conv1D`) with one whole weight tensor (not QLoRA's 4-bit layers, not a sharded or
    partitioned model, no variant such as DoRA, no LoRA bias); otherwise the model samples through its adapters."""
    if unmergeable(model) is not None:
        yield False
        return
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    names = [a for a in module.active_adapters if a in module.lora_A]
                    if names:
                        base = module.base_layer
                        w = base.weight
                        merged = w + sum(module.get_delta_weight(a).to(w.dtype) for a in names)
                        if dtype is not None:
                            merged = merged.to(dtype)
                        swapped.append((base, w))
                        base._parameters["weight"] = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield True
    finally:
        for base, w in swapped:
            base._parameters["weight"] = w


def unmergeable(model) -> str | None:
    """Why `merged_for_sampling` cannot merge `model`'s adapters (its docstring), or None when it can."""
    if not is_adapter_model(model):
        return "it has no LoRA adapters"
    if model.training:
        return "it is in training mode"
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (peft's fan_in_fan_out delta)

    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        base, weight = m.base_layer, getattr(m.base_layer, "weight", None)
        why = ("its base is not a plain linear layer" if type(base) not in (torch.nn.Linear, Conv1D)
               else "its weight is sharded or partitioned" if type(weight) is not torch.nn.Parameter
               or hasattr(weight, "ds_id")
               else "it is a LoRA variant (e.g. DoRA)" if any(m.lora_variant.values())
               else "it has a LoRA bias" if any(b.bias is not None for b in m.lora_B.values())
               else "its adapters are disabled or merged" if m.disable_adapters or m.merged
               else None)  # fmt: skip
        if why:
            return f"{name}: {why}"
    return None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpointing).

    `use_reentrant=False` is PyTorch's recommended variant: it works when the layer inputs do not require grad
    (frozen embeddings under LoRA) and with keyword arguments; the KV cache is switched off since training
    never uses it. The recompute runs under the packed rows' layout its forward saw
    (`attention.checkpoint_contexts`).
    """
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    # transformers 5.x renamed the method (the old name warns); support both.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
