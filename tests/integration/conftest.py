"""Fixtures for end-to-end tests: a tiny Llama + byte tokenizer saved as a local model folder, and SFT data."""

import json
import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, which puts no test folder on sys.path: this one holds browser_check.py,
# the report tests' shared helpers.
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
