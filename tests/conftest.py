"""Shared fixtures: a tiny random Anima set and the real tokenizer folders used by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from anima_core.models import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent

# The tests run tiny models, where thread start-up costs more than it saves (about 10x on a busy 2-core box).
torch.set_num_threads(1)


def tokenizers_root() -> Path:
    """$ANIMA_TOKENIZERS_DIR, else ../shared/tokenizers next to the checkout (folders qwen3_06b and t5_old)."""
    return Path(os.environ.get("ANIMA_TOKENIZERS_DIR", REPO_ROOT.parent / "shared" / "tokenizers"))


def _tokenizer_dir(name: str) -> Path:
    folder = tokenizers_root() / name
    if not folder.is_dir():
        pytest.skip(f"real tokenizer files not found at {folder} (set ANIMA_TOKENIZERS_DIR)")
    return folder


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    return _tokenizer_dir("qwen3_06b")


@pytest.fixture(scope="session")
def t5_tokenizer_dir() -> Path:
    return _tokenizer_dir("t5_old")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """TinyModelPaths (dit, qwen3, vae, qwen_tokenizer, t5_tokenizer); real tokenizers copied in when available."""
    root = tokenizers_root()
    return make_tiny_model(tmp_path_factory.mktemp("tiny_anima"), tokenizer_source=root if root.is_dir() else None)
