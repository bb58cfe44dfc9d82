"""Module paths, LoRA names and the component a module belongs to.

Module paths are the checkpoint keys without ``.weight`` (``blocks.3.self_attn.q_proj``); the text
encoder's are relative to the transformers ``Qwen3Model`` (``layers.0.mlp.up_proj``).
"""

from __future__ import annotations

import re

DIT_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"  # our in-memory name for Qwen3 modules; files use COMFY_TE_PREFIX instead
TE_LEGACY_PREFIXES = ("lora_te", "lora_te1")  # sd-scripts current and first release
COMFY_DIT_PREFIX = "diffusion_model."
COMFY_TE_PREFIX = "text_encoders.qwen3_06b.transformer.model."

# Where LoRA may go: sd-scripts' container classes Block, PatchEmbed, TimestepEmbedding, FinalLayer and
# LLMAdapterTransformerBlock, expressed as the module paths they own (llm_adapter.out_proj is never a target).
DIT_TARGET_PATH = re.compile(r"(blocks\.\d+|x_embedder|t_embedder\.1|final_layer)\..+")
ADAPTER_TARGET_PATH = re.compile(r"llm_adapter\.blocks\.\d+\..+")
TE_TARGET_PATH = re.compile(r"layers\.\d+\.(self_attn|mlp)\..+")
DIT_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def rank_component(path: str) -> str:
    """The component whose rank arg applies (first-release priority: adapter, modulation, attention, MLP)."""
    for emb in ("x_embedder", "t_embedder", "final_layer"):
        if path.startswith(emb + "."):
            return emb
    if path.startswith("llm_adapter."):
        return "llm_adapter"
    if "adaln_modulation" in path:
        return "mod"
    for component in ("self_attn", "cross_attn", "mlp"):
        if f".{component}." in path:
            return component
    return "other"


def lr_component(path: str) -> str:
    """The component-learning-rate group of a DiT module path, by the full-fine-tune rule of the spec (§7.6)."""
    if "llm_adapter" in path:
        return "llm_adapter"
    for component, marker in (
        ("self_attn", ".self_attn"),
        ("cross_attn", ".cross_attn"),
        ("mlp", ".mlp"),
        ("mod", ".adaln_modulation"),
    ):
        if marker in path:
            return component
    return "base"


def dit_block_index(path: str) -> int | None:
    match = DIT_BLOCK_INDEX.match(path)
    return int(match.group(1)) if match else None
