"""Using saved LoRA files: applying them for sampling, the after-save self-check, and ``lora-info``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from anima_plugins.lycoris.apply import merge_lycoris_file
from anima_plugins.lycoris.info import is_lycoris_file

from .files import LoRAFile, LoRAFileError, metadata_lines, read_lora_file
from .keymap import comfy_key_map, module_at, resolver_key_map, structural_address
from .model_match import model_lines
from .module import LoRAModule


def _te_model(text_encoder) -> nn.Module | None:
    return None if text_encoder is None else getattr(text_encoder, "model", text_encoder)


@dataclass
class AppliedLoRAs:
    """LoRA files patched into a model; ``remove()`` restores the model's own forwards (and merged weights)."""

    adapters: list  # LoRAModule, or anima_plugins.lycoris.apply.MergedModule
    files: list[str]

    def remove(self) -> None:
        for adapter in reversed(self.adapters):
            adapter.remove()
        self.adapters = []


def apply_lora_files(
    dit: nn.Module, text_encoder, files: Sequence[tuple[str | os.PathLike, float]]
) -> AppliedLoRAs:
    """Apply LoRA files (ours, kohya, ComfyUI/PEFT names) at the given strengths for inference; LyCORIS files
    (LoKr, LoHa, DoRA, full) are merged into the weights as ComfyUI merges them.

    Every key of every file must land on a Linear of the model with matching shapes, or LoRAFileError
    names the keys (a silently half-applied LoRA would make samples misleading).
    """
    te_model = _te_model(text_encoder)
    key_map = resolver_key_map(dit, te_model)
    adapters: list = []  # LoRAModule forward patches and merged LyCORIS modules, both with remove()
    try:
        for path, strength in files:
            if is_lycoris_file(path):
                adapters += merge_lycoris_file(dit, te_model, path, float(strength))
                continue
            lora_file = read_lora_file(path)
            plan = _plan(lora_file, key_map, dit, te_model)
            for pair, target in plan:
                adapter = LoRAModule(pair.key, target, rank=pair.rank, alpha=pair.alpha, multiplier=float(strength))
                with torch.no_grad():
                    adapter.lora_down.weight.copy_(pair.down)
                    adapter.lora_up.weight.copy_(pair.up)
                adapter.to(target.weight.device).eval().requires_grad_(False)
                adapter.apply_to()
                adapters.append(adapter)
    except BaseException:
        AppliedLoRAs(adapters, []).remove()
        raise
    return AppliedLoRAs(adapters, [str(p) for p, _ in files])


def _plan(lora_file: LoRAFile, key_map, dit, te_model) -> list[tuple]:
    pairs, stray = lora_file.pairs()
    problems = [f"{k}: not part of a down/up pair" for k in stray]
    plan = []
    for pair in pairs:
        address = key_map.get(pair.key)
        target = module_at(address, dit, te_model) if address else None
        if not isinstance(target, nn.Linear):
            problems.append(f"{pair.key}: no Linear layer of the model has this name")
        elif (target.out_features, target.in_features) != (pair.up.shape[0], pair.down.shape[1]):
            problems.append(
                f"{pair.key}: LoRA shape {pair.up.shape[0]}x{pair.down.shape[1]} does not fit the layer's "
                f"{target.out_features}x{target.in_features}"
            )
        else:
            plan.append((pair, target))
    if problems:
        raise LoRAFileError(
            f"LoRA file {lora_file.path} does not fit the loaded model; {len(problems)} problem(s): "
            + "; ".join(problems[:6])
            + ". Was it trained for another model, or with the text encoder while none is loaded?"
        )
    return plan


@dataclass
class SelfCheckResult:
    path: str
    ok: bool
    tensors: int
    modules: int
    unmatched_keys: list[str] = field(default_factory=list)  # keys ComfyUI would report as "not loaded"
    shape_errors: list[str] = field(default_factory=list)
    changed_modules: int = 0  # modules whose output changes on a random input once the file is applied
    output_changed: bool | None = None  # from the optional whole-model probe
    error: str | None = None

    @property
    def summary(self) -> str:
        if self.error:
            return f"LoRA self-check FAILED for {self.path}: {self.error}"
        state = "ok" if self.ok else "FAILED"
        parts = [
            f"LoRA self-check {state} for {self.path}: {self.tensors} tensors, {self.modules} modules",
            f"{len(self.unmatched_keys)} keys ComfyUI would not load",
            f"{len(self.shape_errors)} shape mismatches",
            f"{self.changed_modules}/{self.modules} modules change their output",
        ]
        if self.output_changed is not None:
            parts.append("model output changes" if self.output_changed else "model output UNCHANGED")
        text = ", ".join(parts)
        if self.unmatched_keys:
            text += f"; not loaded: {self.unmatched_keys[:5]}"
        if self.shape_errors:
            text += f"; shapes: {self.shape_errors[:3]}"
        return text

    def as_event(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "tensors": self.tensors,
            "modules": self.modules,
            "unmatched_keys": self.unmatched_keys[:20],
            "shape_errors": self.shape_errors[:20],
            "changed_modules": self.changed_modules,
            "output_changed": self.output_changed,
            "message": self.summary,
        }


def self_check(
    path: str | os.PathLike,
    dit: nn.Module,
    text_encoder,
    *,
    probe: Callable[[], torch.Tensor] | None = None,
) -> SelfCheckResult:
    """Re-read a saved file and check it as ComfyUI would see it.

    Every key must map onto a real weight by ComfyUI's key map, with the Linear's shape; applied at
    strength 1, the modules must change their layers' outputs on a random input (all of them, except
    modules frozen by a 0 learning rate, which keep their zero ``lora_up``). ``probe`` (optional) runs
    the whole model on a fixed small input; it is called without and with the LoRA applied.
    """
    try:
        lora_file = read_lora_file(path)
    except LoRAFileError as err:
        return SelfCheckResult(str(path), False, 0, 0, error=str(err))
    te_model = _te_model(text_encoder)
    key_map = comfy_key_map(dit, te_model)
    pairs, stray = lora_file.pairs()
    result = SelfCheckResult(str(path), False, len(lora_file.tensors), len(pairs), unmatched_keys=list(stray))
    generator = torch.Generator().manual_seed(0)
    for pair in pairs:
        address = key_map.get(pair.key)
        target = module_at(address, dit, te_model) if address else None
        if not isinstance(target, nn.Linear):
            result.unmatched_keys += pair.tensor_keys
            continue
        if (target.out_features, target.in_features) != (pair.up.shape[0], pair.down.shape[1]):
            result.shape_errors.append(f"{pair.key}: {tuple(pair.up.shape)}/{tuple(pair.down.shape)} vs {tuple(target.weight.shape)}")
            continue
        x = torch.randn(2, target.in_features, generator=generator)
        delta = (x @ pair.down.float().T) @ pair.up.float().T * pair.scale
        result.changed_modules += bool(delta.abs().max() > 0)
    if probe is not None and not result.unmatched_keys and not result.shape_errors:
        with torch.no_grad():
            before = probe()
            applied = apply_lora_files(dit, text_encoder, [(path, 1.0)])
            try:
                after = probe()
            finally:
                applied.remove()
        result.output_changed = not torch.equal(before, after)
    result.ok = (
        not result.unmatched_keys
        and not result.shape_errors
        and result.changed_modules > 0  # modules frozen by a 0 learning rate keep a zero lora_up: no change
        and result.output_changed is not False
    )
    return result


def lora_info(path: str | os.PathLike, dit: nn.Module | None = None, text_encoder=None) -> str:
    """A readable report: modules with ranks and alphas, metadata, and whether ComfyUI would load every key.

    Without a model the ComfyUI check uses Anima's known layer names; with one (a meta-device load is enough) it
    uses its real weights, and the report says whether the LoRA was made for that DiT (``model_match``).
    """
    lora_file = read_lora_file(path)
    pairs, stray = lora_file.pairs()
    if dit is not None:
        key_map = comfy_key_map(dit, _te_model(text_encoder))
        address_of = key_map.get
    else:
        address_of = structural_address
    lines = [f"{lora_file.path}: {len(lora_file.tensors)} tensors, {len(pairs)} LoRA modules"]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in lora_file.tensors.values()})
    ranks = sorted({p.rank for p in pairs})
    lines.append(f"dtypes: {', '.join(dtypes)}; ranks: {', '.join(map(str, ranks)) or '-'}")
    lines += model_lines(lora_file.path, dit)
    lines.append("")
    lines.append(f"{'module':<72} {'rank':>5} {'alpha':>7} {'out x in':>12}  ComfyUI")
    not_loaded = list(stray)
    for pair in pairs:
        address = address_of(pair.key)
        if address is None:
            not_loaded += pair.tensor_keys
        alpha = "-" if pair.alpha is None else f"{pair.alpha:g}"
        shape = f"{pair.up.shape[0]}x{pair.down.shape[1]}"
        lines.append(f"{pair.key:<72} {pair.rank:>5} {alpha:>7} {shape:>12}  {'yes' if address else 'NO'}")
    lines.append("")
    if not_loaded:
        lines.append(f"ComfyUI would NOT load {len(not_loaded)} key(s), e.g. {not_loaded[:5]}")
        if any(k.startswith(("lora_te_", "lora_te1_")) for k in not_loaded):
            lines.append(
                "  (sd-scripts names Qwen3 modules lora_te_*; ComfyUI expects "
                "text_encoders.qwen3_06b.transformer.model.<module>)"
            )
    else:
        lines.append("ComfyUI would load every key.")
    lines += metadata_lines(lora_file.metadata)
    return "\n".join(lines)
