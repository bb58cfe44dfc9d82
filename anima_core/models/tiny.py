"""A tiny random Anima set in the released file formats, for tests, the demo and bug reports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anima_core.models.checkpoint import save_safetensors_atomic
from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.llm_adapter import LLMAdapterConfig

TINY_ADAPTER = LLMAdapterConfig(source_dim=64, target_dim=64, model_dim=64, num_layers=2, num_heads=4)
# 4 blocks so that block swap (at most N - 2 swapped) has something to do.
TINY_DIT = DiTConfig(
    model_channels=64,
    num_blocks=4,
    num_heads=2,
    mlp_hidden=256,
    adaln_lora_dim=16,
    context_dim=64,
    llm_adapter=TINY_ADAPTER,
)
DIT_FILE = "anima-tiny.safetensors"


@dataclass(frozen=True)
class TinyModelPaths:
    dit: Path
    qwen3: Path
    vae: Path
    qwen_tokenizer: Path
    t5_tokenizer: Path


def randomize_norm_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Norm weights start at 1; make them random too so a test notices a norm that is skipped or misplaced."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))


def random_dit_state_dict(config: DiTConfig = TINY_DIT, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AnimaDiT(config)
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_norm_weights(model, generator)
    return model.state_dict()


def write_tiny_dit(path: str | os.PathLike, config: DiTConfig = TINY_DIT, seed: int = 0) -> Path:
    """A DiT file like the release: every key under ``net.``, the adapter inside, metadata format=pt."""
    path = Path(path)
    state_dict = {f"net.{k}": v for k, v in random_dit_state_dict(config, seed).items()}
    save_safetensors_atomic(state_dict, path, metadata={"format": "pt"})
    return path
