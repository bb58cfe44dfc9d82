"""Image checks at scan time and image loading (resize to cover, crop, flip, colour augmentation, alpha mask)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from anima_core.data.buckets import Placement

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Modes that convert to RGB(A) without changing what the picture looks like.
_SAFE_MODES = {"1", "L", "LA", "La", "P", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"}


class BadImage(Exception):
    """One image cannot be used; the message is the reason, without the path."""


@dataclass(frozen=True)
class ImageFacts:
    width: int
    height: int
    has_alpha: bool
    sha256: str


def _mode_problem(image: Image.Image, alpha_mask: bool) -> str | None:
    mode = image.mode
    if mode == "CMYK":
        return "CMYK colour mode is not supported (colours would come out wrong); save it as RGB"
    if mode.startswith("I") or mode == "F":
        return f"{mode} ({'16' if mode.startswith('I;16') else '32'}-bit) mode is not supported; save it as 8-bit RGB"
    if mode == "P" and "transparency" in image.info and not alpha_mask:
        return (
            "palette image with transparency: the transparent pixels would train as their palette colour; "
            "save it as RGB on a background, or use alpha_mask = true"
        )
    if mode not in _SAFE_MODES:
        return f"image mode {mode} is not supported; save it as 8-bit RGB"
    return None


def check_image(path: Path, alpha_mask: bool, *, decode: bool = True) -> ImageFacts:
    """Read and fully decode one image. Raises BadImage naming what is wrong.

    ``decode=False`` reads only the header (size and mode, no content hash): enough to plan buckets and cache
    memory, not to train.
    """
    data = path.read_bytes() if decode else b""
    if decode and not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data) if decode else path) as image:
            problem = _mode_problem(image, alpha_mask)
            if problem:
                raise BadImage(problem)
            width, height = image.size
            if decode:
                if image.format == "JPEG":
                    # libjpeg still decodes every coefficient, so a truncated or corrupt stream fails just as in
                    # a full decode, but at 1/8 scale it skips most of the inverse DCT: the check needs the
                    # stream to be whole, not the pixels (twice as fast on small images, 20% on photos).
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
            has_alpha = image.mode in ("LA", "La", "RGBA", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    except BadImage:
        raise
    except UnidentifiedImageError as e:  # its text names the in-memory buffer, which means nothing to a person
        raise BadImage("not an image any decoder recognises (wrong extension, or not an image at all)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot be decoded (truncated or corrupt): {e}") from e
    return ImageFacts(width, height, has_alpha, hashlib.sha256(data).hexdigest() if decode else "")


def _resample(name: str | None, downscale: bool) -> Image.Resampling:
    if name is None:
        return Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS
    return {
        "lanczos": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "linear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "cubic": Image.Resampling.BICUBIC,
        "area": Image.Resampling.BOX,
        "box": Image.Resampling.BOX,
    }[name]


@dataclass(frozen=True)
class Framing:
    """How one sample is cut from its image: the crop offset into the resized image, and the flip."""

    left: int
    top: int
    flip: bool


def centre_framing(placement: Placement, flip: bool = False) -> Framing:
    (bw, bh), (rw, rh) = placement.bucket, placement.resized
    return Framing((rw - bw) // 2, (rh - bh) // 2, flip)


def random_framing(placement: Placement, rng: np.random.Generator, flip: bool) -> Framing:
    (bw, bh), (rw, rh) = placement.bucket, placement.resized
    return Framing(int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1)), flip)


def _color_aug(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sd-scripts' augmentation: a third of the time, a hue shift of up to ±16° or a gamma of 0.95-1.05."""
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        hsv = np.array(Image.fromarray(rgb).convert("HSV"), dtype=np.int32)
        shift = rng.uniform(-16.0, 16.0) / 360.0 * 256.0
        hsv[..., 0] = (hsv[..., 0] + round(shift)) % 256
        return np.array(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(((rgb / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass
class LoadedImage:
    pixels: torch.Tensor  # 3xHxW float32 in [-1, 1]
    alpha: torch.Tensor | None  # 1xHxW float32 in [0, 1]


@dataclass
class ImageBytes:
    """An image as loaded, before any float conversion: what latent caching hands to the device."""

    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None  # HxW uint8


def read_image(
    path: Path,
    placement: Placement,
    framing: Framing,
    *,
    interpolation: str | None,
    alpha_mask: bool,
    color_rng: np.random.Generator | None = None,
) -> ImageBytes:
    """Decode, resize to cover the bucket, crop, flip and (optionally) colour-augment one image."""
    mode = "RGBA" if alpha_mask else "RGB"
    with Image.open(path) as image:
        image.load()
        if image.mode != mode:  # convert() to the same mode is a copy
            image = image.convert(mode)
    rw, rh = placement.resized
    if image.size != (rw, rh):
        downscale = image.width >= rw and image.height >= rh
        image = image.resize((rw, rh), _resample(interpolation, downscale))
    bw, bh = placement.bucket
    if (framing.left, framing.top, bw, bh) != (0, 0, rw, rh):
        image = image.crop((framing.left, framing.top, framing.left + bw, framing.top + bh))
    if framing.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.array(image)  # writable, for torch.from_numpy
    rgb = np.ascontiguousarray(array[..., :3]) if alpha_mask else array
    if color_rng is not None:
        rgb = _color_aug(rgb, color_rng)
    return ImageBytes(rgb, np.ascontiguousarray(array[..., 3]) if alpha_mask else None)


def to_pixels(rgb: torch.Tensor) -> torch.Tensor:
    """...xHxWx3 uint8 -> ...x3xHxW float32 in [-1, 1] (contiguous), on rgb's device: one image or a batch."""
    return rgb.movedim(-1, -3).contiguous().float().div_(127.5).sub_(1.0)


def to_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """HxW uint8 -> 1xHxW float32 in [0, 1]."""
    return alpha.float().div_(255.0).unsqueeze(0)


def load_image(path: Path, placement: Placement, framing: Framing, **options) -> LoadedImage:
    """`read_image` (with its keyword options), as float tensors for training."""
    raw = read_image(path, placement, framing, **options)
    return LoadedImage(to_pixels(torch.from_numpy(raw.rgb)), None if raw.alpha is None else to_alpha(torch.from_numpy(raw.alpha)))
