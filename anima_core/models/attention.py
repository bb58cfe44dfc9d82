"""Attention kernels behind one switch: PyTorch SDPA (default) or flash-attn, optionally one sample at a time.

All functions take q, k, v as [B, heads, L, head_dim] (the SDPA layout) and return the same layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


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
        if name == "flash" and not flash_attn_available():
            log.warning("flash-attn is not installed (pip install flash-attn); using PyTorch SDPA instead")
            name = "sdpa"
        return cls(name=name, split=split)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kernel = _flash if self.name == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else _sdpa
        if not self.split or q.shape[0] == 1:
            return kernel(q, k, v)
        return torch.cat([kernel(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(q.shape[0])])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
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
