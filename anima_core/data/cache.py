"""Latent and text-encoder-output caches: npz files in the sd-scripts layout (spec §3.4, §8.3) or memory.

Each stored entry carries an `anima_key` (JSON) naming everything the tensors depend on; a mismatch in
any field makes the entry stale, and the field names say why it is rebuilt.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from anima_core.atomic import atomic_path

VAE_SCALE = 8  # the Qwen-Image / Wan VAE downsamples by 8 in each direction

_KEY_MEANING = {
    "image_sha256": "the image file changed",
    "bucket": "the bucket changed",
    "resized": "the resize changed",
    "crop_ltrb": "the crop changed",
    "flip": "flip augmentation changed",
    "alpha_mask": "alpha_mask changed",
    "interpolation": "resize_interpolation changed",
    "vae": "the VAE changed",
    "dtype": "the VAE dtype changed",
    "caption": "the caption changed",
    "qwen3_max_token_length": "qwen3_max_token_length changed",
    "t5_max_token_length": "t5_max_token_length changed",
    "encoder": "the text encoder changed",
}


def stale_reason(stored: dict | None, wanted: dict) -> str | None:
    """None when the stored key matches; otherwise why the entry must be rebuilt."""
    if stored is None:
        return "not cached yet"
    changed = [k for k in wanted if stored.get(k) != wanted[k]]
    if not changed:
        return None
    return "; ".join(_KEY_MEANING.get(k, f"{k} changed") for k in changed)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], *, sync_folder: bool = True) -> None:
    with atomic_path(path, sync_folder=sync_folder) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of an npz file, or None when it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def read_stored_key(path: Path, key_name: str, required: tuple[str, ...]) -> dict | None:
    """The JSON key of a cache file, reading only the zip directory and the key itself, never the tensors.

    None when the file is missing or unreadable, lacks one of ``required``, or its key is not JSON.
    """
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            if any(f"{name}.npy" not in members for name in (key_name, *required)):
                return None
            return json.loads(_npy_text(archive.read(f"{key_name}.npy")))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _npy_text(member: bytes) -> str:
    """The string in a .npy member that holds one string, as `_key_array` writes it (version 1.0, little-endian
    '<U'); anything else goes through numpy. Why not numpy always: its header parser (ast.literal_eval) was
    two thirds of checking a cache file, and the reuse check of a large dataset is this, once per file."""
    if member[:6] == b"\x93NUMPY" and member[6:8] == b"\x01\x00":
        end = 10 + int.from_bytes(member[8:10], "little")
        header = member[10:end]
        if b"'descr': '<U" in header and b"'shape': ()" in header:
            return member[end:].decode("utf-32-le").rstrip("\x00")
    return str(np.lib.format.read_array(io.BytesIO(member), allow_pickle=False))


def _key_array(key: dict) -> np.ndarray:
    return np.array(json.dumps(key, sort_keys=True))


# ---- latents -------------------------------------------------------------------------------------


def latent_cache_path(image: Path, original_size: tuple[int, int]) -> Path:
    w, h = original_size
    return image.with_name(f"{image.stem}_{w:04d}x{h:04d}_anima.npz")


def latent_suffix(bucket: tuple[int, int]) -> str:
    return f"{bucket[1] // VAE_SCALE}x{bucket[0] // VAE_SCALE}"


def stored_latent_key(path: Path, bucket: tuple[int, int], flip: bool) -> dict | None:
    suffix = latent_suffix(bucket)
    required = (f"latents_{suffix}",) + ((f"latents_flipped_{suffix}",) if flip else ())
    return read_stored_key(path, f"anima_key_{suffix}", required)


def store_latents(
    path: Path,
    bucket: tuple[int, int],
    key: dict,
    latents: torch.Tensor,
    flipped: torch.Tensor | None,
    alpha: torch.Tensor | None,
    original_size: tuple[int, int],
    crop: tuple[int, int, int, int],
    *,
    sync_folder: bool = True,
) -> None:
    """Add or replace one bucket resolution in the image's npz, keeping the other resolutions it holds."""
    suffix = latent_suffix(bucket)
    arrays = read_npz(path) or {}
    for name in [k for k in arrays if k.endswith("_" + suffix)]:
        del arrays[name]
    arrays[f"latents_{suffix}"] = latents.float().cpu().numpy()
    arrays[f"original_size_{suffix}"] = np.array(original_size, dtype=np.int64)
    arrays[f"crop_ltrb_{suffix}"] = np.array(crop, dtype=np.int64)
    if flipped is not None:
        arrays[f"latents_flipped_{suffix}"] = flipped.float().cpu().numpy()
    if alpha is not None:
        arrays[f"alpha_mask_{suffix}"] = alpha.float().cpu().numpy()
    arrays[f"anima_key_{suffix}"] = _key_array(key)
    write_npz_atomic(path, arrays, sync_folder=sync_folder)


def load_latents(path: Path, bucket: tuple[int, int], flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents 16xhxw, alpha mask 1xHxW or None) for one bucket resolution of a cache file."""
    suffix = latent_suffix(bucket)
    with np.load(path, allow_pickle=False) as data:
        latents = data[f"latents_flipped_{suffix}" if flipped else f"latents_{suffix}"]
        alpha = data[f"alpha_mask_{suffix}"] if f"alpha_mask_{suffix}" in data.files else None
    if latents.ndim == 4:  # first-release files kept a frame axis
        latents = latents[:, 0]
    return torch.from_numpy(latents), None if alpha is None else torch.from_numpy(alpha)


# ---- text-encoder outputs ------------------------------------------------------------------------


def text_cache_path(image: Path) -> Path:
    return image.with_name(f"{image.stem}_anima_te.npz")


TEXT_KEYS = ("prompt_embeds", "attn_mask", "t5_input_ids", "t5_attn_mask", "caption_dropout_rate")


def stored_text_key(path: Path) -> dict | None:
    return read_stored_key(path, "anima_key", TEXT_KEYS)


def store_text(
    path: Path, key: dict, outputs: tuple[torch.Tensor, ...], caption_dropout_rate: float, *, sync_folder: bool = True
) -> None:
    states, mask, t5_ids, t5_mask = outputs
    write_npz_atomic(
        path,
        {
            "prompt_embeds": states.float().cpu().numpy(),
            "attn_mask": mask.cpu().numpy().astype(np.int64),
            "t5_input_ids": t5_ids.cpu().numpy().astype(np.int32),
            "t5_attn_mask": t5_mask.cpu().numpy().astype(np.int32),
            "caption_dropout_rate": np.array(caption_dropout_rate, dtype=np.float32),
            "anima_key": _key_array(key),
        },
        sync_folder=sync_folder,
    )


def text_row(states: torch.Tensor, mask: torch.Tensor, t5_ids: torch.Tensor, t5_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One caption's outputs in the dtypes batches carry, whether they came from memory or disk."""
    return states.float(), mask.long(), t5_ids.long(), t5_mask.long()


def load_text(path: Path) -> tuple[torch.Tensor, ...]:
    with np.load(path, allow_pickle=False) as data:
        return text_row(*(torch.from_numpy(data[k]) for k in TEXT_KEYS[:4]))


def empty_text_like(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What encoding "" gives (spec §3.3): zero states, Qwen mask 0, T5 ids [1, 0, ...], T5 mask [1, 0, ...]."""
    states, mask, t5_ids, t5_mask = outputs
    ids = torch.zeros_like(t5_ids)
    ids[..., 0] = 1
    t5m = torch.zeros_like(t5_mask)
    t5m[..., 0] = 1
    return torch.zeros_like(states), torch.zeros_like(mask), ids, t5m
