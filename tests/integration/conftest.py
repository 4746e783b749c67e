"""Fixtures for end-to-end tests: a tiny Llama + byte tokenizer saved as a local model folder, SFT data, and a
fake vLLM backend (`FakeVLLM`, the `fake_vllm` fixture) for the vLLM engine's tests in both modes."""

import json
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import ModelConfig, TechniqueConfig
from posttrain.models import load_model, load_tokenizer
from posttrain.rollout.engine import HFEngine

# pytest runs with --import-mode=importlib, which puts no test folder on sys.path: this one holds support.py,
# the integration tests' shared helpers.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama (hidden 64, so bitsandbytes can quantise it) saved as a Hugging Face folder."""
    from posttrain.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64)


SFT_ROWS = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(4)]


def write_sft(path, rows=SFT_ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def sft_file(tmp_path):
    return write_sft(tmp_path / "train.jsonl")


@pytest.fixture()
def make_cfg(tiny_model_dir, sft_file, tmp_path):
    """Build a validated RunConfig for the tiny model; keyword overrides use dotted names."""
    from posttrain.algorithms import load_config

    def make(run_name="run", **overrides):
        base = {
            "model.name": str(tiny_model_dir),
            "technique.name": "full",
            "data.train": str(sft_file),
            "data.max_length": 64,
            "optim.lr": 1e-2,
            "optim.batch_size": 8,
            "optim.warmup_steps": 0,
            "run.output_dir": str(tmp_path / run_name),
            "run.max_steps": 4,
            "run.progress": False,
            "run.report": False,  # plotting costs 0.5-2 s a run; test_report.py and the CLI tests keep it on
        }
        base.update(overrides)
        return load_config(None, [f"{k}={v}" for k, v in base.items()])

    return make


class FakeVLLM:
    """A stand-in for vLLM: holds its own copy of the base model, takes pushed weights by name like vLLM's
    `load_weights`, samples with HFEngine, and records every call. `keeps_pushes=False`: drops the pushed weights
    (a broken sync); `logp_shift`: added to every log-prob it returns (an engine that disagrees with the trainer)."""

    def __init__(self, model_dir, *, keeps_pushes=True, logp_shift=0.0):
        self.model = load_model(ModelConfig(name=str(model_dir)), TechniqueConfig(name="full"), train=False)
        self.tokenizer = load_tokenizer(ModelConfig(name=str(model_dir)))
        self.keeps_pushes, self.logp_shift = keeps_pushes, logp_shift
        self.calls, self.pushed = [], []

    def load_weights(self, weights):
        self.calls.append("load_weights")
        self.pushed.append({n: t.detach().clone() for n, t in weights})
        if self.keeps_pushes:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in weights:
                    params[n].copy_(t)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self):
        self.calls.append("sleep")

    def wake_up(self, tags):
        self.calls.append(f"wake_up:{','.join(tags)}")

    def sample(self, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop, stop_token_ids, seed, row_ids=None):
        self.calls.append("sample")
        r = HFEngine().generate(self.model, self.tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=[], seed=seed, row_ids=row_ids)  # fmt: skip
        lengths = r.completion_mask.sum(-1).tolist()
        logps = (r.sampling_logps + self.logp_shift).tolist()
        return [(ids[:k], lps[:k]) for ids, lps, k in zip(r.completion_ids.tolist(), logps, lengths)]


@pytest.fixture()
def fake_vllm(tiny_model_dir):
    """`FakeVLLM` over the tiny model: `fake_vllm(keeps_pushes=True, logp_shift=0.0)`."""

    def make(**kwargs):
        return FakeVLLM(tiny_model_dir, **kwargs)

    return make


@pytest.fixture()
def rl_cfg(make_cfg, tmp_path):
    """A GRPO run config on the tiny model (16 prompts, a letters-counting reward, 3 steps of 8 completions):
    `rl_cfg(name, **overrides)`; an override None removes that setting."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {a} {b}", "answer": str(a + b)}) + "\n"
                               for a in range(4) for b in range(4)), encoding="utf-8")  # fmt: skip
    (tmp_path / "rewards.py").write_text(
        'def letters(prompts, completions, **kwargs):\n    return [sum("a" <= c <= "z" for c in x) / 8 for x in completions]\n'
    )

    def make(name, **overrides):
        base = {"algorithm.name": "grpo", "algorithm.rewards": f"[{tmp_path / 'rewards.py'}:letters]",
                "data.train": str(prompts), "technique.name": "full", "algorithm.rollout.max_new_tokens": 8,
                "algorithm.num_generations": 4, "optim.batch_size": 8, "optim.lr": 1e-2, "run.max_steps": 3}  # fmt: skip
        return make_cfg(name, **{k: v for k, v in {**base, **overrides}.items() if v is not None})

    return make
