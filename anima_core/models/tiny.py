"""Random Anima sets in the released file formats: tiny for tests, the demo and bug reports; full size (the
released 2B shapes) for real-size runs on a GPU without the real weights."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anima_core.models.checkpoint import save_safetensors_atomic
from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.llm_adapter import LLMAdapterConfig
from anima_core.models.tokenizer_files import PACKAGED_TOKENIZERS

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
class RandomModelPaths:
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


def random_dit_state_dict(
    config: DiTConfig = TINY_DIT, seed: int = 0, *, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Initialised on ``device`` (the 2B model's init takes minutes on a CPU, a second on a GPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AnimaDiT(config)
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_norm_weights(model, generator)
    return model.state_dict()


def write_random_dit(
    path: str | os.PathLike,
    config: DiTConfig = TINY_DIT,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """A DiT file like the release: every key under ``net.``, the adapter inside, metadata format=pt."""
    path = Path(path)
    state_dict = {f"net.{k}": v.to("cpu", dtype) for k, v in random_dit_state_dict(config, seed, device=device).items()}
    save_safetensors_atomic(state_dict, path, metadata={"format": "pt"})
    return path


TINY_QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": TINY_ADAPTER.source_dim,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "max_position_embeddings": 4096,
    "vocab_size": 151936,  # the real vocabulary size, so the shipped tokenizer's ids fit
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
TINY_VAE_BASE_DIM = 8


def copy_tokenizers(source: Path, qwen_dir: Path, t5_dir: Path) -> None:
    """Copy tokenizer files (``source``/qwen3_06b and ``source``/t5_old) into the tiny set."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
        if (source / "qwen3_06b" / name).is_file():
            shutil.copyfile(source / "qwen3_06b" / name, qwen_dir / name)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (source / "t5_old" / name).is_file():
            shutil.copyfile(source / "t5_old" / name, t5_dir / name)


def random_qwen3_state_dict(
    values: dict, seed: int = 0, *, std: float = 0.1, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Qwen3 weights with ``model.``-prefixed keys for the config ``values``: matrices N(0, std), norms near 1."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**{k: v for k, v in values.items() if k != "architectures"})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3Model(config).state_dict().items() if "rotary_emb" not in k}
    # Filled here rather than by transformers' init, which is slow and (for the tiny model) too small to exercise
    # anything; the full-size model takes std 0.02, as 28 layers of std 0.1 would overflow bf16.
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.{k}": ((1.0 + 0.2 * torch.randn(shape, generator=generator))
                       if len(shape) == 1
                       else std * torch.randn(shape, generator=generator)).to(dtype)
        for k, shape in shapes.items()
    }


def write_tiny_qwen3(folder: Path, seed: int = 0) -> Path:
    """A Hugging Face style Qwen3 folder: config.json + model.safetensors with ``model.``-prefixed keys."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(random_qwen3_state_dict(TINY_QWEN3, seed), folder / "model.safetensors",
                            metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY_QWEN3, indent=2))
    return folder


def write_random_vae(
    path: Path, seed: int = 0, *, base_dim: int = TINY_VAE_BASE_DIM, dtype: torch.dtype | None = None
) -> Path:
    """A VAE file in the released (Wan) naming (``base_dim`` 96 is the released size)."""
    from diffusers import AutoencoderKLQwenImage

    from anima_core.models.vae import diffusers_key_to_wan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=base_dim)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    state_dict = {diffusers_key_to_wan(k): v.to(dtype) for k, v in vae.state_dict().items()}
    save_safetensors_atomic(state_dict, path)
    return path


def make_tiny_model(
    directory: str | os.PathLike, *, tokenizer_source: str | os.PathLike | None = None, seed: int = 0
) -> RandomModelPaths:
    """Write a random Anima set into ``directory``: DiT (adapter inside, ``net.`` keys), a Qwen3 folder with its
    tokenizer, a T5 tokenizer folder and a Wan-named VAE.

    Tokenizers: copied from ``tokenizer_source`` (folders qwen3_06b and t5_old; default: the ones shipped with
    the package), so the set is self-contained like a released download.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = RandomModelPaths(
        dit=directory / DIT_FILE,
        qwen3=directory / "qwen3",
        vae=directory / "qwen_image_vae_tiny.safetensors",
        qwen_tokenizer=directory / "qwen3",
        t5_tokenizer=directory / "t5_tokenizer",
    )
    write_random_dit(paths.dit, seed=seed)
    write_tiny_qwen3(paths.qwen3, seed=seed)
    write_random_vae(paths.vae, seed=seed)
    paths.t5_tokenizer.mkdir(exist_ok=True)
    copy_tokenizers(Path(tokenizer_source or PACKAGED_TOKENIZERS), paths.qwen_tokenizer, paths.t5_tokenizer)
    return paths


FULL_VAE_BASE_DIM = 96


def make_full_size_model(
    directory: str | os.PathLike, *, device: torch.device | str = "cpu", seed: int = 0
) -> RandomModelPaths:
    """The released 2B set with random weights, as the release ships it: bf16 DiT file (adapter inside), the
    single ``qwen_3_06b_base.safetensors`` (no config.json: the loader's Qwen3-0.6B config applies), a
    ``qwen_image_vae.safetensors`` of the released size, and the packaged tokenizers. For GPU runs at real size
    (``bench/real_size_run.py``); about 5.5 GB on disk.
    """
    from anima_core.models.text_encoder import QWEN3_06B_CONFIG

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = RandomModelPaths(
        dit=directory / "anima-random-2b.safetensors",
        qwen3=directory / "qwen_3_06b_base.safetensors",
        vae=directory / "qwen_image_vae.safetensors",
        qwen_tokenizer=directory / "qwen3_06b",
        t5_tokenizer=directory / "t5_old",
    )
    write_random_dit(paths.dit, DiTConfig(), seed, dtype=torch.bfloat16, device=device)
    save_safetensors_atomic(random_qwen3_state_dict(QWEN3_06B_CONFIG, seed, std=0.02, dtype=torch.bfloat16),
                            paths.qwen3, metadata={"format": "pt"})
    write_random_vae(paths.vae, seed, base_dim=FULL_VAE_BASE_DIM, dtype=torch.bfloat16)
    paths.qwen_tokenizer.mkdir(exist_ok=True)
    paths.t5_tokenizer.mkdir(exist_ok=True)
    copy_tokenizers(Path(PACKAGED_TOKENIZERS), paths.qwen_tokenizer, paths.t5_tokenizer)
    return paths
