"""The rollout engines by name (`algorithm.rollout.engine`): each builds its engine from the run config (`vllm` and
`vllm-server` are the same `VLLMEngine` over a colocated or a served backend)."""

from __future__ import annotations

import torch

from posttrain.rollout.engine import Engine, HFEngine
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.rollout.vllm_server import server_engine


def _hf_engine(cfg) -> HFEngine:
    rollout = cfg.algorithm.rollout
    dtype = getattr(torch, rollout.dtype) if rollout.dtype is not None else None  # `rollout.dtype`: "bfloat16"
    return HFEngine(merge_adapters=rollout.merge_adapters, dtype=dtype)


ENGINES = {
    "hf": _hf_engine,
    "vllm": VLLMEngine.from_config,
    "vllm-server": server_engine,
}


def get_engine(name: str, cfg) -> Engine:
    return ENGINES[name](cfg)
