"""Estimator memory and compute: hand-worked numbers from the papers, invariances, and bad input.

Numbers worked out by hand (decimal GB = 1e9 bytes):
  - 7e9 params, mixed-precision AdamW as posttrain holds it (autocast, HF anatomy): (4 + 2) + 4 + 8 bytes =
    42 + 28 + 56 = 126 GB; as DeepSpeed holds it [ZeRO sec. 3.1]: 2 + 2 + 12 bytes = 14 + 14 + 84 = 112 GB.
  - ZeRO Fig. 1, 7.5e9 params on 64 GPUs: DDP 16 x 7.5 = 120 (posttrain's DDP: 18 x 7.5 = 135); ZeRO-1
    4 x 7.5 + 12 x 7.5 / 64 = 31.406;
    ZeRO-2 2 x 7.5 + 14 x 7.5 / 64 = 16.641; ZeRO-3 16 x 7.5 / 64 = 1.875 (the paper prints 1.9).
  - Llama-2-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008) = 6,476,005,376 linear params; embeddings + head +
    norms = 2 x 32000 x 4096 + 65 x 4096 = 262,410,240; total 6,738,415,616 (Hugging Face's count).
  - NF4 with double quantisation [QLoRA sec. 3]: 4 + 8/64 + 32/(64 x 256) = 4.127 bits = 0.515869 bytes.
"""

import dataclasses
import json

import pytest

from posttrain.errors import UserError
from posttrain.estimator import GPU, estimate
from posttrain.estimator.core import EstimateInputs
from posttrain.estimator.memory import (
    NF4_BYTES,
    Setup,
    activation_bytes,
    frozen_weight_bytes,
    kv_cache_bytes,
    logits_bytes,
)
from posttrain.estimator.models import ARCHITECTURES, resolve_model

STATES = ("weights", "gradients", "optimizer_states")
LLAMA2 = ARCHITECTURES["llama-2-7b"]


def states_gb(e) -> float:
    return sum(e.breakdown_gb[k] for k in STATES)


def test_full_adamw_mixed_precision_is_what_posttrain_holds():
    """posttrain trains bf16-mixed as Accelerate does: fp32 parameters (the master copy) with fp32 gradients,
    AdamW's fp32 m and v, and autocast's bf16 copy of each weight from forward to backward: (4 + 2) + 4 + 8 =
    18 bytes per parameter (HF "model training anatomy"); tests/integration/test_precision.py checks the dtypes."""
    e = estimate("7b", technique="full", batch_size=1, seq_len=128)
    assert e.breakdown_gb["weights"] == pytest.approx(42.0, rel=1e-12)
    assert e.breakdown_gb["gradients"] == pytest.approx(28.0, rel=1e-12)
    assert e.breakdown_gb["optimizer_states"] == pytest.approx(56.0, rel=1e-12)
    assert e.peak_memory_gb > 126.0  # plus activations and logits


def test_deepspeed_mixed_precision_is_zeros_16_bytes_per_param():
    """DeepSpeed keeps bf16 weights and gradients and the fp32 master inside the optimizer [ZeRO sec. 3.1]."""
    e = estimate("7b", technique="full", batch_size=1, seq_len=128, num_gpus=1, sharding="zero1")
    assert states_gb(e) == pytest.approx(112.0, rel=1e-12)
    assert e.breakdown_gb["optimizer_states"] == pytest.approx(84.0, rel=1e-12)


@pytest.mark.parametrize(
    "sharding, expected",
    [("ddp", 135.0), ("zero1", 30 + 90 / 64), ("zero2", 15 + 105 / 64), ("zero3", 120 / 64)],
)
def test_zero_stages_match_the_paper(sharding, expected):
    """ZeRO's Fig. 1 for DeepSpeed's stages; plain DDP replicates posttrain's autocast layout (18 B x 7.5e9)."""
    e = estimate("7.5b", technique="full", batch_size=1, seq_len=128, num_gpus=64, sharding=sharding)
    assert states_gb(e) == pytest.approx(expected, rel=1e-12)


def test_zero_paper_rounded_values():
    got = [
        round(states_gb(estimate("7.5b", batch_size=1, seq_len=128, num_gpus=64, sharding=s)), 1)
        for s in ("zero1", "zero2", "zero3")
    ]
    assert got == [31.4, 16.6, 1.9]


def test_param_counts_from_shapes():
    assert LLAMA2.exact_params == 6_738_415_616
    assert ARCHITECTURES["llama-3-8b"].exact_params == 8_030_261_248
    assert LLAMA2.layers * LLAMA2.block_linear_params == 6_476_005_376
    # LoRA r=16 on all 7 linear maps: 32 x 16 x (4 x 8192 + 3 x 15104) = 39,976,960 (peft's count).
    assert LLAMA2.lora_params(16) == pytest.approx(39_976_960, rel=1e-12)


def test_qlora_nf4_bytes():
    assert NF4_BYTES == 0.515869140625  # 4.126953125 bits, the paper rounds to 4.127
    s = Setup(arch=LLAMA2, technique="qlora")
    expected = 6_476_005_376 * NF4_BYTES + 262_410_240 * 2
    assert frozen_weight_bytes(s, LLAMA2, quantised=True) == pytest.approx(expected, rel=1e-12)
    e = estimate("llama-2-7b", technique="qlora", lora_rank=16, batch_size=1, seq_len=128)
    adapters = 39_976_960 * 4  # fp32 adapter weights
    assert e.breakdown_gb["weights"] * 1e9 == pytest.approx(expected + adapters, rel=1e-12)
    assert e.breakdown_gb["optimizer_states"] * 1e9 == pytest.approx(39_976_960 * 8, rel=1e-12)


def test_activation_formula_with_checkpointing():
    """Korthikanti full recomputation: s b h per layer in the residual stream's dtype, plus one block recomputed
    during backward.

    Llama-2-7B, b=1, s=2048, full fine-tuning in bf16-mixed (autocast: fp32 weights, so a float32 residual
    stream): 32 x 4096 x 4 x 2048 = 1,073,741,824 bytes of block inputs; one block keeps, as `lean_layers`
    trains it, (8 x 4096 + 4 x 4096 + 4 x 11008 + 4 x 4096 for the two norms' float32 inputs) x 2048 = 109,568 x
    2048 = 224,395,264; total 1,298,137,088. A family `lean_layers` does not patch keeps (12 x 4096 + 4 x 4096 +
    8 x 11008 + 4 x 4096) x 2048 = 169,984 x 2048 = 348,127,232 per block. Under DeepSpeed (16-bit weights) the
    stream is 16-bit: 2 bytes of block input, 93,184 x 2048 = 190,840,832 a block.
    """
    s = Setup(arch=LLAMA2, batch_size=1, seq_len=2048, gradient_checkpointing=True)
    assert activation_bytes(s) == 1_298_137_088
    assert activation_bytes(dataclasses.replace(s, gradient_checkpointing=False)) == 32 * 224_395_264
    eager = dataclasses.replace(s, arch=dataclasses.replace(LLAMA2, lean=False), gradient_checkpointing=False)
    assert activation_bytes(eager) == 32 * 348_127_232
    zero = dataclasses.replace(s, sharding="zero2")
    assert activation_bytes(zero) == 32 * 4096 * 2 * 2048 + 190_840_832


def test_lora_keeps_a_16_bit_stream_and_each_adapters_a_output():
    """LoRA over a 16-bit base: the residual stream is 16-bit (the frozen base's dtype), and each of a block's 7
    adapters keeps its A output (r values) for B's gradient: Llama-2-7B, r = 16, s = 2048, one block keeps
    (93,184 + 7 x 16 x 2) x 2048 = 93,408 x 2048 = 191,299,584 bytes."""
    s = Setup(arch=LLAMA2, technique="lora", lora_rank=16, batch_size=1, seq_len=2048)
    assert activation_bytes(s) == 32 * 191_299_584


def test_a_config_of_a_family_without_lean_layers_keeps_the_eager_count(tmp_path):
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "vocab_size": 100}  # fmt: skip
    for model_type, lean in (("llama", True), ("qwen2", True), ("gemma2", False), ("phi3", False)):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
        arch, _ = resolve_model(str(folder))
        assert arch.lean is lean, model_type


def test_kv_cache_per_token():
    """128 KiB per token for Llama-3-8B (8 KV heads), 512 KiB for Llama-2-7B (32), in 16 bit."""
    for name, per_token in (("llama-3-8b", 128 * 1024), ("llama-2-7b", 512 * 1024)):
        s = Setup(arch=ARCHITECTURES[name], method="grpo", batch_size=1, group_size=1, seq_len=1000)
        assert kv_cache_bytes(s) == per_token * 1000


def test_more_gpus_under_zero3_means_less_per_gpu():
    peaks = [estimate("7b", num_gpus=n, sharding="zero3").peak_memory_gb for n in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))


def test_no_sharding_is_independent_of_gpu_count():
    one, eight = (estimate("7b", num_gpus=n, sharding="ddp").peak_memory_gb for n in (1, 8))
    assert one == eight


def test_checkpointing_cuts_activations():
    on, off = (estimate("7b", gradient_checkpointing=g) for g in (True, False))
    assert on.breakdown_gb["activations"] < off.breakdown_gb["activations"] / 5
    assert on.flops > off.flops  # one more forward pass


def test_grpo_memory_grows_with_group_size():
    peaks = [
        estimate("7b", method="grpo", technique="lora", group_size=g).peak_memory_gb for g in (2, 4, 8, 16)
    ]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))


def test_rloo_holds_what_grpo_holds_at_the_same_group():
    """RLOO samples k completions per prompt and keeps GRPO's tensors per completion token (entropy included), so
    at the same k and prompts its memory and compute are GRPO's; left out, k is RLOO's own default, 4, with two
    prompts per micro-batch (8 sequences, as GRPO's 1 x 8)."""
    kw = dict(technique="lora", reward_function=True, batch_size=2, group_size=4, seq_len=1024)
    grpo, rloo = (estimate("7b", method=m, **kw) for m in ("grpo", "rloo"))
    assert rloo.breakdown_gb == grpo.breakdown_gb and rloo.flops == grpo.flops
    default = estimate("7b", method="rloo", technique="lora", reward_function=True)
    assert (default.inputs["group_size"], default.inputs["batch_size"]) == (4, 2)
    assert "group_size not given: 4 completions per prompt, the rloo default" in " ".join(default.assumptions)
    assert default.breakdown_gb["reference_model"] == 0  # LoRA: the reference is the base, adapters disabled


@pytest.mark.parametrize("method", ["sft", "dpo", "ppo"])
def test_group_size_is_refused_where_nothing_samples_a_group(method):
    with pytest.raises(UserError, match=f"group_size=4 applies to grpo and rloo only .* not to {method}"):
        estimate("7b", method=method, group_size=4, reward_function=method == "ppo")


def test_dpo_needs_more_than_sft():
    sft, dpo = (estimate("7b", method=m, batch_size=2, reference=r) for m, r in (("sft", None), ("dpo", "model")))
    # a frozen copy held as the fp32 policy is (so its forward equals the untrained policy's exactly)
    assert dpo.breakdown_gb["reference_model"] == pytest.approx(28.0, rel=1e-12)
    # twice the scored positions: the same chunk of logits, twice the hidden states kept for its recomputation
    hidden = 2 * 2048 * 4096 * 2 / 1e9
    assert dpo.breakdown_gb["logits"] - sft.breakdown_gb["logits"] == pytest.approx(hidden, rel=1e-12)
    lora = estimate("7b", method="dpo", technique="lora")
    assert lora.breakdown_gb["reference_model"] == 0.0  # adapters disabled give the reference


def test_fsdp_grad_op_is_zero2_and_zero3_qlora_gathers_nothing():
    """FSDP's shard-grad-op is ZeRO-2 (ESTIMATOR_FACTS): in mixed precision the 16-bit weights whole and the fp32
    master sharded, 7e9 x (2 + 4/8) = 17.5 GB on 8 GPUs (it counted a whole 4 + 2 = 42 GB); gradients and states
    sharded as under full shard. ZeRO-3 keeps a QLoRA base whole, so it has no gathered layer on top: 8 GPUs hold
    no more weights than 1 (their logits are another matter: ZeRO-3 gathers the output layer inside a forward, so
    the scored rows go through it unchunked)."""
    kw = dict(batch_size=1, gradient_checkpointing=True, num_gpus=8)
    op, full = (estimate("7b", sharding=s, **kw).breakdown_gb for s in ("fsdp-grad-op", "fsdp"))
    assert op["weights"] == pytest.approx(17.5, rel=1e-12)
    assert (op["gradients"], op["optimizer_states"]) == (full["gradients"], full["optimizer_states"]) == (3.5, 7.0)
    one = estimate("70b", technique="qlora", batch_size=1)
    eight = estimate("70b", technique="qlora", batch_size=1, num_gpus=8, sharding="zero3")
    assert "gathered_params" not in eight.breakdown_gb and eight.breakdown_gb["weights"] < one.breakdown_gb["weights"]


def test_reference_defaults_are_what_train_picks():
    """Left out, the reference is the one `posttrain train` uses at its algorithms' defaults: the adapter under LoRA;
    under full fine-tuning DPO precomputes (no copy held; one forward over the pairs, the copy's FLOPs), GRPO at
    beta 0 holds none (no reference forward), PPO and RLOO (KL 0.05) a frozen copy. A QLoRA copy is loaded with
    the run's technique, so its blocks are 4-bit, as `frozen_weight_bytes` counts a quantised base."""
    from posttrain.algorithms import dpo, rl
    from posttrain.estimator.memory import frozen_weight_bytes

    class Cfg:  # what reference_mode reads
        def __init__(self, technique):
            self.technique = type("T", (), {"name": technique})()
            self.algorithm = type("A", (), {"loss_type": "sigmoid", "reference": "auto"})()

    assert (dpo.reference_mode(Cfg("full")), rl.reference_mode(Cfg("full"), False)) == ("precompute", "none")
    picked = {m: estimate("7b", method=m, reward_function=m != "dpo").inputs["reference"]
              for m in ("dpo", "grpo", "ppo", "rloo")}  # fmt: skip
    assert picked == {"dpo": "precomputed", "grpo": "none", "ppo": "model", "rloo": "model"}
    full = {r: estimate("7b", method="dpo", batch_size=1, reference=r) for r in ("precomputed", "model", "none")}
    assert full["precomputed"].breakdown_gb["reference_model"] == 0.0
    assert full["precomputed"].flops == full["model"].flops > full["none"].flops  # none: no reference forward
    grpo = estimate("7b", method="grpo", reward_function=True)
    assert "reference_forward" not in grpo.flops_breakdown and grpo.breakdown_gb["reference_model"] == 0.0
    q = estimate("7b", method="dpo", technique="qlora", reference="model")
    s, _ = EstimateInputs(model="7b", method="dpo", technique="qlora", reference="model").to_setup()
    assert q.breakdown_gb["reference_model"] == pytest.approx(frozen_weight_bytes(s, s.arch, True) / 1e9, rel=1e-12)
    assert q.breakdown_gb["reference_model"] < 5.0  # 4-bit blocks, not the 14 GB 16-bit copy


def test_logits_are_counted_as_posttrain_chunks_them():
    """posttrain's log-probs (`models.logprobs.head_logps`) hold LOGIT_CHUNK_ELEMENTS // V rows of logits at a
    time, plus the N scored positions' hidden states (N x h x activation bytes). For a lean family
    (`_LinearHeadLogps`) the chunk's logits are in the product's dtype (4 or 2 bytes a value) and the float32 work
    runs SOFTMAX_BLOCK_ELEMENTS // V rows at a time, 8 bytes a value, 21 for GRPO (its entropy); else the chunk
    holds 12, 25 or 27 bytes a value. Worked by hand:

      - SmolLM2-135M (V = 49,152, h = 576), fp32 SFT, 8 x 147 tokens: 2^24 // 49,152 = 341 rows, blocks of
        2^21 // 49,152 = 42; 341 x 49,152 x 4 = 67,043,328 + 42 x 49,152 x 8 = 16,515,072 + 1,176 x 576 x 4 =
        2,709,504 -> 86,267,904 bytes (136,796,160 when the whole chunk's float32 work was at once).
      - Llama-3-8B (V = 128,256, h = 4,096), bf16-mixed SFT, 4 x 2048: 2^24 // 128,256 = 130 rows, blocks of 16;
        130 x 128,256 x 2 = 33,346,560 + 16 x 128,256 x 8 = 16,416,768 + 8,192 x 4,096 x 2 = 67,108,864 ->
        116,872,192 (10.5 GB for the full 8,192 x 128,256 logits at 10 bytes each).
      - the same model, GRPO (1 prompt x 8 completions of 1,024): the entropy's tensors make 21 bytes per block
        value: 33,346,560 + 16 x 128,256 x 21 = 43,094,016 + 67,108,864 -> 143,549,440. RLOO (2 prompts x 4) and
        PPO (8 prompts), which log the entropy too, score the same 8 x 1,024 positions: the same bytes.
      - under FSDP (posttrain's fsdp2: the scored rows in one go, through the model's forward), SFT 1 x 512 on 2
        GPUs: 512 x 128,256 x 12 = 788,004,864 + 512 x 4,096 x 2 = 4,194,304 -> 792,199,168. The same under
        DeepSpeed ZeRO-3, which also gathers the output layer only inside a forward (`gathers_in_forward`).
      - fewer scored positions than a chunk (SmolLM2, SFT 1 x 100, fp32): 100 x 49,152 x 4 + 42 x 49,152 x 8 +
        100 x 576 x 4 = 19,660,800 + 16,515,072 + 230,400 = 36,406,272.
      - the GRPO case above for a family outside the lean ones (its chunks through the model's own forward): 27
        bytes per value in 16-bit, 130 x 128,256 x 27 = 450,178,560 + 67,108,864 -> 517,287,424.
    """
    cases = [
        (dict(model="smollm2-135m", precision="fp32", batch_size=8, seq_len=147), 86_267_904),
        (dict(model="llama-3-8b", batch_size=4, seq_len=2048), 116_872_192),
        (dict(model="llama-3-8b", method="grpo", technique="lora", batch_size=1, group_size=8, completion_len=1024),
         143_549_440),
        (dict(model="llama-3-8b", method="rloo", technique="lora", batch_size=2, group_size=4, completion_len=1024),
         143_549_440),
        (dict(model="llama-3-8b", method="ppo", technique="lora", batch_size=8, completion_len=1024,
              reward_function=True, value_model="head"), 143_549_440),
        (dict(model="llama-3-8b", batch_size=1, seq_len=512, num_gpus=2, sharding="fsdp"), 792_199_168),
        (dict(model="llama-3-8b", batch_size=1, seq_len=512, num_gpus=2, sharding="zero3"), 792_199_168),
        (dict(model="smollm2-135m", precision="fp32", batch_size=1, seq_len=100), 36_406_272),
    ]
    for kw, expected in cases:
        assert estimate(**kw).breakdown_gb["logits"] * 1e9 == pytest.approx(expected, rel=1e-12), kw
    s, _ = EstimateInputs(model="llama-3-8b", method="grpo", technique="lora", batch_size=1, group_size=8,
                          completion_len=1024).to_setup()  # fmt: skip
    assert logits_bytes(dataclasses.replace(s, arch=dataclasses.replace(s.arch, lean=False))) == 517_287_424


def test_logit_chunk_is_posttrains():
    """The estimator repeats the chunk and block sizes of `models.logprobs` (it imports no torch layer): the same
    numbers, and the same rows `head_logps` and `_LinearHeadLogps` take for the embedded SmolLM2's vocabulary."""
    from posttrain.estimator import memory
    from posttrain.models import logprobs

    assert memory.LOGIT_CHUNK_ELEMENTS == logprobs.LOGIT_CHUNK_ELEMENTS
    assert memory.SOFTMAX_BLOCK_ELEMENTS == logprobs.SOFTMAX_BLOCK_ELEMENTS
    assert memory.logit_chunk_rows(Setup(arch=ARCHITECTURES["smollm2-135m"])) == 341
    assert memory.logit_block_rows(Setup(arch=ARCHITECTURES["smollm2-135m"])) == 42 == logprobs._block_rows(49_152)


def test_ppo_with_a_critic_holds_four_models():
    e = estimate("7b", method="ppo", reward_model="7b", batch_size=1, value_model="policy")
    assert e.breakdown_gb["reference_model"] == pytest.approx(28.0, rel=1e-12)  # fp32, as the policy
    assert e.breakdown_gb["reward_model"] == pytest.approx(14.0, rel=1e-12)
    assert e.breakdown_gb["value_model"] == pytest.approx(126.0, rel=1e-12)  # a second trained model


def test_ppo_value_head_drops_the_critic_from_memory_and_compute():
    """posttrain's PPO reads values from a head on the policy: no 126 GB critic, no extra value passes. The head is
    the default, as `posttrain train` runs PPO (a policy-sized critic was, unlike the method that trains)."""
    critic = estimate("7b", method="ppo", reward_function=True, batch_size=1, tokens=1e6, value_model="policy")
    head = estimate("7b", method="ppo", reward_function=True, batch_size=1, tokens=1e6)
    given = estimate("7b", method="ppo", reward_function=True, batch_size=1, tokens=1e6, value_model="head")
    assert (head.breakdown_gb, head.flops) == (given.breakdown_gb, given.flops)
    assert any(a.startswith("value_model not given: a value head on the policy") for a in head.assumptions)
    assert head.breakdown_gb["value_model"] == 0.0 and critic.breakdown_gb["value_model"] == pytest.approx(
        126.0
    )
    assert critic.peak_memory_gb - head.peak_memory_gb == pytest.approx(126.0, rel=1e-9)
    # the critic's share: a forward (2 P) and a training pass (6 P) per token of the 1e6 tokens
    assert critic.flops - head.flops == pytest.approx((2 + 6) * 7e9 * 1e6, rel=1e-9)


def test_peak_counts_generation_and_training_phases_once():
    e = estimate("7b", method="grpo", technique="lora")
    b = e.breakdown_gb
    resident = sum(b.values()) - b["activations"] - b["logits"] - b["kv_cache"]
    assert e.peak_memory_gb == pytest.approx(resident + max(b["activations"] + b["logits"], b["kv_cache"]))


def test_flops_follow_6nd():
    full = estimate("7b", tokens=1e9)
    assert full.flops == pytest.approx(6 * 7e9 * 1e9, rel=1e-12)
    lora = estimate("7b", technique="lora", tokens=1e9)
    assert lora.flops == pytest.approx(4 * 7e9 * 1e9, rel=1e-12)
    grpo = estimate(
        "7b", method="grpo", technique="lora", seq_len=1000, completion_len=600, tokens=1e9, reference="none"
    )
    assert grpo.flops_breakdown["generation"] == pytest.approx(2 * 7e9 * 0.6e9, rel=1e-12)


def test_hours_and_cost():
    e = estimate("7b", technique="lora", batch_size=1, tokens=1e9, gpu="H100-80GB", mfu=0.5)
    assert e.num_gpus == 1
    assert e.hours == pytest.approx(4 * 7e9 * 1e9 / (989e12 * 0.5) / 3600, rel=1e-12)
    assert e.cost_usd == pytest.approx(e.hours * 2.50, rel=1e-12)


def test_fits_lists_gpus_with_enough_memory_smallest_first():
    e = estimate("7b", technique="qlora", batch_size=1, seq_len=512)
    assert e.fits[0] == "T4-16GB" and e.gpu == "T4-16GB"
    big = estimate("70b", technique="full", batch_size=1, gradient_checkpointing=True)
    # 16 x 70e9 bytes = 1,120 GB of states: 16 H100s hold 70 GB each, too much with activations; 32 fit.
    assert big.fits == [] and big.gpus_needed == 32
    # The setup as asked (one GPU) does not fit: no time or cost for it, and the 32 GPUs are what would fit.
    assert big.num_gpus == 1 and not big.fits_gpu and big.hours is None and big.cost_usd is None
    assert big.would_fit[0]["change"] == {"num_gpus": 32, "sharding": "fsdp"}


def test_activations_alone_too_big_need_no_gpu_count():
    e = estimate("70b", technique="full", batch_size=4, seq_len=4096)
    assert e.gpus_needed is None
    assert any("use gradient checkpointing" in n for n in e.assumptions)


def test_size_borrows_nearest_shape_and_says_so():
    arch, notes = resolve_model("8b")
    assert arch.params == 8e9 and arch.vocab == 128256 and "llama-3-8b" in notes[0]


def test_config_json_path(tmp_path):
    cfg = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    cfg.update(intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    arch, _ = resolve_model(str(tmp_path))
    assert arch.exact_params == ARCHITECTURES["smollm2-135m"].exact_params == 134_515_008


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("vocab_size", None),
                                        ("intermediate_size", 1e400), ("num_hidden_layers", -2),
                                        ("hidden_size", 57.5), ("num_key_value_heads", "three")])  # fmt: skip
def test_a_config_json_shape_that_is_no_size_is_named(tmp_path, key, value):
    """0 heads divided by zero, a null vocabulary was a TypeError, 1e400 an OverflowError and -2 layers gave
    negative parameters (an audit, nineteenth session)."""
    cfg = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152)  # fmt: skip
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"config.json: {key} must be a whole number above 0"):
        resolve_model(str(tmp_path))


def test_aliases_and_hub_names():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")[0].name == "smollm2-135m"
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct")[0].name == "llama-3-8b"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(model="llama-3-8bb"), "did you mean: llama-3-8b"),
        (dict(method="ppo"), "ppo needs a reward source"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seq_len=-5), "seq_len must be a positive integer"),
        (dict(num_gpus=0), "num_gpus"),
        (dict(model="0b"), "must be positive"),
        (dict(gpu="H1000"), "unknown gpu 'h1000'"),
        (dict(method="grpo", seq_len=512, completion_len=512), "completion_len (512) must be smaller"),
        (dict(method="dpo", reference="adapter"), "needs a lora technique"),
        (dict(method="sft", reward_model="7b"), "apply to ppo, grpo and rloo only"),
        (dict(technique="prefix"), "technique 'prefix' is not known"),
        (dict(sharding="zero4"), "did you mean zero3"),
    ],
)
def test_bad_input_raises_user_error(kwargs, fragment):
    with pytest.raises(UserError) as err:
        estimate(**kwargs)
    assert fragment in str(err.value).lower()


def test_gpu_table_override(tmp_path):
    f = tmp_path / "gpus.yaml"
    f.write_text(
        "H100-80GB: {usd_per_hour: 10}\nTiny-8GB: {memory_gb: 8, bf16_tflops: 10, bandwidth_gbs: 100, usd_per_hour: 0.1}\n"
    )
    e = estimate("135m", technique="lora", batch_size=1, seq_len=256, gpu_table=f)
    assert e.fits[0] == "Tiny-8GB"
    h = estimate("7b", technique="lora", batch_size=1, gpu="H100-80GB", gpu_table=f, tokens=1e9)
    assert h.cost_usd == pytest.approx(h.hours * 10, rel=1e-12)
    f.write_text("Tiny-8GB: {memory: 8}\n")
    with pytest.raises(UserError, match=r"gpus.yaml:1: Tiny-8GB.memory: unknown key"):
        estimate("7b", gpu_table=f)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("gpus.yaml", "Tiny-8GB:\n  memory_gb: 8\n  bf16_tflops: -1\n", r"gpus\.yaml:3: Tiny-8GB\.bf16_tflops: must be a positive number, got -1"),
        ("gpus.yaml", "H100-80GB:\n  usd_per_hour: 2\nTiny-8GB:\n  memory_gb: 8\n", r"gpus\.yaml:3: Tiny-8GB: a new GPU needs bf16_tflops"),
        ("gpus.yaml", "H100-80GB: {usd_per_hour: 2}\nH100-80GB: {usd_per_hour: 3}\n", r"gpus\.yaml:2: H100-80GB is given twice \(lines 1 and 2\)"),
        ("gpus.yaml", "H100-80GB: {usd_per_hour: 2\n", r"gpus\.yaml:2: not valid YAML"),
        ("gpus.json", '{"H100-80GB":\n {"usd_per_hour": 2,}}', r"gpus\.json:2: not valid JSON"),
    ],
)
def test_a_gpu_table_error_names_its_line(tmp_path, name, text, expected):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match=expected):
        estimate("7b", gpu_table=f)


def test_inputs_are_one_validated_object():
    """`EstimateInputs` normalises names and refuses bad values when it is built, before any model is read."""
    from posttrain.estimator import EstimateInputs, estimate_for

    i = EstimateInputs(
        model="llama-2-7b", method="DPO", precision="amp", optimizer="paged_adamw_8bit", technique="int8"
    )
    assert (i.method, i.precision, i.optimizer, i.technique) == ("dpo", "bf16-mixed", "adamw-8bit", "8bit")
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        EstimateInputs(model="no-such-model", batch_size=0)  # the model is not looked up yet
    with pytest.raises(dataclasses.FrozenInstanceError):
        i.batch_size = 2
    # The keyword API is a thin constructor of the same object.
    kw = dict(method="grpo", technique="lora", seq_len=1024, group_size=4, tokens=1e7)
    assert estimate("7b", **kw).to_dict() == estimate_for(EstimateInputs(model="7b", **kw)).to_dict()


def test_fits_keeps_ten_percent_of_the_gpu_free():
    """A peak of 23.7 GB on a 24 GB GPU is not a fit (98.75% full): at most 90% of the memory may be used, the
    rest is for the CUDA context, allocator fragmentation and workspaces the estimate does not count."""
    kw = dict(method="sft", technique="lora", batch_size=1, seq_len=1024, gradient_checkpointing=True)
    peak = estimate("7b", **kw).peak_memory_gb
    tight = GPU("Tight", peak * 24 / 23.7, 100, 1000, 1.0)  # the peak fills 23.7 of its "24 GB"
    roomy = GPU("Roomy", peak / 0.9 * 1.001, 100, 1000, 1.0)  # the peak is just under 90% of it
    e = estimate("7b", **kw, gpu_table={"Tight": tight, "Roomy": roomy}, gpu="Tight")
    assert e.fits == ["Roomy"] and e.usable_memory_gb == pytest.approx(0.9 * tight.memory_gb, rel=1e-9)
    assert not e.fits_gpu and e.hours is None and e.cost_usd is None
    assert any("at most 90% of a GPU's memory" in n for n in e.assumptions)
    assert estimate("7b", **kw, gpu_table={"Tight": tight, "Roomy": roomy}).gpu == "Roomy"


def test_defaults_follow_the_technique_and_method_and_are_stated():
    """Gradient checkpointing defaults on for a quantised base (peft's prepare_model_for_kbit_training, the QLoRA
    script), off for full and LoRA (as `posttrain train`); the micro-batch defaults to the advisor's per method."""
    from posttrain.advisor.core import MICRO_BATCH
    from posttrain.estimator.inputs import DEFAULT_MICRO_BATCH

    q = estimate("70b", technique="qlora", seq_len=1024)
    assert q.inputs["gradient_checkpointing"] is True
    assert (
        q.peak_memory_gb
        == estimate("70b", technique="qlora", seq_len=1024, gradient_checkpointing=True).peak_memory_gb
    )
    assert any(n.startswith("gradient checkpointing on: the default for qlora") and "--no-gradient-checkpointing" in n for n in q.assumptions)  # fmt: skip
    full = estimate("7b", technique="full")
    assert full.inputs["gradient_checkpointing"] is False
    assert any(n.startswith("gradient checkpointing off: the default for full") for n in full.assumptions)
    assert not any(
        "gradient checkpointing" in n for n in estimate("7b", gradient_checkpointing=False).assumptions
    )
    assert MICRO_BATCH is DEFAULT_MICRO_BATCH  # one table for the estimator and the advisor
    for method, n in DEFAULT_MICRO_BATCH.items():
        e = estimate("7b", method=method, technique="lora", reward_function=method == "ppo")
        assert e.inputs["batch_size"] == n and any(f"micro-batch {n} " in a for a in e.assumptions)


def test_what_would_fit_a_setup_that_does_not():
    """7B LoRA at micro-batch 2 without checkpointing needs ~27 GB: not a 24 GB GPU. No cost; each change listed
    makes it fit, and applying it gives that peak."""
    asked = dict(model="7b", technique="lora", batch_size=2, gpu_memory_gb=24)
    e = estimate(**asked)
    assert not e.fits_gpu and e.cost_usd is None and e.peak_memory_gb > 21.6
    changes = [w["change"] for w in e.would_fit]
    assert {"gradient_checkpointing": True} in changes and {"technique": "qlora"} in changes
    for w in e.would_fit:
        fixed = estimate(**{**asked, **w["change"]})
        assert fixed.fits_gpu and fixed.cost_usd > 0
        assert fixed.peak_memory_gb == pytest.approx(w["peak_memory_gb"], rel=1e-12)
    # 7B LoRA at micro-batch 4 on an 18 GB GPU (16.2 GB usable): checkpointing alone leaves 17.9 GB, micro-batch
    # 1 alone 21.1 GB; both together 15.6 GB fit.
    e = estimate("7b", technique="lora", batch_size=4, gpu_memory_gb=18)
    changes = [w["change"] for w in e.would_fit]
    assert {"gradient_checkpointing": True, "batch_size": 1} in changes
    assert {"gradient_checkpointing": True} not in changes and {"batch_size": 1} not in changes


@pytest.mark.parametrize("settings, says", [
    (dict(technique="lora", lora_dropout=1.5), "lora_dropout must be in [0, 1); got 1.5"),
    (dict(technique="lora", lora_dropout=-1.0), "lora_dropout must be in [0, 1); got -1.0"),
    (dict(gpu="H100-80GB", gpu_memory_gb=40.0), "gpu='H100-80GB' and gpu_memory_gb=40.0 both name the GPU"),
    (dict(gpu_memory_gb=0.0), "gpu_memory_gb must be a positive size in GB"),
    (dict(method="sft", rollout_engine="vllm"), "rollout_engine='vllm' applies to ppo, grpo and rloo only"),
    (dict(method="dpo", completion_len=100, reward_function=True),
     "completion_len=100, reward_function=True apply to ppo, grpo and rloo only"),
])  # fmt: skip
def test_settings_that_would_be_ignored_or_are_impossible_are_refused(settings, says):
    """They were taken silently: a dropout of -1 as 0, --gpu dropped for --gpu-memory-gb, generation settings of a
    method that generates nothing."""
    with pytest.raises(UserError) as err:
        EstimateInputs(model="7b", **settings)
    assert says in str(err.value)
