"""Which model weight a LoRA file key addresses.

``comfy_key_map`` restates ComfyUI's rule (spec §7.7) from the model's own weights, independently of our
saving code, so a self-check against it shows what ComfyUI would load. ``resolver_key_map`` adds the
sd-scripts Qwen3 names (``lora_te_*``, ``lora_te1_*``) that ComfyUI ignores, for our own loading.
"""

from __future__ import annotations

import re

from torch import nn

from .names import COMFY_DIT_PREFIX, COMFY_TE_PREFIX, DIT_PREFIX, TE_LEGACY_PREFIXES, kohya_name

# (part, module path)
Address = tuple[str, str]

# Anima weights (2B release and the tiny test models share the names) that are Linear layers, for
# ``lora-info`` when no model is loaded.
ANIMA_DIT_LINEAR = re.compile(
    r"blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)"
    r"|blocks\.\d+\.mlp\.layer[12]"
    r"|blocks\.\d+\.adaln_modulation_(self_attn|cross_attn|mlp)\.[12]"
    r"|x_embedder\.proj\.1|t_embedder\.1\.linear_[12]|final_layer\.linear|final_layer\.adaln_modulation\.[12]"
    r"|llm_adapter\.blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj|llm_adapter\.blocks\.\d+\.mlp\.[02]"
    r"|llm_adapter\.out_proj"
)
QWEN3_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")


def _weight_paths(root: nn.Module) -> list[str]:
    return [key[: -len(".weight")] for key in root.state_dict() if key.endswith(".weight")]


def comfy_key_map(dit: nn.Module, text_encoder_model: nn.Module | None) -> dict[str, Address]:
    key_map: dict[str, Address] = {}
    for path in _weight_paths(dit):
        key_map[kohya_name(DIT_PREFIX, path)] = ("dit", path)
        key_map[COMFY_DIT_PREFIX + path] = ("dit", path)
    if text_encoder_model is not None:
        for path in _weight_paths(text_encoder_model):
            key_map[COMFY_TE_PREFIX + path] = ("te", path)
    return key_map


def resolver_key_map(dit: nn.Module, text_encoder_model: nn.Module | None) -> dict[str, Address]:
    key_map = comfy_key_map(dit, text_encoder_model)
    if text_encoder_model is not None:
        for path in _weight_paths(text_encoder_model):
            for prefix in TE_LEGACY_PREFIXES:
                key_map[kohya_name(prefix, path)] = ("te", path)
    return key_map


def structural_address(key: str) -> Address | None:
    """Address of a module key by Anima's known layer names alone (no model loaded): ComfyUI's forms only."""
    if key.startswith(COMFY_DIT_PREFIX) and ANIMA_DIT_LINEAR.fullmatch(key[len(COMFY_DIT_PREFIX) :]):
        return ("dit", key[len(COMFY_DIT_PREFIX) :])
    if key.startswith(COMFY_TE_PREFIX) and QWEN3_LINEAR.fullmatch(key[len(COMFY_TE_PREFIX) :]):
        return ("te", key[len(COMFY_TE_PREFIX) :])
    if key.startswith(DIT_PREFIX + "_"):
        underscored = key[len(DIT_PREFIX) + 1 :]
        # An underscored name is ambiguous in general; try every dot placement the Anima names allow.
        for path in _dotted_candidates(underscored):
            if ANIMA_DIT_LINEAR.fullmatch(path):
                return ("dit", path)
    return None


def _dotted_candidates(underscored: str) -> list[str]:
    parts = underscored.split("_")
    results = []

    def walk(index: int, current: str) -> None:
        if index == len(parts):
            results.append(current)
            return
        walk(index + 1, current + "." + parts[index])
        walk(index + 1, current + "_" + parts[index])

    if len(parts) <= 14:  # Anima names have at most 8 parts; longer names are not Anima layers
        walk(1, parts[0])
    return results


def module_at(address: Address, dit: nn.Module, te_model: nn.Module | None) -> nn.Module | None:
    part, path = address
    root = dit if part == "dit" else te_model
    if root is None:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
