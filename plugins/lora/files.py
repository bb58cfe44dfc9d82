"""LoRA safetensors files: writing (atomic, with sd-scripts hashes) and reading every common key form.

Saved names: DiT and adapter modules as kohya ``lora_unet_<path with _>`` (ComfyUI maps those from the
model's own keys), Qwen3 modules under ComfyUI's generic text-encoder names
``text_encoders.qwen3_06b.transformer.model.<path>``, since ComfyUI has no ``lora_te_*`` mapping for Qwen3.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from anima_core.atomic import atomic_write_bytes
from anima_core.errors import AnimaError

LONG_METADATA = 200  # characters of one metadata value shown by lora-info

# (down suffix, up suffix) pairs ComfyUI accepts for a plain LoRA, kohya first.
PAIR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A", ".lora_B"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
)
ALPHA_SUFFIX = ".alpha"


class LoRAFileError(AnimaError):
    """A LoRA file cannot be read or does not fit the model."""


@dataclass
class LoRAPair:
    """One module's factors as found in a file, under the file's own module key."""

    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: the file has no alpha (ComfyUI then uses factor 1.0, i.e. alpha = rank)
    tensor_keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoRAFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def pairs(self) -> tuple[list[LoRAPair], list[str]]:
        """Module factors found, and keys that belong to no down/up pair or alpha."""
        pairs: dict[str, LoRAPair] = {}
        used: set[str] = set()
        for name in self.tensors:
            for down_suffix, up_suffix in PAIR_SUFFIXES:
                if not name.endswith(down_suffix):
                    continue
                key = name[: -len(down_suffix)]
                up_name = key + up_suffix
                if up_name not in self.tensors or key in pairs:
                    continue
                alpha_name = key + ALPHA_SUFFIX
                alpha = float(self.tensors[alpha_name]) if alpha_name in self.tensors else None
                keys = [name, up_name] + ([alpha_name] if alpha is not None else [])
                pairs[key] = LoRAPair(key, self.tensors[name], self.tensors[up_name], alpha, keys)
                used.update(keys)
                break
        unused = sorted(set(self.tensors) - used)
        return sorted(pairs.values(), key=lambda p: p.key), unused


def _read(path: Path, read):
    """``read(handle)`` of the file's safetensors handle; a missing or damaged file is a LoRAFileError naming it."""
    if not path.is_file():
        raise LoRAFileError(f"LoRA file {path} does not exist. Check the path.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return read(handle)
    except Exception as err:  # safetensors raises several unrelated types for a damaged file
        raise LoRAFileError(
            f"LoRA file {path} is not a readable safetensors file ({err}). It may be truncated or of "
            "another format; save it again or re-download it."
        ) from err


def read_lora_file(path: str | os.PathLike) -> LoRAFile:
    path = Path(path)
    metadata, tensors = _read(path, lambda h: (dict(h.metadata() or {}), {name: h.get_tensor(name) for name in h.keys()}))
    return LoRAFile(path, tensors, metadata)


def read_lora_header(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) from the file's header; no tensor is read."""
    return _read(Path(path), lambda h: (dict(h.metadata() or {}), list(h.keys())))


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file serialised with only its ``ss_*`` metadata."""
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_lora_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (temp file in the same folder, fsync, rename), adding the sshs_* hashes."""
    bad = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if bad:
        raise TypeError(f"LoRA metadata values must be strings; not strings: {bad}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    data = safetensors_bytes(tensors, metadata)
    atomic_write_bytes(path, data)


def metadata_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def metadata_lines(metadata: dict[str, str]) -> list[str]:
    """The file's metadata for ``lora-info``, long values cut."""
    lines = ["", "metadata:"]
    for key in sorted(metadata):
        value = metadata[key]
        if len(value) > LONG_METADATA:
            value = value[:LONG_METADATA] + f"... ({len(value)} characters)"
        lines.append(f"  {key} = {value}")
    return lines
