"""``lora-info`` for LyCORIS files: modules with their algorithm, rank and shape, metadata, and whether
ComfyUI would load every key (by ComfyUI's key forms and the Anima layer names). Needs torch only."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from anima_plugins.lora.files import metadata_lines, read_lora_file
from anima_plugins.lora.keymap import comfy_key_map, structural_address
from anima_plugins.lora.model_match import model_lines

from .formats import LYCORIS_ONLY, FormatError, group_modules


def is_lycoris_file(path: str | os.PathLike) -> bool:
    """True when a key has a form only LyCORIS writes (LoHa, LoKr, full, DoRA, Tucker)."""
    return any(name.endswith(LYCORIS_ONLY) for name in read_lora_file(path).tensors)


def lycoris_info(path: str | os.PathLike, dit: nn.Module | None = None, text_encoder=None) -> str:
    lora_file = read_lora_file(Path(path))
    modules, stray = group_modules(lora_file.tensors)
    if dit is not None:
        te_model = None if text_encoder is None else getattr(text_encoder, "model", text_encoder)
        address_of = comfy_key_map(dit, te_model).get
    else:
        address_of = structural_address
    algorithms = sorted({m.algo for m in modules})
    lines = [f"{lora_file.path}: {len(lora_file.tensors)} tensors, {len(modules)} LyCORIS modules "
             f"({', '.join(algorithms) or '-'}{', DoRA' if any(m.dora for m in modules) else ''})"]
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in lora_file.tensors.values()})
    lines.append(f"dtypes: {', '.join(dtypes)}")
    lines += model_lines(lora_file.path, dit)
    lines.append("")
    lines.append(f"{'module':<72} {'algo':>7} {'rank':>5} {'alpha':>7} {'out x in':>12}  ComfyUI")
    not_loaded = list(stray)
    for module in modules:
        address = address_of(module.key)
        try:
            out_features, in_features = module.weight_shape()
            shape = f"{out_features}x{in_features}"
        except FormatError:
            shape, address = "?", None
        if address is None:
            not_loaded += module.tensor_keys
        algo = module.algo + ("+D" if module.dora else "")
        rank = "-" if module.rank is None else str(module.rank)
        alpha = "-" if module.alpha is None else f"{module.alpha:g}"
        lines.append(f"{module.key:<72} {algo:>7} {rank:>5} {alpha:>7} {shape:>12}  {'yes' if address else 'NO'}")
    lines.append("")
    if not_loaded:
        lines.append(f"ComfyUI would NOT load {len(not_loaded)} key(s), e.g. {not_loaded[:5]}")
    else:
        lines.append("ComfyUI would load every key.")
    lines += metadata_lines(lora_file.metadata)
    return "\n".join(lines)
