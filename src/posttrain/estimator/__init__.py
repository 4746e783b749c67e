"""Memory, compute, time and cost of post-training a model, before anything is trained.

`estimate(...)` (keywords) or `estimate_for(EstimateInputs(...))` returns an `Estimate` (peak memory per GPU
with its breakdown, the GPUs it fits, FLOPs, hours, cost, and every assumption made). Plain Python over dataclasses: importing it loads no torch. Formulas and their
sources are in `memory.py` and `compute.py` and in docs/estimator.md.
"""

from posttrain.estimator.core import Estimate, estimate, estimate_for
from posttrain.estimator.hardware import GPU, GPUS, load_gpu_table
from posttrain.estimator.inputs import EstimateInputs
from posttrain.estimator.models import ARCHITECTURES, Arch, resolve_model

__all__ = [
    "ARCHITECTURES",
    "GPU",
    "GPUS",
    "Arch",
    "Estimate",
    "EstimateInputs",
    "estimate",
    "estimate_for",
    "load_gpu_table",
    "resolve_model",
]
