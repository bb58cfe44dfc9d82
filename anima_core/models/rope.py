"""Rotary position embeddings: the DiT's 3D (t, h, w) variant and the adapter's 1D one.

Both use the rotate-half layout: pair (i, i + d/2) is rotated by angle i. Angles are computed in float32 and
never stored in the state dict.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Tables kept per (shape, device[, dtype]); aspect-ratio buckets use a handful of grid shapes.
ROPE_CACHE_SIZE = 32


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, heads, d] by angles whose cos/sin are [L, d] (broadcast over heads), in cos/sin's dtype."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def dit_rope_split(head_dim: int) -> tuple[int, int, int]:
    """(dim_t, dim_h, dim_w): the share of one head's dims given to each axis."""
    dim_h = head_dim // 6 * 2
    return head_dim - 2 * dim_h, dim_h, dim_h


def _axis_freqs(dim: int, ratio: float) -> torch.Tensor:
    # NTK-aware scaling of the base: theta = 10000 * ratio^(dim / (dim - 2)).
    theta = 10000.0 * ratio ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim
    return 1.0 / theta**exponents


def dit_rope_cos_sin(
    head_dim: int,
    grid: tuple[int, int, int],
    ratios: tuple[float, float, float] = (1.0, 4.0, 4.0),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T·H·W, head_dim] (float32) for a (T, H, W) token grid in row-major (t, h, w) order.

    ``ratios`` are the extrapolation ratios (t, h, w). Per token the half-angles are [t·g | h·f_h | w·f_w],
    duplicated to the full head_dim.
    """
    t, h, w = grid
    dim_t, dim_h, dim_w = dit_rope_split(head_dim)
    freqs_t = _axis_freqs(dim_t, ratios[0]).to(device)
    freqs_h = _axis_freqs(dim_h, ratios[1]).to(device)
    freqs_w = _axis_freqs(dim_w, ratios[2]).to(device)
    ang_t = torch.outer(torch.arange(t, device=device, dtype=torch.float32), freqs_t)
    ang_h = torch.outer(torch.arange(h, device=device, dtype=torch.float32), freqs_h)
    ang_w = torch.outer(torch.arange(w, device=device, dtype=torch.float32), freqs_w)
    half = torch.cat(
        [
            ang_t[:, None, None, :].expand(t, h, w, -1),
            ang_h[None, :, None, :].expand(t, h, w, -1),
            ang_w[None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim // 2)
    angles = torch.cat([half, half], dim=-1)
    return angles.cos(), angles.sin()


@lru_cache(maxsize=ROPE_CACHE_SIZE)
def cached_dit_rope_cos_sin(
    head_dim: int, grid: tuple[int, int, int], ratios: tuple[float, float, float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dit_rope_cos_sin`, computed once per grid and device. The tables are shared: never modify them.

    Built outside inference mode, so a table first made while sampling can still be saved for backward.
    """
    with torch.inference_mode(False):
        return dit_rope_cos_sin(head_dim, grid, ratios, device)


def adapter_rope_cos_sin(
    head_dim: int, length: int, device: torch.device | str | None = None, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] (float32) for positions 0..length-1, Llama style."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    half = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([half, half], dim=-1)
    return angles.cos(), angles.sin()


@lru_cache(maxsize=ROPE_CACHE_SIZE)
def cached_adapter_rope_cos_sin(
    head_dim: int, length: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adapter_rope_cos_sin` cast to ``dtype``, computed once per shape; shared, never modify them."""
    with torch.inference_mode(False):
        return tuple(t.to(dtype) for t in adapter_rope_cos_sin(head_dim, length, device))
