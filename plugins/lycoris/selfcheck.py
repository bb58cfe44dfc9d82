"""The after-save self-check of a LyCORIS file: ComfyUI's reconstruction against the module's own output.

For every module of the file: the key must map onto a Linear of the model by ComfyUI's key map, in a form
ComfyUI reads; the weight ComfyUI rebuilds from the file's tensors (``formats.comfy_weight``, DoRA included)
must change the layer's output on random inputs exactly as the live LyCORIS module does (its forward minus
the layer's own forward, in eval mode), within the precision of the file and the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from anima_plugins.lora.files import LoRAFileError, read_lora_file
from anima_plugins.lora.keymap import Address, comfy_key_map, module_at

from .formats import FormatError, comfy_bias_difference, comfy_weight, group_modules

PROBE_ROWS = 4
# Relative tolerance per precision, against the size of the layer's output (rounding of W·x dominates).
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class LycorisSelfCheck:
    path: str
    ok: bool
    tensors: int
    modules: int
    algorithms: list[str] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)  # keys ComfyUI would report as "not loaded"
    shape_errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # ComfyUI's rebuild differs from the module's output
    missing_modules: list[str] = field(default_factory=list)  # network modules the file lacks
    changed_modules: int = 0
    worst_relative_error: float = 0.0  # |own - ComfyUI| / |ComfyUI's change|, over modules that change
    error: str | None = None

    @property
    def summary(self) -> str:
        if self.error:
            return f"LyCORIS self-check FAILED for {self.path}: {self.error}"
        state = "ok" if self.ok else "FAILED"
        text = (
            f"LyCORIS self-check {state} for {self.path}: {self.tensors} tensors, {self.modules} "
            f"{'/'.join(self.algorithms) or '-'} modules, {len(self.unmatched_keys)} keys ComfyUI would not load, "
            f"{len(self.shape_errors)} shape mismatches, {len(self.mismatches)} modules ComfyUI rebuilds "
            f"differently (worst relative error {self.worst_relative_error:.1e}), "
            f"{self.changed_modules}/{self.modules} modules change their output"
        )
        for label, items in (("not loaded", self.unmatched_keys), ("shapes", self.shape_errors),
                             ("rebuilt differently", self.mismatches), ("missing from the file", self.missing_modules)):
            if items:
                text += f"; {label}: {items[:4]}"
        return text


def _tolerance(*dtypes: torch.dtype) -> float:
    return max(TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]) for dtype in dtypes)


@torch.no_grad()
def _compare(module: nn.Module, layer: nn.Linear, adapter, generator: torch.Generator) -> tuple[float, float, float]:
    """(|own - ComfyUI|, |ComfyUI's change|, |layer output|) as max-abs over a random probe."""
    weight = layer.weight
    x = torch.randn(PROBE_ROWS, layer.in_features, generator=generator).to(weight.device)
    comfy_change = x @ (comfy_weight(adapter, weight) - weight.float()).T
    bias = comfy_bias_difference(adapter)
    if bias is not None:
        comfy_change = comfy_change + bias.to(weight.device)
    was_training = module.training
    module.train(False)
    try:
        x_model = x.to(weight.dtype)
        own_change = (module(x_model).float() - module.org_forward(x_model).float())
        base = module.org_forward(x_model).float()
    finally:
        module.train(was_training)
    return (own_change - comfy_change).abs().max().item(), comfy_change.abs().max().item(), base.abs().max().item()


def self_check(
    path: str | os.PathLike,
    *,
    dit: nn.Module,
    text_encoder_model: nn.Module | None,
    modules_by_address: dict[Address, nn.Module],
) -> LycorisSelfCheck:
    try:
        lora_file = read_lora_file(path)
    except LoRAFileError as err:
        return LycorisSelfCheck(str(path), False, 0, 0, error=str(err))
    adapters, stray = group_modules(lora_file.tensors)
    result = LycorisSelfCheck(str(path), False, len(lora_file.tensors), len(adapters),
                              algorithms=sorted({a.algo for a in adapters}), unmatched_keys=list(stray))
    key_map = comfy_key_map(dit, text_encoder_model)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for adapter in adapters:
        address = key_map.get(adapter.key)
        layer = module_at(address, dit, text_encoder_model) if address else None
        if not isinstance(layer, nn.Linear):
            result.unmatched_keys += adapter.tensor_keys
            continue
        try:
            shape = adapter.weight_shape()
        except FormatError as err:
            result.shape_errors.append(str(err))
            continue
        if tuple(shape) != tuple(layer.weight.shape):
            result.shape_errors.append(f"{adapter.key}: {adapter.algo} difference {tuple(shape)} vs weight {tuple(layer.weight.shape)}")
            continue
        module = modules_by_address.get(address)
        if module is None:
            result.mismatches.append(f"{adapter.key}: the network has no module for this layer")
            continue
        seen.add(address)
        difference, change, output = _compare(module, layer, adapter, generator)
        file_dtypes = [t.dtype for t in adapter.tensors.values()]
        tolerance = _tolerance(layer.weight.dtype, next(module.parameters()).dtype, *file_dtypes)
        if change > 0:
            result.changed_modules += 1
            result.worst_relative_error = max(result.worst_relative_error, difference / change)
        if difference > tolerance * max(output, change):
            result.mismatches.append(f"{adapter.key}: differs by {difference:.2e} (change {change:.2e})")
    result.missing_modules = sorted(f"{part}:{path}" for part, path in set(modules_by_address) - seen)
    result.ok = not (result.unmatched_keys or result.shape_errors or result.mismatches or result.missing_modules) and (
        result.changed_modules > 0  # every module frozen by a 0 learning rate and still at its zero start: no change
    )
    return result
