"""Applying a LyCORIS file for inference (``anima-train sample --lora``), the way ComfyUI does: each module's
weight is rebuilt by ComfyUI's rule and merged into its layer, W + strength · (W' − W). ``remove`` puts the
layer's own weight back bit for bit (kept on the CPU meanwhile). Needs torch only."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from anima_plugins.lora.files import LoRAFileError, read_lora_file
from anima_plugins.lora.keymap import module_at, resolver_key_map

from .formats import FormatError, comfy_bias_difference, comfy_weight, group_modules


@dataclass
class MergedModule:
    """One module merged into its layer; ``remove`` restores the layer's weight and bias."""

    name: str
    layer: nn.Linear
    weight: torch.Tensor
    bias: torch.Tensor | None

    def remove(self) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(self.weight)
            if self.bias is not None:
                self.layer.bias.copy_(self.bias)


def merge_lycoris_file(dit: nn.Module, te_model: nn.Module | None, path: str | os.PathLike, strength: float) -> list[MergedModule]:
    """Merge every module of the file, or none: a key that fits no Linear is a LoRAFileError naming it."""
    lora_file = read_lora_file(path)
    modules, stray = group_modules(lora_file.tensors)
    key_map = resolver_key_map(dit, te_model)
    problems = [f"{key}: not part of a module ComfyUI reads" for key in stray]
    plan = []
    for module in modules:
        address = key_map.get(module.key)
        layer = module_at(address, dit, te_model) if address else None
        if not isinstance(layer, nn.Linear):
            problems.append(f"{module.key}: no Linear layer of the model has this name")
            continue
        try:
            shape = module.weight_shape()
        except FormatError as err:
            problems.append(str(err))
            continue
        if tuple(shape) != tuple(layer.weight.shape):
            problems.append(f"{module.key}: {module.algo} difference {tuple(shape)} does not fit the layer's {tuple(layer.weight.shape)}")
            continue
        if module.get("diff_b") is not None and layer.bias is None:
            problems.append(f"{module.key}: the file changes a bias this layer does not have")
            continue
        plan.append((module, layer))
    if problems:
        raise LoRAFileError(
            f"LyCORIS file {lora_file.path} does not fit the loaded model; {len(problems)} problem(s): "
            + "; ".join(problems[:6]) + ". Was it trained for another model, or with the text encoder while none is loaded?"
        )
    merged = []
    with torch.no_grad():
        for module, layer in plan:
            weight = layer.weight
            merged.append(MergedModule(module.key, layer, weight.detach().cpu().clone(),
                                       None if layer.bias is None else layer.bias.detach().cpu().clone()))
            original = weight.float()
            weight.copy_((original + strength * (comfy_weight(module, weight) - original)).to(weight.dtype))
            bias = comfy_bias_difference(module)
            if bias is not None:
                layer.bias.copy_((layer.bias.float() + strength * bias.to(layer.bias.device)).to(layer.bias.dtype))
    return merged
