"""Shared fixtures: a tiny byte-level tokenizer and a tiny random Llama, built in code (no downloads)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.testing import tiny_tokenizer as make

    return make()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from posttrain.testing import tiny_model as make

    return make(len(tiny_tokenizer))
