"""Config detection from tensor shapes and ``load_dit``."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from anima_core.errors import ModelFileError
from anima_core.models.checkpoint import guess_file_kind, is_meta, load_strict, read_state_dict, strip_prefixes
from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.llm_adapter import LLMAdapterConfig

log = logging.getLogger(__name__)

PATCH_EMBED_KEY = "x_embedder.proj.1.weight"
ADAPTER_KEY = "llm_adapter.out_proj.weight"
ADAPTER_PREFIX = "llm_adapter."
# Position buffers that sd-scripts' own DiT saves as persistent (spec §1.3); they are derived from the config,
# never learned, so a file that carries them (sd-scripts full fine-tunes, Anima-2.9B) loads without them.
DERIVED_BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")


@dataclass(frozen=True)
class Release:
    """A DiT layout people train on; the shapes of a file are checked against these."""

    name: str
    width: int
    num_blocks: int
    num_heads: int


RELEASES = (
    Release("Anima 2B", 2048, 28, 16),
    # Gazingstars123/Anima-2.9B: the 2B model's 28 blocks expanded to 40 at the same width.
    Release("Anima 2.9B", 2048, 40, 16),
    Release("Cosmos-Predict2 14B layout", 5120, 36, 40),
    Release("1280-wide layout", 1280, 20, 20),
)


def known_release(config: DiTConfig) -> Release | None:
    for release in RELEASES:
        if (release.width, release.num_blocks, release.num_heads) == (
            config.model_channels, config.num_blocks, config.num_heads
        ):
            return release
    return None


def describe_dit(config: DiTConfig) -> str:
    """``Anima 2.9B (40 blocks, width 2048)``, or the shapes alone for a layout no release has."""
    shapes = f"{config.num_blocks} blocks, width {config.model_channels}"
    release = known_release(config)
    return f"{release.name} ({shapes})" if release else f"DiT of {shapes}"


def drop_derived_buffers(state_dict: dict) -> dict:
    if not any(k in state_dict for k in DERIVED_BUFFERS):
        return state_dict
    return {k: v for k, v in state_dict.items() if k not in DERIVED_BUFFERS}
# The RoPE extrapolation ratios (t, h, w) go with the latent channel count.
ROPE_RATIOS = {16: (1.0, 4.0, 4.0), 17: (1.0, 3.0, 3.0)}


def _count_indexed(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return len(indices)


def _shape(state_dict, key: str, path) -> torch.Size:
    if key not in state_dict:
        raise ModelFileError(
            f"{path}: key {key!r} is missing, so the Anima DiT layout cannot be detected. "
            "The file is incomplete or not an Anima DiT; use the released anima-*.safetensors file."
        )
    return state_dict[key].shape


def detect_adapter_config(state_dict, path) -> LLMAdapterConfig:
    embed = _shape(state_dict, "llm_adapter.embed.weight", path)
    model_dim = _shape(state_dict, "llm_adapter.blocks.0.self_attn.q_proj.weight", path)[0]
    head_dim = _shape(state_dict, "llm_adapter.blocks.0.self_attn.q_norm.weight", path)[0]
    mlp_hidden = _shape(state_dict, "llm_adapter.blocks.0.mlp.0.weight", path)[0]
    return LLMAdapterConfig(
        source_dim=_shape(state_dict, "llm_adapter.blocks.0.cross_attn.k_proj.weight", path)[1],
        target_dim=embed[1],
        model_dim=model_dim,
        num_layers=_count_indexed(state_dict, "llm_adapter.blocks."),
        num_heads=model_dim // head_dim,
        vocab_size=embed[0],
        mlp_ratio=mlp_hidden / model_dim,
    )


def detect_dit_config(state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> DiTConfig:
    """The DiT's config read from shapes (prefixes already stripped); the adapter when its keys are present."""
    if PATCH_EMBED_KEY not in state_dict:
        kind = guess_file_kind(set(state_dict))
        found = f" It looks like {kind}." if kind else ""
        raise ModelFileError(
            f"{path}: this is not an Anima DiT file (no {PATCH_EMBED_KEY!r}).{found} "
            "Pass the DiT file (anima-*.safetensors, ComfyUI 'diffusion_models') as the DiT."
        )
    width, in_features = state_dict[PATCH_EMBED_KEY].shape
    patch = 4  # 2x2 spatial, 1 temporal
    in_channels = in_features // patch - 1  # -1: the padding-mask channel
    if in_channels not in ROPE_RATIOS:
        raise ModelFileError(
            f"{path}: {PATCH_EMBED_KEY} has {in_features} input features, which fits no Anima release "
            "(expected 68 = (16 latent + 1 mask channels) x 2 x 2). Use an Anima DiT file."
        )
    head_dim = _shape(state_dict, "blocks.0.self_attn.q_norm.weight", path)[0]
    num_blocks = _count_indexed(state_dict, "blocks.")
    num_heads = width // head_dim
    same_width = [r for r in RELEASES if r.width == width]
    if same_width and not any((r.num_blocks, r.num_heads) == (num_blocks, num_heads) for r in same_width):
        expected = " or ".join(f"{r.num_blocks} blocks / {r.num_heads} heads ({r.name})" for r in same_width)
        log.warning(
            "%s: width %d means %s in the releases we know, the file has %d / %d; using the file's shapes",
            path, width, expected, num_blocks, num_heads,
        )
    return DiTConfig(
        model_channels=width,
        num_blocks=num_blocks,
        num_heads=num_heads,
        mlp_hidden=_shape(state_dict, "blocks.0.mlp.layer1.weight", path)[0],
        adaln_lora_dim=_shape(state_dict, "blocks.0.adaln_modulation_self_attn.1.weight", path)[0],
        context_dim=_shape(state_dict, "blocks.0.cross_attn.k_proj.weight", path)[1],
        in_channels=in_channels,
        out_channels=_shape(state_dict, "final_layer.linear.weight", path)[0] // patch,
        rope_ratios=ROPE_RATIOS[in_channels],
        llm_adapter=detect_adapter_config(state_dict, path) if ADAPTER_KEY in state_dict else None,
    )


def read_adapter(path, *, header_only: bool = False) -> dict[str, torch.Tensor]:
    state_dict = strip_prefixes(read_state_dict(path, "LLM adapter", header_only=header_only))
    if not all(k.startswith(ADAPTER_PREFIX) for k in state_dict):
        state_dict = {ADAPTER_PREFIX + k: v for k, v in state_dict.items()}
    if ADAPTER_KEY not in state_dict:
        raise ModelFileError(
            f"{path}: this is not an Anima LLM adapter file (no 'out_proj.weight'). Pass the adapter weights, "
            "or leave llm_adapter_path empty when the DiT file already contains them."
        )
    return state_dict


def load_dit(
    path: str | os.PathLike,
    *,
    llm_adapter_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> AnimaDiT:
    """The Anima DiT from a released single file (``net.`` or ``model.diffusion_model.`` keys), strictly matched.

    The LLM adapter comes from the same file, or from ``llm_adapter_path`` (whose weights then replace it).
    ``device="meta"`` reads only the files' headers (every check, no weights).
    """
    header_only = is_meta(device)
    state_dict = drop_derived_buffers(strip_prefixes(read_state_dict(path, "DiT", header_only=header_only)))
    if llm_adapter_path is not None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ADAPTER_PREFIX)}
        state_dict.update(read_adapter(llm_adapter_path, header_only=header_only))
    config = detect_dit_config(state_dict, path)
    with torch.device("meta"):
        model = AnimaDiT(config)
    load_strict(model, state_dict, path, "Anima DiT")
    return model.to(device=device, dtype=dtype)
