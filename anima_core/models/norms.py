"""The two RMSNorm variants the checkpoint was trained with (they differ only in where the cast happens), and
the DiT's LayerNorm with AdaLN modulation in one function."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _NormModulate(torch.autograd.Function):
    """``layer_norm(x) * (1 + scale) + shift``, saving x (in its own dtype), the per-row mean and rstd and
    ``1 + scale`` instead of the float32 copy of x and the normalised tensor the plain ops keep.

    The forward calls the same kernels under the caller's autocast state (on CUDA autocast normalises a bf16 x
    in float32, as it does for ``F.layer_norm``); backward recomputes the normalised rows with the same kernel
    and applies every cast and broadcast reduction autograd applies to the plain expression, in its order.
    """

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        normed, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], None, None, eps)
        one_plus = 1 + scale
        out = normed * one_plus + shift
        ctx.save_for_backward(x, mean, rstd, one_plus)
        ctx.eps = eps
        ctx.norm_dtype = normed.dtype
        ctx.shift_meta = (shift.shape, shift.dtype)
        ctx.scale_dtype = scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, one_plus = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad[:3]
        grad_x = grad_shift = grad_scale = None
        # autocast off for the recompute; the meta device (the no-host-sync test) has no autocast to turn off
        with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
            xn = x.to(ctx.norm_dtype)  # what the forward normalised (autocast's cast of x, or x itself)
            if need_shift:
                shape, dtype = ctx.shift_meta
                grad_shift = grad.sum_to_size(shape).to(dtype)
            if need_scale:
                normed = torch.native_layer_norm(xn, [x.shape[-1]], None, None, ctx.eps)[0]
                grad_scale = (grad * normed).to(one_plus.dtype).sum_to_size(one_plus.shape).to(ctx.scale_dtype)
            if need_x:
                grad_normed = (grad * one_plus).to(ctx.norm_dtype)
                grad_x = torch.ops.aten.native_layer_norm_backward(
                    grad_normed, xn, [x.shape[-1]], mean, rstd, None, None, [True, False, False]
                )[0].to(x.dtype)
        return grad_x, grad_shift, grad_scale, None


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """AdaLN modulation of a LayerNorm without affine weights: ``layer_norm(x) * (1 + scale) + shift`` in one
    pass (shift and scale broadcast against x), the same numbers as the plain expression.

    Written as one function of elementwise work around one row reduction so torch.compile (Inductor) makes it
    one kernel; with gradients it is a custom autograd function that keeps x and two numbers per row for
    backward instead of the normalised tensor (and, under autocast, a float32 copy of x).
    """
    if torch.is_grad_enabled() and (x.requires_grad or shift.requires_grad or scale.requires_grad):
        return _NormModulate.apply(x, shift, scale, eps)
    return torch.native_layer_norm(x, [x.shape[-1]], None, None, eps)[0] * (1 + scale) + shift


class RMSNorm(nn.Module):
    """DiT variant: normalise in float32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class T5RMSNorm(nn.Module):
    """Adapter variant (T5 style): variance in float32, cast to the weight's dtype when it is half precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = x.float() * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed
