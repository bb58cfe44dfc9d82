"""Attention kernels behind one switch: PyTorch SDPA (default), flash-attn or xformers, optionally one sample at a
time. The DiT's attention has no mask, so every kernel computes the same thing.

All functions take q, k, v as [B, heads, L, head_dim] (the SDPA layout) and return the same layout.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "xformers")
PACKAGES = {"flash": "flash_attn", "xformers": "xformers"}
PIP_NAMES = {"flash": "flash-attn", "xformers": "xformers"}


def package_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class AttentionBackend:
    """What the DiT's attention layers run. ``split`` runs the batch one sample at a time (less peak memory)."""

    name: str = "sdpa"
    split: bool = False

    @classmethod
    def create(cls, name: str, split: bool = False) -> AttentionBackend:
        if name == "torch":
            name = "sdpa"
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if name in PACKAGES and not package_available(PACKAGES[name]):
            log.warning(
                "%s is not installed (pip install %s); using PyTorch SDPA instead", PIP_NAMES[name], PIP_NAMES[name]
            )
            name = "sdpa"
        return cls(name=name, split=split)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kernel = _sdpa
        # Both extensions only run half precision on CUDA; anything else (CPU tests, fp32) takes SDPA.
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            kernel = {"flash": _flash, "xformers": _xformers}.get(self.name, _sdpa)
        if not self.split or q.shape[0] == 1:
            return kernel(q, k, v)
        return torch.cat([kernel(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(q.shape[0])])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with a boolean key mask [B, Lk] (True = attend).

    A query whose keys are all masked gets an exact zero output. Such rows are computed against an all-True
    mask first, so neither the forward nor the backward pass ever sees a softmax over nothing (NaN).
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    key_mask = key_mask.to(device=q.device, dtype=torch.bool)
    has_key = key_mask.any(dim=-1)  # [B]
    safe_mask = (key_mask | ~has_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask)
    return out * has_key[:, None, None, None].to(out.dtype)
