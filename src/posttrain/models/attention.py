"""Attention in float32 while a run computes in bfloat16 on a CPU.

transformers' "sdpa" attention runs torch's CPU flash-attention kernel, whose bfloat16 backward is slow: for one
layer of the embedded SmolLM2-135M at 8 rows x 139 tokens (9 heads of 64), forward and backward took 26.8 ms in
bfloat16 against 10.7 ms with the same inputs cast to float32 and the output cast back, and 9.2 ms for float32
inputs (2 cores of an Intel Xeon with AMX, torch 2.13; benchmarks/README.md, "A CPU with AMX"). In a bfloat16 SFT
LoRA step it took 18% of the step. So while a bfloat16 run trains on CPU (`train`), attention that would run in
bfloat16 on CPU (bfloat16 inputs, or any inputs under bfloat16 autocast) runs in float32: queries, keys, values
and a floating-point mask cast up, the output cast back to bfloat16, as the kernel would have given it. Every forward of the run computes it the same
way (the training forward, old log-probs, a reference, sampling), so a run's forwards still agree with each other.
Float32 attention is also the more precise one: the products and softmax of bf16 inputs are accumulated in
float32 rounding rather than bfloat16's. Any other attention (float32, a GPU, another implementation than "sdpa")
is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from posttrain.models.layers import rebuilt_in_backward


def _in_float32(sdpa):
    """transformers' attention function `sdpa` (same signature), computing bfloat16 CPU attention in float32:
    bfloat16 inputs, or any inputs under a bfloat16 CPU autocast (which would run the kernel in bfloat16; a full
    fine-tuning run's queries and keys reach attention in float32, promoted by the rotary embedding's float32
    cos and sin). The output has the dtype the kernel would have given: bfloat16."""

    def sdpa_bf16_cpu_in_float32(module, query, key, value, attention_mask, *args, **kwargs):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if query.device.type != "cpu" or not (autocast or torch.bfloat16 in (query.dtype, key.dtype, value.dtype)):
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()  # an additive mask: its dtype must match the queries'
        # outside autocast, which would cast the inputs back (CPU autocast runs attention in its lower precision)
        up = [x.float() for x in (query, key, value)]
        for x32, x in zip(up, (query, key, value)):
            if x32 is not x:  # the kernel keeps its inputs: keep the bf16 ones, cast up again in backward
                rebuilt_in_backward(x32, torch.Tensor.float, x)
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa(module, *up, attention_mask, *args, **kwargs)
        return out.to(torch.bfloat16), weights

    sdpa_bf16_cpu_in_float32.__wrapped__ = sdpa  # the standard attribute (`inspect.unwrap`)
    return sdpa_bf16_cpu_in_float32


@contextmanager
def float32_attention_on_cpu(enabled: bool = True) -> Iterator[bool]:
    """While inside (when `enabled`): transformers' "sdpa" attention computes bfloat16 CPU inputs in float32
    (module docstring). transformers looks the function up by name in a process-wide table at every forward,
    so this swaps the table's entry and puts the original back on exit. Yields whether it did."""
    if not enabled:
        yield False
        return
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", _in_float32(original))
    try:
        yield True
    finally:
        AttentionInterface.register("sdpa", original)
