"""Shared fixtures: a tiny byte-level tokenizer and a tiny random Llama, built in code (no downloads)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread (and subprocesses inherit this); OpenMP spin-waiting across threads
# costs more than it gains on 2 cores. Tests with the embedded model raise it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.testing import tiny_tokenizer as make

    return make()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from posttrain.testing import tiny_model as make

    return make(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model and tokenizer saved as a local Hugging Face folder."""
    from posttrain.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))
