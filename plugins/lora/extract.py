"""``anima-train extract-lora``: a LoRA of the difference between a fine-tuned DiT and its base.

Each Linear a LoRA may target gets the best rank-``dim`` approximation of its weight difference (the truncated
SVD, Eckart–Young): ``up = U·√S``, ``down = √S·Vᵀ``, alpha = dim (scale 1). The report gives, per module, the
fraction of the difference kept (the share of its squared Frobenius norm in the kept singular values), and
names the tensors a LoRA cannot carry (biases, norm weights) that differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from anima_core.errors import AnimaError
from anima_core.models.checkpoint import read_state_dict, strip_prefixes
from anima_core.models.dit_loading import describe_dit, detect_dit_config, drop_derived_buffers
from anima_core.training.metadata import DIT_BLOCKS_KEY, DIT_KEY

from .files import metadata_json, write_lora_file
from .names import ADAPTER_TARGET_PATH, DIT_PREFIX, DIT_TARGET_PATH, kohya_name


@dataclass
class ModuleDifference:
    path: str
    rank: int
    kept: float  # fraction of the difference's squared norm the LoRA keeps


@dataclass
class Extraction:
    modules: list[ModuleDifference]
    not_carried: list[str]  # differing tensors a LoRA cannot represent
    unchanged: int  # LoRA-able weights equal in both files (left out)

    def lines(self) -> list[str]:
        out = [f"{m.path}: rank {m.rank}, keeps {100 * m.kept:.1f}% of the difference" for m in self.modules]
        if self.modules:
            total = sum(m.kept for m in self.modules) / len(self.modules)
            out.append(f"{len(self.modules)} modules, on average {100 * total:.1f}% of each difference kept; "
                       f"{self.unchanged} unchanged weights left out")
        if self.not_carried:
            out.append(f"not in the LoRA (a LoRA carries only Linear weights): {len(self.not_carried)} changed tensors, "
                       + ", ".join(self.not_carried[:8]) + ("..." if len(self.not_carried) > 8 else ""))
        return out


def _read(path, what: str) -> dict[str, torch.Tensor]:
    return drop_derived_buffers(strip_prefixes(read_state_dict(path, what)))


def _lora_able(key: str, tensor: torch.Tensor) -> bool:
    if tensor.dim() != 2 or not key.endswith(".weight"):
        return False
    path = key.removesuffix(".weight")
    return bool(DIT_TARGET_PATH.fullmatch(path) or ADAPTER_TARGET_PATH.fullmatch(path))


def extract_lora(base_path: str | os.PathLike, tuned_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 dim: int, device: str = "cpu", save_dtype: torch.dtype = torch.float32) -> Extraction:
    if dim < 1:
        raise AnimaError(f"extract-lora --dim {dim}: the rank must be at least 1")
    base, tuned = _read(base_path, "base DiT"), _read(tuned_path, "fine-tuned DiT")
    if base.keys() != tuned.keys() or any(base[k].shape != tuned[k].shape for k in base):
        odd = sorted(set(base) ^ set(tuned)) or [k for k in base if base[k].shape != tuned[k].shape]
        raise AnimaError(f"{tuned_path}: not a fine-tune of {base_path} (different keys or shapes: {', '.join(odd[:5])}); "
                         "give the base model the fine-tune started from")
    tensors: dict[str, torch.Tensor] = {}
    modules, not_carried, unchanged = [], [], 0
    for key in sorted(base):
        difference = tuned[key].to(device, torch.float32) - base[key].to(device, torch.float32)
        if not _lora_able(key, base[key]):
            if difference.any():
                not_carried.append(key)
            continue
        if not difference.any():
            unchanged += 1
            continue
        u, s, vh = torch.linalg.svd(difference, full_matrices=False)
        rank = min(dim, s.numel())
        root = s[:rank].sqrt()
        name = kohya_name(DIT_PREFIX, key.removesuffix(".weight"))
        tensors[f"{name}.lora_up.weight"] = (u[:, :rank] * root).cpu().to(save_dtype)
        tensors[f"{name}.lora_down.weight"] = (root[:, None] * vh[:rank]).cpu().to(save_dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        energy = s.square()
        modules.append(ModuleDifference(key.removesuffix(".weight"), rank, float(energy[:rank].sum() / energy.sum())))
    if not modules:
        raise AnimaError(f"{tuned_path}: no Linear weight differs from {base_path}; there is nothing to extract")
    config = detect_dit_config(base, base_path)
    metadata = {
        "ss_network_module": "networks.lora_anima", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
        "ss_network_args": metadata_json({"extracted_from": os.path.basename(str(tuned_path))}),
        DIT_KEY: describe_dit(config), DIT_BLOCKS_KEY: str(config.num_blocks),
    }
    write_lora_file(out_path, tensors, metadata)
    return Extraction(modules, not_carried, unchanged)
