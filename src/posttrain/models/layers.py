"""Leaner activations for training: what a decoder layer keeps for backward, without changing a bit of the result.

A Llama-family MLP computes ``down(silu(gate(x)) * up(x))``. Run as written, autograd keeps gate(x) (for SiLU's
backward), silu(gate(x)) and up(x) (for the product's backward), and the product itself (for ``down``'s weight or
LoRA gradient): four (tokens x intermediate) tensors a layer, 56% of the activations an SFT LoRA step keeps on
SmolLM2-135M (benchmarks/README.md, "Where SFT LoRA's memory goes"). `SiluMul` keeps only gate(x) and up(x) and
recomputes SiLU in backward: one (tokens x intermediate) tensor less per layer (-217 MB at 1,176 positions on the
135M model), for one elementwise SiLU more in backward and no extra matrix product. Liger-Kernel's fused SwiGLU
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", sec. 3) keeps the same two tensors.

The result and the gradients are bit-identical to the eager module's: the forward runs the same two kernels
(`F.silu`, then the product), and backward recomputes SiLU with the same kernel and applies torch's own
``silu_backward`` to the same operands autograd would (tests/unit/test_layers.py checks `torch.equal`).

`lean_mlps` patches, on a model about to train, the MLPs whose class is one of `GATED_SILU_MLPS` (their forward
is exactly the line above) and whose activation is SiLU; any other MLP runs as its library wrote it.

Recomputed, not kept (`lean_layers`): more of a decoder layer's saved tensors are cheap functions of tensors
backward keeps anyway, so backward rebuilds them instead (selective recomputation of the pointwise ops, as in
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", which keeps the matrix
products' inputs and recomputes what is cheap):

| not kept | kept by | rebuilt from (kept anyway) |
|---|---|---|
| silu(gate) * up | `down_proj` (its weight's gradient) | gate, up (`SiluMul`) |
| each RMSNorm's x * r, r = 1 / rms(x) | the norm's gain product | x, r (the norm's own backward) |
| each RMSNorm's output w * (x * r) | the projections (or adapters) that read it | w, x, r |
| keys and values repeated per query head | SDPA, under grouped-query attention | the key/value heads |

Under bf16 autocast (a bf16 run: CPU or GPU) a matrix product keeps bf16 copies of its operands, which autocast
casts from float32, and the float32 CPU attention (`models.attention`) keeps float32 copies of its bf16 inputs.
Each such copy is one cast of a tensor that is kept or rebuilt anyway, so it is rebuilt by the same cast:

| not kept (bf16 runs) | kept by | rebuilt from |
|---|---|---|
| the bf16 copy of each weight (full fine-tuning) | the product (its input's gradient) | the float32 weight |
| the bf16 copies of a norm's float32 output, one per projection that reads it | the projections | the norm's output, rebuilt |
| a bf16 model's residual stream cast to float32 (LoRA's bf16 base) | the norm's backward | the bf16 residual |
| the float32 copies of the attention's bf16 queries, keys, values | the float32 CPU attention | the bf16 ones |

On SmolLM2-135M in bf16 at 1,176 positions: SFT full keeps 1.12 -> 0.69 GB, SFT LoRA 0.97 -> 0.50 GB (the LoRA
figure also counts `models.adapters`' adapters reading their input without peft's float32 round trip, which made
a copy of each adapted layer's input). A cast is one kernel on the same values, so the rebuild is bit for bit.
Autocast's own cache would still hold each weight's copy until its region ends, past the forward: a layer's
training forward runs with that cache off (`_uncached_autocast`; 212 MB less at the end of a full fine-tuning
forward of that model in bf16).

On SmolLM2-135M (30 layers, width 576, MLP 1536, 9 query and 3 key/value heads) that is 0.65 GB less kept at
1,176 positions (1.49 -> 0.84 GB), for elementwise work in backward (no matrix product; +2-3% step time,
benchmarks/README.md). Nothing about the graph changes: the same autograd nodes run the same backward formulas and
only read their operands from the rebuild instead of from memory; the rebuild runs the forward's own kernels on
the same operands, so every result and gradient is bit for bit the eager one (tests/unit/test_layers.py checks
`torch.equal`).

How: each decoder layer of `DECODER_LAYERS` runs its forward under `torch.autograd.graph.saved_tensors_hooks`
whose pack hook swaps a tensor registered as recomputable (or a view of one: a projection keeps its input reshaped
to 2-D) for a recipe that rebuilds it, and hands every other tensor, and a recipe's inputs, to the hooks that were
in force outside the layer, so a census of saved tensors (`benchmarks/sft_memory.py`) or `save_on_cpu` around the
model sees what is really kept. Under gradient checkpointing the checkpoint's hooks sit inside the layer's and take
precedence: nothing changes there. The norms are registered by a class of their own (`_lean_norm_class`), the MLP
as `lean_mlps` patches it, the repeated keys and values through transformers' SDPA `repeat_kv`
(`_register_repeat_kv`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP"})
"""transformers' MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked against
transformers 5.25 for each; Phi-3's, with one fused gate_up projection, is not one of them)."""

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""transformers' RMSNorm classes whose forward is `_lean_norm_forward`'s computation line for line (checked against
transformers 5.25; Olmo2's casts after the gain product and Gemma's scales by 1 + w, so they are not here)."""

DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                            "Olmo2DecoderLayer"})  # fmt: skip
"""The decoder layers whose forward runs under `_Recomputed`'s hooks (`lean_layers`): the families above."""


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving only `gate` and `up` for backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: through `SiluMul` when autograd will need it, plainly otherwise (no graph to save)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # SiluMul.forward's two kernels


def _normalised(x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x * r).to(dtype)  # _lean_norm_forward's kernels


def _gained(weight: torch.Tensor, x: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight * (x * r).to(dtype)


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_is_tracing: None)
"""The innermost (pack, unpack) pair of `saved_tensors_hooks` in force, or None (torch 2.x; private, hence the
fallback: without it an outer pair is not seen and the tensors kept here skip it)."""


class _Recipe:
    """What the pack hook keeps instead of a recomputable tensor: the function that rebuilds it, that function's
    inputs (packed by the outer hooks, if any), and the geometry of the view that was saved."""

    __slots__ = ("fn", "inputs", "size", "stride", "offset", "layout")

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list, saved: torch.Tensor, whole: torch.Tensor):
        self.fn, self.inputs = fn, inputs
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()
        self.layout = (whole.size(), whole.stride())  # of the tensor `fn` rebuilds, whose storage `saved` views


class _Recomputed:
    """The tensors of one decoder layer's forward that backward rebuilds instead of keeping (module docstring).

    `add(t, fn, *inputs)` registers `t == fn(*inputs)` (filling its storage, `_whole_storage`; `fn` runs the
    kernels that made `t`, `inputs` are tensors backward keeps anyway, or registered tensors themselves, rebuilt in
    turn). While the layer runs, the pack hook replaces any saved tensor on `t`'s storage (`t` or a view of it,
    e.g. a projection's 2-D input) by a `_Recipe`, and hands every other tensor, and a recipe's inputs, to the
    `saved_tensors_hooks` that were in force outside the layer (a census, `save_on_cpu`), so that those see what is
    really kept. The registered tensors are held here until the layer's forward ends, so that no other tensor can
    take a freed one's address while the hook matches addresses.

    Casts (`_cast_source`): under autocast a matrix product keeps a lower-precision copy of its operands, made by
    one cast: of a weight (a parameter) or of a registered tensor (a norm's float32 output). Such a copy is
    rebuilt too, by the same cast of the rebuilt (or the parameter's own) tensor: the same kernel on the same
    values, so the same bits. The copies of one tensor that several products made (a norm's output read by the
    query, key and value projections) are then not kept at all."""

    active: list[_Recomputed] = []  # the layers running now, innermost last (a forward runs on one thread)

    def __init__(self) -> None:
        self.tensors: dict[int, tuple[torch.Tensor, Callable[..., torch.Tensor], tuple]] = {}
        self.by_node: dict[tuple[object, int], int] = {}  # (grad_fn, output_nr) of a registered tensor -> address
        self.outer_pack: Callable = lambda t: t
        self.outer_unpack: Callable = lambda packed: packed

    @classmethod
    def add(cls, t: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs) -> None:
        if cls.active and _whole_storage(t):
            layer = cls.active[-1]
            layer.tensors[t.untyped_storage().data_ptr()] = (t, fn, inputs)
            if t.grad_fn is not None:
                layer.by_node[(t.grad_fn, t.output_nr)] = t.untyped_storage().data_ptr()

    def pack(self, t: torch.Tensor):
        entry = self.tensors.get(t.untyped_storage().data_ptr())
        if entry is not None and entry[0].dtype == t.dtype:
            return self._registered(entry, t)
        cast = self._cast_source(t)
        if cast is not None:
            return cast
        return self.outer_pack(t)

    def _registered(self, entry: tuple, saved: torch.Tensor) -> _Recipe:
        """The recipe of registered tensor `entry` (tensor, fn, inputs) for `saved`, the tensor or a view of it."""
        whole, fn, inputs = entry
        return _Recipe(fn, [self._pack_input(i) for i in inputs], saved, whole)

    def _pack_input(self, i) -> tuple[bool, object]:
        """A recipe's input, packed: a registered tensor (or a view of one) as its own recipe, any other tensor by
        the outer hooks."""
        if not isinstance(i, torch.Tensor):
            return False, i
        entry = self.tensors.get(i.untyped_storage().data_ptr())
        if entry is not None and entry[0].dtype == i.dtype:
            return True, self._registered(entry, i)
        return True, self.outer_pack(i)

    def _cast_source(self, t: torch.Tensor) -> _Recipe | None:
        """A recipe for `t` when it is (a view of) one cast of a parameter or of a registered tensor: its grad_fn
        chain is views, one `ToCopyBackward0`, then the parameter's gradient accumulator or the registered tensor's
        grad_fn. None otherwise."""
        node = node_behind_views(t)
        if node is None or type(node).__name__ != "ToCopyBackward0" or not t.is_floating_point():
            return None
        source, output_nr = node.next_functions[0]
        if type(source).__name__ == "AccumulateGrad":
            root, entry = source.variable, None  # a parameter (a leaf that requires grad)
        else:
            address = self.by_node.get((source, output_nr))
            if address is None:
                return None
            entry = self.tensors[address]
            root = entry[0]
        # A contiguous root, so that its cast is contiguous in whatever memory format the cast asked for; the
        # same device; and a cast of the whole tensor.
        if (not root.is_contiguous() or root.storage_offset() != 0 or t.device != root.device
                or t.untyped_storage().nbytes() != root.numel() * t.element_size()):  # fmt: skip
            return None
        if entry is None:
            fn, inputs = _cast_to, [(True, self.outer_pack(root)), (False, t.dtype)]
        else:
            fn = functools.partial(_rebuilt_cast, entry[1])
            inputs = [(False, t.dtype), *(self._pack_input(i) for i in entry[2])]
        return _Recipe(fn, inputs, t, root)

    def unpack(self, packed):
        if not isinstance(packed, _Recipe):
            return self.outer_unpack(packed)
        with torch.no_grad():
            return self._rebuild(packed)

    def _rebuild(self, recipe: _Recipe) -> torch.Tensor:
        inputs = [(self._rebuild(i) if isinstance(i, _Recipe) else self.outer_unpack(i)) if is_tensor else i
                  for is_tensor, i in recipe.inputs]  # fmt: skip
        out = recipe.fn(*inputs)
        size, stride = recipe.layout
        if out.size() != size or out.stride() != stride:
            # an outer hook gave an input back in another layout (`save_on_cpu` with pinned memory copies it
            # contiguous): lay the rebuilt tensor out as the original, so that the saved view reads the same elements
            out = torch.empty_strided(size, stride, dtype=out.dtype, device=out.device).copy_(out)
        return out.as_strided(recipe.size, recipe.stride, recipe.offset)

    def __enter__(self) -> _Recomputed:
        outer = _top_hooks(False)
        if outer is not None:
            self.outer_pack, self.outer_unpack = outer
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()
        self.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.active.pop()
        self.hooks.__exit__(*exc)
        self.tensors.clear()
        self.by_node.clear()


def _whole_storage(t: torch.Tensor) -> bool:
    """Whether `t` fills its storage exactly, each element once, from its start: contiguous, or dense in another
    order of its dimensions (a transposed layout, as elementwise kernels give a transposed input's result). A
    rebuild by the same kernels lays its result out the same way; where it does not (an outer hook handed an
    input back in another layout), `_Recomputed._rebuild` copies it into the original layout before the saved
    view's geometry is applied."""
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def rebuilt_in_backward(t: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs) -> None:
    """Register `t == fn(*inputs)` with the decoder layer running now (`_Recomputed.add`): backward rebuilds `t`
    instead of keeping it. Outside a lean layer's forward it does nothing."""
    _Recomputed.add(t, fn, *inputs)


_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "TBackward0", "TransposeBackward0",
                         "PermuteBackward0", "ReshapeAliasBackward0"})  # fmt: skip
"""grad_fn names of ops whose output is a view of their input (the same storage), as a product keeps its operands:
the 2-D view of an activation, the transpose of a weight."""


def node_behind_views(t: torch.Tensor):
    """The autograd node that made `t`'s storage: `t.grad_fn` followed back past view ops (`_VIEW_NODES`); None
    for a tensor outside the graph."""
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEW_NODES:
        node = node.next_functions[0][0]
    return node


def _cast_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)  # autocast's cast of an operand


def _rebuilt_cast(rebuild: Callable[..., torch.Tensor], dtype: torch.dtype, *inputs) -> torch.Tensor:
    return rebuild(*inputs).to(dtype)


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = silu_mul(gate, up)
    _Recomputed.add(h, _silu_times, gate, up)  # kept by down_proj for its weight's gradient; SiluMul keeps gate, up
    return self.down_proj(h)


def _lean_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RMSNorm, the same kernels in the same order; its normalised input and its output are
    registered as recomputable from `x` and `r`, which the norm's backward keeps anyway."""
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    if x is not hidden_states:  # a bf16 model's residual stream: keep it, not its float32 copy (half the bytes)
        _Recomputed.add(x, _cast_to, hidden_states, torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    r = torch.rsqrt(variance + self.variance_epsilon)  # (..., 1): 1 / rms
    normed = (x * r).to(input_dtype)
    _Recomputed.add(normed, _normalised, x, r, input_dtype)  # before the gain product keeps it
    out = self.weight * normed
    _Recomputed.add(out, _gained, self.weight, x, r, input_dtype)  # kept by the projections (or adapters) after
    return out


_LEAN_NORMS: dict[type, type] = {}


def _lean_norm_class(cls: type) -> type:
    """`cls` with `_lean_norm_forward` as its forward, made once per class. The class is swapped rather than the
    instance's `forward` set (as `lean_mlps` does) because transformers 5 "kernelizes" RMSNorm on every
    `model.train()` / `model.eval()` that changes the mode (`use_kernel_forward_from_hub("RMSNorm")`, on by default
    where the `kernels` package is installed): with no hub kernel for the device it deletes the instance's
    `forward`, leaving the class's; where a hub kernel applies (e.g. Liger's RMSNorm on CUDA) that kernel wins."""
    if cls not in _LEAN_NORMS:
        _LEAN_NORMS[cls] = type(cls.__name__, (cls,), {"forward": _lean_norm_forward, "__module__": __name__,
                                                       "__qualname__": f"lean.{cls.__qualname__}"})  # fmt: skip
    return _LEAN_NORMS[cls]


def _registering_repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' `repeat_kv` (grouped-query attention's copy of each key/value head for the query heads that
    share it), its result registered as recomputable: SDPA keeps the copies, n_rep times the keys and values."""
    out = _LIBRARY_REPEAT_KV(hidden_states, n_rep)
    if out is not hidden_states:
        _Recomputed.add(out, _LIBRARY_REPEAT_KV, hidden_states, n_rep)
    return out


_LIBRARY_REPEAT_KV = None


def _register_repeat_kv() -> None:
    """Route the SDPA attention's `repeat_kv` through `_registering_repeat_kv`, once per process. Outside a lean
    layer's forward `_Recomputed.add` does nothing, so every other caller gets the library's function unchanged."""
    global _LIBRARY_REPEAT_KV
    # here, as `loading` imports transformers: when a model loads, so that `import posttrain.models` stays light
    from transformers.integrations import sdpa_attention

    if _LIBRARY_REPEAT_KV is None and callable(getattr(sdpa_attention, "repeat_kv", None)):  # transformers 5.x
        _LIBRARY_REPEAT_KV = sdpa_attention.repeat_kv
        sdpa_attention.repeat_kv = _registering_repeat_kv


def _recomputing_forward(self, *args, **kwargs):
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    with _Recomputed(), _uncached_autocast():
        return type(self).forward(self, *args, **kwargs)


def _uncached_autocast() -> contextlib.AbstractContextManager:
    """Autocast as it is, but without its cache of casts, for a decoder layer's forward with gradient.

    Autocast keeps the lower-precision copy of each weight it casts (a leaf that requires grad) until the
    outermost autocast region ends, so that a weight used twice is cast once. In a training forward each
    projection's weight is used once, and backward rebuilds the copies it needs (`_Recomputed._cast_source`), so
    the cache only holds every layer's copies until the forward ends, where the step's memory peaks (full
    fine-tuning of SmolLM2-135M in bf16: 212 MB, a 16-bit copy of the layers' weights). Without it each copy is
    freed after its product. The same kernel makes the same copy, so nothing else changes. Forwards without
    gradient (sampling a token at a time, where the cache saves recasting every weight per token) keep it."""
    stack = contextlib.ExitStack()
    if torch.is_autocast_cache_enabled():
        for device in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False))
    return stack


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_mlps(model: nn.Module) -> int:
    """Give every gated-SiLU MLP of `model` the `SiluMul` forward; returns how many were patched."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ in GATED_SILU_MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_lean_forward, module)
            patched += 1
    return patched


def lean_layers(model: nn.Module) -> dict[str, int]:
    """`lean_mlps`, and the recomputation of the module docstring: the RMSNorms of `RMS_NORMS` register their
    normalised input and output, the MLPs their product, and the decoder layers of `DECODER_LAYERS` rebuild those
    in backward instead of keeping them. Returns how many MLPs, norms and layers were patched."""
    counts = {"mlps": lean_mlps(model), "norms": 0, "layers": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.__class__ = _lean_norm_class(type(module))
            counts["norms"] += 1
        elif name in DECODER_LAYERS:
            module.forward = types.MethodType(_recomputing_forward, module)
            counts["layers"] += 1
    if counts["layers"]:
        _register_repeat_kv()
    return counts


def compile_layers(model: nn.Module, memory_budget: float | None = None) -> int:
    """Compile each decoder layer of `model` with `torch.compile` (inductor, dynamic shapes), in place; returns
    how many were compiled (`model.compile`).

    The layers are the modules transformers names in `_no_split_modules` (the repeated block: `LlamaDecoderLayer`,
    `GPT2Block`, ...), found on the model or any module inside it (peft's wrapper has none). Compiling the block
    rather than the whole model keeps what runs around it (the chunked output layer, the loss, peft's wrapper)
    as it is, and every block shares one compiled code: the first step compiles once, not once a layer. Only
    forwards that record gradients run compiled; those under `torch.no_grad` (sampling, reference scoring,
    evaluation) run eager (`_compiled_with_grad`).

    Inductor fuses each block's pointwise work (norms, rotary embedding, SiLU and product, residual adds, the
    LoRA scaling) into generated C++ loops, and its partitioner picks what the backward keeps (Ansel et al. 2024,
    "PyTorch 2", sec. 4: the min-cut recomputation of cheap ops). So the results are within float rounding of the
    eager ones, not bit for bit (tests/integration/test_compile.py), and `rebuild_pointwise`'s hooks, which dynamo
    cannot trace, are not used. `memory_budget` (0-1) is the share of the block's activation memory the
    partitioner may keep (torch's `activation_memory_budget`): lower recomputes more in backward, pointwise ops
    first. It is set only while inductor compiles, through a backend of its own per budget (`_inductor_with`):
    dynamo keys compiled code by backend, so two models compiled with different budgets never share code.
    """
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    backend = _inductor_with(1.0 if memory_budget is None else memory_budget)
    compiled = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.forward = _compiled_with_grad(torch.compile(module.forward, backend=backend, dynamic=True),
                                                 module.forward)  # fmt: skip
            module.posttrain_compiled = True  # `logprobs.packed_rows` leaves such a model's rows padded
            compiled += 1
    return compiled


def _compiled_with_grad(compiled: Callable, eager: Callable) -> Callable:
    """A layer forward that runs `compiled` where autograd records (training forwards) and `eager` under
    `torch.no_grad`: sampling (one token at a time through a KV cache, a call per token, whose shapes and cache
    objects would make dynamo recompile or break its graphs), reference and old-log-prob scoring, evaluation. What
    a compiled layer saves is backward's work and memory, which a forward without gradients does not have."""

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)

    return forward


def cpp_compiler_missing() -> str | None:
    """Why inductor could not build its CPU kernels here (it compiles them with a C++ compiler, found by its own
    search: `CXX`, then g++ and clang++), or None when it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - InvalidCxxCompiler, or a torch without inductor's builder
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no C++ compiler found'}"
    return None


@functools.cache
def _inductor_with(memory_budget: float) -> Callable:
    """Inductor, compiling under `activation_memory_budget = memory_budget` (one backend object per budget)."""

    def inductor(graph, example_inputs):
        from torch._functorch import config as functorch_config
        from torch._inductor.compile_fx import compile_fx

        with functorch_config.patch(activation_memory_budget=memory_budget):
            return compile_fx(graph, example_inputs)

    return inductor
