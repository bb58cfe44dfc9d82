"""Reading weight files and matching them strictly to a module, with errors a person can act on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from anima_core.atomic import atomic_write_bytes
from anima_core.errors import ModelFileError

STRIPPED_PREFIXES = ("model.diffusion_model.", "net.")
MAX_LISTED_KEYS = 12
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def is_meta(device: torch.device | str) -> bool:
    """Loading "onto the meta device" reads only file headers: how `validate` checks model files without weights."""
    return torch.device(device).type == "meta"


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {
            k: torch.empty(f.get_slice(k).get_shape(), dtype=SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32),
                           device="meta")
            for k in f.keys()
        }


def read_state_dict(path: str | os.PathLike, what: str, *, header_only: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (or, for other suffixes, a ``torch.load``-able weights file) on CPU.

    ``header_only``: meta tensors with the file's names, shapes and dtypes, and no weights read.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: the {what} file does not exist. Check the path in the profile.")
    if path.suffix == ".safetensors":
        try:
            return _safetensors_header(path) if header_only else load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"{path}: cannot read this {what} file as safetensors ({exc}). The file is probably truncated or "
                f"not a safetensors file; download it again and compare its size with the published one."
            ) from exc
    try:
        if header_only:
            data = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types for a bad file
        raise ModelFileError(
            f"{path}: cannot read this {what} file with torch.load ({exc}). The file is probably truncated or not a "
            f"PyTorch weights file; download it again, or use the .safetensors release."
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelFileError(f"{path}: this {what} file does not hold a plain dict of tensors; use the released file.")
    return data


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``net.`` / ``model.diffusion_model.`` prefix that every key of a DiT file carries."""
    for prefix in STRIPPED_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def guess_file_kind(keys: set[str]) -> str | None:
    """What a file that is not the expected kind most likely is, to name it in errors."""
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.down_blocks.")) for k in keys):
        return "a VAE (pass it as the VAE instead)"
    if any(k.startswith(("layers.", "model.layers.")) for k in keys) and any("embed_tokens" in k for k in keys):
        return "a Qwen3 text encoder (pass it as the text encoder instead)"
    if any(k.endswith("x_embedder.proj.1.weight") for k in keys):
        return "an Anima DiT (pass it as model.dit instead)"
    if any(k.startswith(("lora_unet_", "lora_te", "diffusion_model.")) and "lora" in k for k in keys):
        return "a LoRA (pass it as a network weight, not as the base model)"
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """Load with exact key and shape matching (tensors are assigned, so ``module`` may live on the meta device)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es): {_listed(wrong_shape)}")
        raise ModelFileError(
            f"{path}: the file does not match the {what} architecture detected from it; "
            + "; ".join(parts)
            + ". The file is incomplete, from another model, or a modified export: use the released file."
        )
    module.load_state_dict(state_dict, strict=True, assign=True)


def save_safetensors_atomic(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file so that a crash never leaves a half-written file under ``path``."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata))
