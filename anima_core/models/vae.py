"""The Qwen-Image VAE (Wan 2.1 architecture) through diffusers' AutoencoderKLQwenImage, from Wan-named files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from anima_core.errors import ModelFileError
from anima_core.models.checkpoint import guess_file_kind, is_meta, load_strict, read_state_dict

LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8
# Wan residual-block sub-layers -> diffusers names.
RESIDUAL_NAMES = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                  "shortcut": "conv_shortcut"}  # fmt: skip
MIDDLE_NAMES = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
TOP_LEVEL = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
             "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out",
             "encoder.head.2": "encoder.conv_out", "decoder.head.0": "decoder.norm_out",
             "decoder.head.2": "decoder.conv_out"}  # fmt: skip
RES_BLOCKS_PER_UP_BLOCK = 3  # num_res_blocks + 1; the 4th slot of each decoder group is the upsampler


def _rename_block_inner(rest: str) -> str:
    for wan, diffusers in RESIDUAL_NAMES.items():
        if rest.startswith(wan + "."):
            return diffusers + rest[len(wan) :]
    return rest


def wan_key_to_diffusers(key: str) -> str:
    """One Wan/ComfyUI VAE key -> the AutoencoderKLQwenImage key (leaf names weight/bias/gamma unchanged)."""
    module, leaf = key.rsplit(".", 1)
    if module in TOP_LEVEL:
        return f"{TOP_LEVEL[module]}.{leaf}"
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", key):
        side, index, rest = m.groups()
        return f"{side}.mid_block.{MIDDLE_NAMES[index]}.{_rename_block_inner(rest)}"
    if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key):
        index, rest = m.groups()
        return f"encoder.down_blocks.{index}.{_rename_block_inner(rest)}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key):
        index, rest = int(m.group(1)), m.group(2)
        block, slot = divmod(index, RES_BLOCKS_PER_UP_BLOCK + 1)
        if slot == RES_BLOCKS_PER_UP_BLOCK:
            return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
        return f"decoder.up_blocks.{block}.resnets.{slot}.{_rename_block_inner(rest)}"
    return key


def diffusers_key_to_wan(key: str) -> str:
    """The inverse of ``wan_key_to_diffusers`` (used to write files in the released naming)."""
    module, leaf = key.rsplit(".", 1)
    for wan, diffusers in TOP_LEVEL.items():
        if module == diffusers:
            return f"{wan}.{leaf}"
    inner = {diffusers: wan for wan, diffusers in RESIDUAL_NAMES.items()}

    def wan_inner(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{inner[head]}.{tail}" if head in inner else rest

    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.\d|attentions\.0)\.(.+)", key):
        side, part, rest = m.groups()
        index = {v: k for k, v in MIDDLE_NAMES.items()}[part]
        return f"{side}.middle.{index}.{wan_inner(rest)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m.group(1)}.{wan_inner(m.group(2))}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        index = int(m.group(1)) * (RES_BLOCKS_PER_UP_BLOCK + 1) + RES_BLOCKS_PER_UP_BLOCK
        return f"decoder.upsamples.{index}.{m.group(2)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        index = int(m.group(1)) * (RES_BLOCKS_PER_UP_BLOCK + 1) + int(m.group(2))
        return f"decoder.upsamples.{index}.{wan_inner(m.group(3))}"
    return key


def to_diffusers_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan-named VAE weights -> diffusers names; files already in diffusers naming pass through."""
    if "conv1.weight" not in state_dict:  # diffusers files have quant_conv instead of the top-level conv1
        return state_dict
    return {wan_key_to_diffusers(k): v for k, v in state_dict.items()}


def _base_dim(state_dict, path) -> int:
    key = "encoder.conv_in.weight"
    if key not in state_dict or "decoder.conv_in.weight" not in state_dict:
        kind = guess_file_kind(set(state_dict))
        found = f" It looks like {kind}." if kind and "VAE" not in kind else ""
        raise ModelFileError(
            f"{path}: this is not a Qwen-Image / Wan 2.1 VAE file (no encoder.conv1 / decoder.conv1).{found} "
            "Pass qwen_image_vae.safetensors (ComfyUI 'vae') as the VAE."
        )
    return state_dict[key].shape[0]


class AnimaVAE:
    """Pixels in [-1, 1] <-> normalised 16-channel latents (per-channel mean/std, no scalar factor)."""

    def __init__(self, vae, identity: str):
        self.vae = vae
        self._identity = identity

    @property
    def device(self) -> torch.device:
        return self.vae.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.quant_conv.weight.dtype

    def identity(self) -> str:
        """A stable string naming the file, dtype and memory options (for cache keys)."""
        return _with_dtype(self._identity, self.dtype)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, LATENT_CHANNELS, 1, 1)
        mean = torch.tensor(LATENT_MEAN, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(LATENT_STD, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×H×W in [-1, 1] (H, W multiples of 8) -> B×16×H/8×W/8 float32 normalised posterior mean."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels B×3×H×W, got {tuple(pixels.shape)}")
        if pixels.shape[-1] % SPATIAL_FACTOR or pixels.shape[-2] % SPATIAL_FACTOR:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} must be a multiple of {SPATIAL_FACTOR}")
        x = pixels.to(device=self.device, dtype=self.dtype)[:, :, None]
        mu = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()
        mean, std = self._stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """B×16×h×w normalised latents -> B×3×8h×8w float32 pixels in [-1, 1]."""
        if latents.ndim == 5:  # B×16×1×h×w, the DiT's layout
            latents = latents[:, :, 0]
        mean, std = self._stats(latents)
        z = latents.float() * std + mean
        out = self.vae.decode(z.to(device=self.device, dtype=self.dtype)[:, :, None]).sample
        return out[:, :, 0].float().clamp(-1.0, 1.0)


def _height_chunked_conv_forward(conv: torch.nn.Module, rows: int):
    """A ``_conv_forward`` for ``conv`` that computes at most ``rows`` output rows at a time (exact: each slice of
    the zero-padded input carries its kernel halo)."""
    original = conv._conv_forward
    conv_fn = F.conv3d if isinstance(conv, torch.nn.Conv3d) else F.conv2d

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel_h = weight.shape[-2]
        if kernel_h == 1 or conv.stride[-2] != 1 or conv.dilation[-2] != 1 or x.shape[-2] <= rows + kernel_h:
            return original(x, weight, bias)
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])
        out_h = x.shape[-2] - kernel_h + 1
        out = None
        for y0 in range(0, out_h, rows):
            y1 = min(y0 + rows, out_h)
            piece = conv_fn(x[..., y0 : y1 + kernel_h - 1, :], weight, bias, conv.stride, 0, conv.dilation, conv.groups)
            if out is None:
                out = piece.new_empty((*piece.shape[:-2], out_h, piece.shape[-1]))
            out[..., y0:y1, :] = piece
        return out

    return forward


def enable_height_chunking(vae: torch.nn.Module, rows: int) -> None:
    """Run every stride-1 convolution of the VAE over at most ``rows`` output rows at a time (same result, less
    peak memory), like sd-scripts' ``--vae_chunk_size``."""
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            module._conv_forward = _height_chunked_conv_forward(module, rows)


def _single_frame_forward(conv: torch.nn.Conv3d):
    """A forward for one of the VAE's causal 3D convolutions that, for a single frame with nothing cached (every
    image encode and decode: the VAE sees pictures as one-frame videos), runs the equivalent 2D convolution.

    Causal padding puts kernel_t - 1 zero frames before the frame, so only the kernel's last temporal slice
    meets data: the 3D convolution multiplies two thirds of a 3x3x3 kernel by zeros. The 2D convolution with
    that slice computes the same sums without them (equal up to the order of float additions)."""
    original = conv.forward
    pad_w, _, pad_h, _, pad_front, _ = conv._padding

    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[2] != 1 or cache_x is not None or pad_front != conv.kernel_size[0] - 1 or conv.stride[0] != 1:
            return original(x, cache_x)
        out = F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], (pad_h, pad_w),
                       conv.dilation[1:], conv.groups)
        return out[:, :, None]

    return forward


def enable_single_frame_convs(vae: torch.nn.Module) -> None:
    for module in vae.modules():  # by name, so a diffusers release that moves the class still matches
        if type(module).__name__ == "QwenImageCausalConv3d":
            module.forward = _single_frame_forward(module)


def _file_identity(path: Path, chunk_size: int | None, tiled: bool) -> str:
    stat = path.stat()
    return f"vae={path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};chunk={chunk_size};tiled={tiled}"


def _with_dtype(identity: str, dtype: torch.dtype) -> str:
    return f"{identity};dtype={dtype}"


def vae_identity(path: str | os.PathLike, *, dtype: torch.dtype, chunk_size: int | None = None, tiled: bool = False) -> str:
    """What ``load_vae(...).identity()`` would return, without reading the weights (so cached latents can be
    checked before deciding whether the VAE is needed at all)."""
    return _with_dtype(_file_identity(Path(path), chunk_size, tiled), dtype)


def load_vae(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    tiled: bool = False,
) -> AnimaVAE:
    """The VAE from a Wan-named (released) or diffusers-named ``.safetensors`` / ``.pth`` file.

    ``chunk_size``: convolutions run over at most this many rows at a time (exact, less memory). ``tiled``:
    encode/decode in 256 px tiles with a 192 px stride and blended seams (least memory; changes the result
    slightly). Batches always run one image at a time.
    """
    from diffusers import AutoencoderKLQwenImage

    path = Path(path)
    state_dict = to_diffusers_names(read_state_dict(path, "VAE", header_only=is_meta(device)))
    base_dim = _base_dim(state_dict, path)
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(base_dim=base_dim, latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))
    load_strict(vae, {k: v.to(dtype) for k, v in state_dict.items()}, path, "Qwen-Image VAE")
    vae = vae.to(device=device).eval().requires_grad_(False)
    vae.use_slicing = True
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"VAE chunk size must be a positive number of rows, got {chunk_size}")
        enable_height_chunking(vae, chunk_size)  # on the 3D convolutions, as sd-scripts chunks them
    else:
        enable_single_frame_convs(vae)
    if tiled:
        vae.enable_tiling()
    return AnimaVAE(vae, _file_identity(path, chunk_size, tiled))
