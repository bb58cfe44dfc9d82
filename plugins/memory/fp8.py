"""fp8_base: frozen base Linear weights stored as float8 e4m3 with one float32 scale per output row.

Each quantised ``nn.Linear`` keeps its module path and its ``weight`` name (now float8) and gains a
non-persistent ``weight_scale`` buffer; its instance ``forward`` is replaced by one that dequantises to the
input's dtype (bf16 in training). A network plugin that later wraps ``linear.forward`` wraps this one, so
LoRA keeps working. The custom autograd function saves the float8 weight, not a dequantised copy, so
without checkpointing the saved activations do not grow by a high-precision copy of every weight.

Norms, embedders, AdaLN modulation and the final layer stay in their dtype (the same exclusions as the
reference inference script's fp8 mode), and so does anything the network adds.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from anima_core.training.memory import MemoryStrategy, MemoryStrategyError, option

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Per-row scale floor: an all-zero row must not divide by zero.
_MIN_SCALE = 1e-12
_EXCLUDED_NAME_PARTS = ("embedder", "norm", "adaln", "final_layer", "embed")


def is_fp8_candidate(name: str, module: nn.Module) -> bool:
    """Whether fp8_base stores this DiT module's weight as float8 (a Linear outside the excluded parts)."""
    return isinstance(module, nn.Linear) and not any(part in name for part in _EXCLUDED_NAME_PARTS)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale [out, 1]) with ``weight ≈ q.float() * scale``; each row's max maps to 448."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(_MIN_SCALE)
    return (w / scale).to(FP8_DTYPE), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        w = dequantize_weight(weight, scale, x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_weight(weight, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Linear.apply(x, self.weight, self.weight_scale, self.bias)


def quantize_linear(linear: nn.Linear) -> None:
    """Store ``linear.weight`` as float8 in place (same module, same parameter name) and patch its forward."""
    if linear.weight.requires_grad:
        raise MemoryStrategyError(
            "fp8_base only stores frozen base weights as float8, but a DiT Linear weight requires grad; "
            "turn memory.fp8_base off for full fine-tuning."
        )
    q, scale = quantize_weight(linear.weight)
    linear.weight = nn.Parameter(q, requires_grad=False)
    linear.register_buffer("weight_scale", scale.to(linear.weight.device), persistent=False)
    linear.forward = types.MethodType(_fp8_forward, linear)


class Fp8Base(MemoryStrategy):
    """Frozen DiT (and LLM adapter) Linear weights as float8 e4m3, computed in the activation dtype."""

    name = "fp8_base"
    order = 0  # before block swap copies the weights to pinned memory

    @classmethod
    def enabled(cls, profile) -> bool:
        return bool(option(profile, "memory", "fp8_base", False) or option(profile, "memory", "fp8_base_unet", False))

    @classmethod
    def validate(cls, profile) -> list[str]:
        if option(profile, "model", "transformer_dtype") == "float32" or (
            option(profile, "model", "transformer_dtype") is None
            and option(profile, "training", "mixed_precision", "bf16") == "no"
        ):
            return [
                "memory.fp8_base computes in the DiT's dtype, which is float32 here (model.transformer_dtype / "
                "training.mixed_precision), so it would save memory but run at float32 speed; set "
                "training.mixed_precision = \"bf16\" (or model.transformer_dtype = \"bfloat16\") with fp8_base."
            ]
        return []

    def apply(self, dit, *, device) -> None:
        if getattr(dit, "_block_swapper", None) is not None:
            raise MemoryStrategyError(
                "fp8_base must be applied before blocks_to_swap (block swap keeps its own copies of the weights); "
                "apply memory strategies with anima_core.training.memory.apply_memory_strategies, which orders them."
            )
        for name, module in dit.named_modules():
            if is_fp8_candidate(name, module):
                quantize_linear(module)
