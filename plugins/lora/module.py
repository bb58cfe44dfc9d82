"""One LoRA adapter around one Linear: y = W·x (+b) + multiplier · (alpha / rank) · up(down(x)).

The adapter patches the Linear's ``forward`` instead of replacing the module, so the model's own
``state_dict`` and module tree stay untouched; the Linear is held in a list so it is not registered as a
child of the adapter (its weight must never appear among the LoRA parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type with no autocast at all (meta)
        return False


class LoRAModule(nn.Module):
    def __init__(
        self,
        name: str,
        target: nn.Linear,
        *,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        if not isinstance(target, nn.Linear):
            raise TypeError(f"LoRA target {name} is a {type(target).__name__}, not a Linear")
        self.name = name
        self.rank = rank
        device = target.weight.device
        self.lora_down = nn.Linear(target.in_features, rank, bias=False, device=device)
        self.lora_up = nn.Linear(rank, target.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(rank) if not alpha else float(alpha)  # alpha 0/None means "no scaling"
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.merged = False
        self._target = [target]
        self._wrapped_forward = None

    @property
    def target(self) -> nn.Linear:
        return self._target[0]

    def refresh_scale(self) -> None:
        """Recompute the scale after ``alpha`` was loaded from a file or a state."""
        self.scale = float(self.alpha) / self.rank

    def apply_to(self) -> None:
        """Route the target's forward through this adapter (adapters applied later wrap earlier ones)."""
        if self._wrapped_forward is not None:
            return
        self._target_had_own_forward = "forward" in self.target.__dict__
        self._wrapped_forward = self.target.forward
        self.target.forward = self.forward

    def remove(self) -> None:
        """Restore the forward that was in place before ``apply_to``; adapters come off in reverse order."""
        if self._wrapped_forward is None:
            return
        if self.target.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"LoRA {self.name}: another adapter was applied on top; remove that one first")
        if self._target_had_own_forward:
            self.target.forward = self._wrapped_forward
        else:
            del self.target.forward
        self._wrapped_forward = None

    def delta_weight(self) -> torch.Tensor:
        """multiplier · scale · up @ down, in float32: the weight change this adapter stands for."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        return (up @ down) * (self.multiplier * self.scale)

    def merge(self) -> None:
        if self.merged:
            return
        weight = self.target.weight
        with torch.no_grad():
            weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract what ``merge`` added (exact in float32; within one rounding step in bf16/fp16)."""
        if not self.merged:
            return
        weight = self.target.weight
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._wrapped_forward(x)
        # At multiplier 0 the branch adds nothing; in training it still runs, as in sd-scripts, so a batch at
        # network_multiplier 0 backpropagates zero gradients instead of a loss with no graph.
        if self.merged or (self.multiplier == 0 and not torch.is_grad_enabled()):
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        if not _autocasting(x.device.type):
            # Under autocast the matmul picks its dtype itself; a cast here would copy every input for nothing.
            x = x.to(self.lora_down.weight.dtype)
        hidden = self.lora_down(x)
        if self.training and self.dropout:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            # One keep/drop decision per sample and rank, broadcast over every token axis, so 5-D
            # activations ([B, T, H, W, D] in the DiT MLP) are handled like 3-D ones.
            keep = torch.rand(hidden.shape[0], self.rank, device=hidden.device) > self.rank_dropout
            keep = keep.view(hidden.shape[0], *([1] * (hidden.dim() - 2)), self.rank)
            hidden = hidden * keep.to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return out + (self.lora_up(hidden) * (self.multiplier * scale)).to(out.dtype)
