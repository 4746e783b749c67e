"""`models.layers`: the lean gated MLP gives the eager module's results and gradients bit for bit, and keeps one
(tokens x intermediate) tensor less per layer for backward; `lean_layers` also rebuilds the MLP's product and each
RMSNorm's normalised input and output in backward, again bit for bit, keeping four (tokens x hidden) tensors and one
more (tokens x intermediate) tensor less per layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.models.layers import SiluMul, lean_layers, lean_mlps, silu_mul
from posttrain.testing import tiny_model


def test_silu_mul_matches_eager_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 5, 7, generator=g) * 4).requires_grad_(True)  # wide range: SiLU's tails and its dip
    up = torch.randn(3, 5, 7, generator=g).requires_grad_(True)
    grad = torch.randn(3, 5, 7, generator=g)
    eager_out = torch.nn.functional.silu(gate) * up
    eager = torch.autograd.grad(eager_out, (gate, up), grad)
    lean_out = SiluMul.apply(gate, up)
    lean = torch.autograd.grad(lean_out, (gate, up), grad)
    assert torch.equal(lean_out, eager_out)
    assert torch.equal(lean[0], eager[0]) and torch.equal(lean[1], eager[1])


def test_silu_mul_hand_worked():
    # d/dg [silu(g) u] = u * s(g) (1 + g (1 - s(g))); at g = 0: u / 2. d/du = silu(g); silu(0) = 0, silu(2) = 2 s(2).
    gate = torch.tensor([0.0, 2.0], requires_grad=True)
    up = torch.tensor([3.0, -1.0], requires_grad=True)
    out = silu_mul(gate, up)
    out.sum().backward()
    s2 = 1 / (1 + torch.exp(torch.tensor(-2.0)))
    torch.testing.assert_close(out, torch.stack([torch.tensor(0.0), -2 * s2]), rtol=0, atol=1e-7)
    torch.testing.assert_close(gate.grad, torch.stack([torch.tensor(1.5), -(s2 * (1 + 2 * (1 - s2)))]), rtol=0,
                               atol=1e-7)  # fmt: skip
    torch.testing.assert_close(up.grad, torch.stack([torch.tensor(0.0), 2 * s2]), rtol=0, atol=1e-7)


def test_only_the_needed_gradient_is_computed():
    gate = torch.randn(4, requires_grad=True)
    up = torch.randn(4)  # e.g. a frozen projection's output
    silu_mul(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is None


def _saved_storages(model, ids, attention_mask=None):
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits.float().square().mean()
    return loss, seen


@pytest.mark.parametrize("lora", [False, True])
def test_lean_model_equals_eager_and_keeps_one_tensor_less_per_layer(lora):
    eager = tiny_model(hidden_size=32)  # intermediate 64, 2 layers
    if lora:
        from peft import LoraConfig, get_peft_model

        eager = get_peft_model(eager, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for n, p in eager.named_parameters():  # B = 0 at init would hide the adapters' part of the gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    lean = copy.deepcopy(eager)
    assert lean_mlps(lean) == 2
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    loss_e, saved_e = _saved_storages(eager, ids)
    loss_l, saved_l = _saved_storages(lean, ids)
    assert torch.equal(loss_l, loss_e)
    ge = torch.autograd.grad(loss_e, [p for p in eager.parameters() if p.requires_grad])
    gl = torch.autograd.grad(loss_l, [p for p in lean.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(gl, ge, strict=True))
    wide = lambda saved: sum(1 for shape in saved.values() if shape[-1] == 64)  # noqa: E731
    assert wide(saved_e) - wide(saved_l) == 2  # silu(gate) of each of the 2 layers is no longer kept


def test_other_activations_are_left_alone():
    model = tiny_model(hidden_act="gelu")  # a Llama MLP with another activation: its forward stays the library's
    assert lean_mlps(model) == 0


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():  # B = 0 at init would hide the adapters' part of the gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_lean_layers_equal_eager_bit_for_bit_and_keep_less(lora):
    eager = tiny_model(hidden_size=32)  # 2 layers, intermediate 64, 4 heads of 8
    eager = _lora(eager) if lora else eager
    lean = copy.deepcopy(eager)
    assert lean_layers(lean) == {"mlps": 2, "norms": 5, "layers": 2}  # 2 norms a layer + the final norm
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    # Left padding: with a mask, SDPA runs on keys and values repeated per query head (without, it may not).
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    loss_e, saved_e = _saved_storages(eager, ids, mask)
    loss_l, saved_l = _saved_storages(lean, ids, mask)  # the census sees through the layers' own hooks
    assert torch.equal(loss_l, loss_e)
    for _ in range(2):  # retain_graph: the recipes rebuild their tensors again at the second backward
        ge = torch.autograd.grad(loss_e, [p for p in eager.parameters() if p.requires_grad], retain_graph=True)
        gl = torch.autograd.grad(loss_l, [p for p in lean.parameters() if p.requires_grad], retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(gl, ge, strict=True))
    with torch.no_grad():  # nothing to keep: the layers run as they are
        assert torch.equal(lean(input_ids=ids, attention_mask=mask).logits,
                           eager(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
    count = lambda saved, dim: sum(1 for shape in saved.values() if shape[-1] == dim)  # noqa: E731
    # Per layer, 64 wide: silu(gate) and silu(gate) * up are no longer kept (gate and up are).
    assert count(saved_e, 64) - count(saved_l, 64) == 2 * 2
    # Head dim 8: SDPA keeps the keys and values repeated for the 4 query heads, (2, 4, 9, 8) each; they are rebuilt
    # from the 2 key/value heads, (2, 2, 9, 8), which are kept instead (the query and RoPE's cos, sin as before).
    elements = lambda saved, dim: sum(math.prod(shape) for shape in saved.values() if shape[-1] == dim)  # noqa: E731
    assert elements(saved_e, 8) - elements(saved_l, 8) == 2 * 2 * (2 * 4 * 9 * 8 - 2 * 2 * 9 * 8)
    if not lora:
        # 32 wide, per layer: both norms' normalised input and output are no longer kept; the norms' inputs and
        # the attention output are. The final norm (outside the layers) keeps its 3.
        assert (count(saved_e, 32), count(saved_l, 32)) == (2 * 7 + 3, 2 * 3 + 3)
    else:
        # Frozen gains keep no normalised input. Only the adapters keep the norms' outputs, and layer 0's first
        # norm reads the frozen embeddings: its output is rebuilt from an input kept for it alone, no saving.
        # Eager: (x, y, attention output, x, y) a layer but layer 0's first x, + the final norm's x = 10.
        assert (count(saved_e, 32), count(saved_l, 32)) == (2 * 5 - 1 + 1, 2 * 3 + 1)


def test_lean_norms_survive_train_and_eval(tiny_dir):
    """transformers 5 re-"kernelizes" RMSNorm whenever train()/eval() changes the mode (it drops an instance's
    `forward`); the lean norm is a class of its own, so it stays through the loop's evaluation and rollouts."""
    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model

    model = load_model(ModelConfig(name=str(tiny_dir)), TechniqueConfig(name="full"), device="cpu")
    norm = model.model.layers[0].input_layernorm
    for toggle in (model.eval, model.train, model.eval, model.train):
        toggle()
        assert norm.forward.__func__.__name__ == "_lean_norm_forward"


def test_rebuild_pointwise_false_keeps_the_pointwise_results(tiny_dir):
    """`model.rebuild_pointwise: false` leaves the norms and layers as transformers builds them (the MLP still
    recomputes SiLU, `lean_mlps`), and keeps more tensors for backward than the default."""
    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model

    kept = {}
    for rebuild in (True, False):
        model = load_model(ModelConfig(name=str(tiny_dir), rebuild_pointwise=rebuild), TechniqueConfig(name="full"),
                           device="cpu")  # fmt: skip
        norm = model.model.layers[0].input_layernorm
        assert (norm.forward.__func__.__name__ == "_lean_norm_forward") is rebuild
        storages = {}  # unique storages handed to saved-tensor hooks, the weights aside: activations kept, by bytes
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t, weights=weights, storages=storages):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(3, 200, (2, 9))).logits.sum().backward()
        kept[rebuild] = sum(storages.values())
    assert 0 < kept[True] < 0.8 * kept[False], kept


def _cast_of(t: torch.Tensor) -> str | None:
    """What `t` is one autocast cast of (through views): "param" (a weight) or "activation"; None if not a cast."""
    node = t.grad_fn
    while node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "TBackward0",
                                                        "TransposeBackward0"):  # fmt: skip
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return None
    return "param" if type(node.next_functions[0][0]).__name__ == "AccumulateGrad" else "activation"


def _census_under_autocast(model, ids, mask):
    """Loss, and the unique storages autograd keeps (parameters aside): (dtype, last dim, what it is a cast of,
    bytes)."""
    from posttrain.models.attention import float32_attention_on_cpu

    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (t.dtype, t.shape[-1], _cast_of(t), t.untyped_storage().nbytes())
        return t

    with float32_attention_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().square().mean()
    return loss, list(seen.values())


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_under_bf16_autocast_lean_layers_equal_eager_and_keep_no_cast_copies(lora, masked):
    """A bf16 run (autocast; LoRA's frozen base held in bf16): every product keeps bf16 copies of its operands, and
    the float32 attention (`models.attention`) float32 copies of its inputs. The lean layers rebuild those copies
    in backward from what they are casts of (a weight, a rebuilt norm output, a bf16 input), and LoRA's adapters
    read their input without peft's round trip through float32 (`models.adapters._autocast_forward`): the same
    loss and gradients bit for bit, none of those copies kept."""
    from posttrain.models.adapters import fuse_lora_scaling

    eager = tiny_model(hidden_size=32)  # 2 layers, width 32, intermediate 64, 4 heads of 8 over 2 key/value heads
    if lora:
        eager = _lora(eager.to(torch.bfloat16))  # the adapters in float32 (peft's default beside a bf16 base)
    lean = copy.deepcopy(eager)
    lean_layers(lean)
    if lora:
        assert fuse_lora_scaling(lean) == 2 * 7
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask = mask if masked else None  # with a mask SDPA runs on keys and values repeated per query head
    loss_e, kept_e = _census_under_autocast(eager, ids, mask)
    loss_l, kept_l = _census_under_autocast(lean, ids, mask)
    assert torch.equal(loss_l, loss_e)
    for _ in range(2):  # retain_graph: the recipes rebuild their tensors again at the second backward
        ge = torch.autograd.grad(loss_e, [p for p in eager.parameters() if p.requires_grad], retain_graph=True)
        gl = torch.autograd.grad(loss_l, [p for p in lean.parameters() if p.requires_grad], retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(gl, ge, strict=True))
    def count(kept, **want) -> int:
        return sum(all(dict(zip(("dtype", "dim", "cast"), k))[f] == v for f, v in want.items()) for k in kept)

    bf16, f32 = torch.bfloat16, torch.float32
    if not lora:
        # Eager keeps a bf16 copy of each of the 7 weights of each layer, and of the output layer's; the output layer
        # is outside the layers: its copy stays.
        assert (count(kept_e, cast="param"), count(kept_l, cast="param")) == (2 * 7 + 1, 1)
        # bf16 copies of the norms' float32 outputs: 5 a layer (queries, keys, values; gate, up), none kept lean.
        # Eager keeps the bf16 attention output o_proj reads (a cast of the float32 attention's output), 1 a layer;
        # lean rebuilds it from the float32 output the attention kernel keeps for its own backward. Both keep the
        # final norm's output that the output layer reads, outside the layers.
        casts = lambda kept: count(kept, dtype=bf16, dim=32, cast="activation")  # noqa: E731
        assert (casts(kept_e), casts(kept_l)) == (2 * 5 + 2 + 1, 1)
    else:
        # peft's round trip (bf16 -> float32 -> bf16) gives each of the 7 adapters of a layer a bf16 copy of its
        # input (layer 0's first norm reads the frozen embeddings: no grad there, nothing saved for q, k, v). Lean,
        # the adapters keep their inputs themselves, and the attention output that o_proj's adapter reads (the
        # float32 attention's output cast back) is rebuilt from the float32 output the kernel keeps: no bf16 cast.
        assert count(kept_e, dtype=bf16, cast="activation") == 2 * 7 - 3
        assert count(kept_l, dtype=bf16, cast="activation") == 0
        # The norms' float32 copies of their bf16 input (2 a layer but layer 0's first), and the final norm's: the
        # layers keep the bf16 input instead.
        copies = lambda kept: count(kept, dtype=f32, dim=32, cast="activation")  # noqa: E731
        assert (copies(kept_e), copies(kept_l)) == (2 * 2 - 1 + 1, 1)
    # The float32 attention's copies of its bf16 inputs (head dim 8: queries, keys and values; full fine-tuning's
    # queries and keys come in float32, promoted by the rotary embedding, and are rounded to bf16 first, as
    # autocast would) are rebuilt lean, the bf16 inputs kept instead. With a mask the keys and values reach the
    # kernel repeated per query head (rebuilt in both cases), so eager's copies are then not direct casts.
    assert count(kept_l, dtype=f32, dim=8, cast="activation") == 0
    assert count(kept_e, dtype=f32, dim=8, cast="activation") == (2 if masked else 6)
    head_bytes = lambda kept: sum(k[3] for k in kept if k[1] == 8)  # noqa: E731
    assert head_bytes(kept_l) < head_bytes(kept_e)


def test_under_bf16_autocast_an_outer_hook_that_changes_layouts_still_gets_the_same_gradients():
    """`save_on_cpu(pin_memory=True)` around the model hands saved tensors back as contiguous copies: a tensor the
    layers rebuild from such an input (the float32 attention's transposed copies of its queries, keys and values)
    is laid out again as the original before the saved view reads it, so the gradients stay eager's bit for bit."""
    from torch.autograd.graph import save_on_cpu

    from posttrain.models.attention import float32_attention_on_cpu

    eager = _lora(tiny_model(hidden_size=32).to(torch.bfloat16))
    lean = copy.deepcopy(eager)
    lean_layers(lean)
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (eager, lean):
        with float32_attention_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16), save_on_cpu(pin_memory=True):
            loss = model(input_ids=ids, use_cache=False).logits.float().square().mean()
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_lora_under_autocast_with_two_active_adapters_runs_peft_forward():
    """Two adapters active on one layer share peft's float32 copy of the input, whose gradient sums theirs in
    float32: the fused layer then runs peft's own forward, and the input's gradient is peft's bit for bit."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models.adapters import fuse_lora_scaling

    class TwoProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 48, bias=False)

        def forward(self, x):
            return self.q(x) * self.k(x)

    torch.manual_seed(0)
    model = get_peft_model(TwoProjections().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q", "k"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q", "k"], lora_alpha=5))
    model.base_model.set_adapter(["default", "b"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=1.0, generator=torch.Generator().manual_seed(1))
    fused = copy.deepcopy(model)
    assert fuse_lora_scaling(fused) == 2
    x0 = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    grads = []
    for m in (model, fused):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        grads.append(torch.autograd.grad(y.float().square().sum(), [x])[0])
    assert torch.equal(grads[0], grads[1])


def _weight_copies_alive_after(model, ids, *, grad: bool) -> tuple[int, int]:
    """(made, alive): the bf16 copies of 2-D weights autocast made during a forward of `model`'s decoder under an
    autocast region with its cache on, and how many of them are still alive when the forward has returned but the
    region has not ended (tracked through every op's output; the output layer is not run)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16 and tuple(out.shape) in shapes:
                self.refs.append(weakref.ref(out))
            return out

    mode = Copies()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        assert torch.is_autocast_cache_enabled()
        with mode:
            hidden = model.model(input_ids=ids).last_hidden_state
        alive = sum(r() is not None for r in mode.refs)
    del hidden
    return len(mode.refs), alive


def test_a_lean_training_forward_leaves_no_weight_copies_in_autocasts_cache():
    """Autocast caches the bf16 copy of each weight it casts until its region ends, past the forward, where a
    step's memory peaks. Eager, the graph keeps the copies anyway; the lean layers rebuild them in backward, so in
    their training forward the cache is off (`_uncached_autocast`) and no copy outlives its product. The results
    are the bits of eager (the bf16 tests above run with it). Without gradient (sampling, where the cache saves a
    cast per weight per token) the cache is used as before."""
    eager = tiny_model(hidden_size=32)  # 2 layers x 7 weights
    lean = copy.deepcopy(eager)
    lean_layers(lean)
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _weight_copies_alive_after(eager, ids, grad=True) == (14, 14)
    assert _weight_copies_alive_after(lean, ids, grad=True) == (14, 0)
    assert _weight_copies_alive_after(lean, ids, grad=False) == (14, 14)  # cached, not kept by a graph
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean(input_ids=ids)
        assert torch.is_autocast_cache_enabled()  # restored after each layer
