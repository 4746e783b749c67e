"""How much of a LoRA adapter's first updates a bfloat16 forward can see (`model.dtype: bfloat16`, docs/models.md).

Under bf16 autocast a LoRA layer's output is base(x) + s B A x rounded to bfloat16 (8 significant bits). Adam's
first step moves every element of B by the learning rate (its update is lr x sign of the gradient at step 1), so
after k steps |B| ~ k x lr. This sets B to exactly that size (random signs) on the embedded model, runs one
forward over a short prompt in float32, and measures at every adapted layer how far bf16 rounding of the output
moves the adapter's contribution: || (bf16(base + delta) - bf16(base)) - delta || / || delta ||. A figure above 1
means the rounding error is larger than the update itself: the bf16 forward sees the update mostly as noise.

    python benchmarks/bf16_lora_resolution.py            # lr 1e-4, after 1, 3, 10 and 30 steps
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 3, 10, 30])
    args = ap.parse_args()

    import torch
    from peft.tuners.lora import LoraLayer

    from posttrain.config import ModelConfig, TechniqueConfig
    from posttrain.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(dtype="float32"), TechniqueConfig(name="lora", r=16, alpha=32, dropout=0.0),
                       train=True)  # fmt: skip
    ids = tok("Extract a JSON object with the keys name, birth_date and role from: Maria Lopez, born 3 May 1990, "
              "works as a nurse.", return_tensors="pt")  # fmt: skip
    print(f"LoRA r=16, alpha=32 on every linear layer of the embedded model; |B| = steps x lr ({args.lr:g})")
    print("| steps | rounding error / update, median over layers | range | layers |")
    print("|---|---|---|---|")
    for steps in args.steps:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.sign(torch.randn_like(p)) * args.lr * steps)
        ratios: list[float] = []

        def measure(module, inputs, out, ratios=ratios):
            base = module.base_layer(inputs[0])
            delta = out - base
            seen = (base + delta).bfloat16().float() - base.bfloat16().float()
            ratios.append(((seen - delta).norm() / delta.norm()).item())

        hooks = [m.register_forward_hook(measure) for m in model.modules() if isinstance(m, LoraLayer)]
        with torch.no_grad():
            model(**ids)
        for h in hooks:
            h.remove()
        print(f"| {steps} | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} | {len(ratios)} |")


if __name__ == "__main__":
    main()
