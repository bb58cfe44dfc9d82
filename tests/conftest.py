"""Shared fixtures: a tiny random Anima set and the real tokenizer folders used by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anima_core.models import make_tiny_model
from anima_core.models.tokenizer_files import PACKAGED_QWEN3_TOKENIZER, PACKAGED_T5_TOKENIZER


# The tests run tiny models, where thread start-up costs more than it saves (about 10x on a busy 2-core box).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen3-0.6B tokenizer, shipped inside the package (so CI has it too)."""
    return PACKAGED_QWEN3_TOKENIZER


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    return PACKAGED_T5_TOKENIZER


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """RandomModelPaths (dit, qwen3, vae, qwen_tokenizer, t5_tokenizer); the shipped tokenizers copied in."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_anima"))
