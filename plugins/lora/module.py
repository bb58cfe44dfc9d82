"""One LoRA adapter around one Linear: y = W·x (+b) + multiplier · (alpha / rank) · up(down(x)).

The adapter patches the Linear's ``forward`` instead of replacing the module, so the model's own
``state_dict`` and module tree stay untouched; the Linear is held in a list so it is not registered as a
child of the adapter (its weight must never appear among the LoRA parameters).

Fused path (``fused=True``): the frozen weight W and ``lora_down`` are stacked in one buffer S = [W; down]
of shape (out + rank, in), and the Linear's weight becomes a view of S's first ``out`` rows (so the model
keeps its keys, shapes and dtypes, and memory holds W once). One GEMM ``z = x·Sᵀ (+ [b; 0])`` gives the base
output and the LoRA hidden state together; backward computes ``grad_x = [grad_y, grad_h]·S`` in one GEMM and
``grad_down = grad_hᵀ·x``. ``lora_down`` stays the trainable leaf: its rows of S are a copy, refreshed before
every forward (rank × in elements), so whatever changed it (an optimizer step, a loaded state, EMA, max-norm)
is always what runs. The arithmetic is the plain path's: the same dtypes, the same casts under autocast.
Where fusing does not apply (dropouts in training, a patched or quantised layer, dtypes that differ, inside
torch.compile, ...) the module runs the plain path and ``fused_reason`` says why.
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


FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)


class _StackedLinear(torch.autograd.Function):
    """``z = x·Sᵀ (+ bias)`` for S = [W; down], returned as (base output view, LoRA hidden state).

    ``x`` is 2-D and already in S's dtype. ``down`` is the trainable leaf whose copy sits in S's last rows;
    it is an input only so its gradient lands on it. S is frozen and persistent, so it is kept on ``ctx``
    rather than saved (its down rows are rewritten with the same values when a checkpointed block recomputes).
    """

    @staticmethod
    def forward(ctx, x, down, stacked, bias, out_features):
        with torch.autocast(x.device.type, enabled=False):
            z = torch.mm(x, stacked.t()) if bias is None else torch.addmm(bias, x, stacked.t())
        ctx.save_for_backward(x)
        ctx.stacked = stacked
        ctx.down_dtype = down.dtype
        # The hidden state is copied out: lora_up saves it for backward, and a view would keep all of z alive.
        return z[:, :out_features], z[:, out_features:].contiguous()

    @staticmethod
    def backward(ctx, grad_base, grad_hidden):
        (x,) = ctx.saved_tensors
        grad_x = grad_down = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.cat([grad_base, grad_hidden], dim=1) @ ctx.stacked
        if ctx.needs_input_grad[1]:
            grad_down = (grad_hidden.t() @ x).to(ctx.down_dtype)
        return grad_x, grad_down, None, None, None


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
        fused: bool = False,
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
        self.fused = fused  # asked for; whether it runs is ``fused_reason is None``
        self.fused_reason: str | None = "not applied" if fused else "fused is off"
        self._blocker: str | None = None  # a reason known before apply_to (refuse_fusing)
        self._stacked: torch.Tensor | None = None  # [W; down]; a plain attribute: no state dict, no .to()
        self._restacked = False

    @property
    def target(self) -> nn.Linear:
        return self._target[0]

    def refresh_scale(self) -> None:
        """Recompute the scale after ``alpha`` was loaded from a file or a state."""
        self.scale = float(self.alpha) / self.rank

    def refuse_fusing(self, reason: str) -> None:
        """Keep this module on the plain path for ``reason`` (the network knows of block swap, for one)."""
        self._blocker = reason
        if self.fused:
            self.fused_reason = reason

    def apply_to(self) -> None:
        """Route the target's forward through this adapter (adapters applied later wrap earlier ones)."""
        if self._wrapped_forward is not None:
            return
        self._target_had_own_forward = "forward" in self.target.__dict__
        self._wrapped_forward = self.target.forward
        self.target.forward = self.forward
        if self.fused:
            self.fused_reason = self._static_blocker()
            if self.fused_reason is None:
                self._stack()

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
        self._unstack()
        if self.fused:
            self.fused_reason = "not applied"

    # --- the fused GEMM ------------------------------------------------------------------------------

    def _static_blocker(self) -> str | None:
        """Why this layer can never take the fused path (checked once, at apply_to)."""
        target = self.target
        if self._blocker is not None:
            return self._blocker
        if type(target).forward is not nn.Linear.forward:
            return f"{type(target).__name__} has its own forward (a quantised or wrapped Linear)"
        if self._target_had_own_forward:
            return "the layer's forward is already patched (fp8_base, or another adapter applied first)"
        if target.weight.dtype not in FLOAT_WEIGHTS:
            return f"the frozen weight is stored as {target.weight.dtype} (quantised)"
        if target.weight.device.type == "meta":
            return "the weight is on the meta device"
        if target.weight.requires_grad or (target.bias is not None and target.bias.requires_grad):
            return "the base weight is trained"
        return None

    def _stack(self) -> None:
        """Make S = [W; down] and the Linear's weight a view of S's first rows (W's own storage is let go)."""
        weight = self.target.weight
        out_features, in_features = weight.shape
        stacked = torch.empty((out_features + self.rank, in_features), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            stacked[:out_features].copy_(weight)
        weight.data = stacked[:out_features]
        self._stacked = stacked

    def _unstack(self) -> None:
        """Give the Linear a weight of its own again (removal, or a layer whose weight keeps being replaced)."""
        stacked, self._stacked = self._stacked, None
        if stacked is not None and self._aliases(stacked):
            self.target.weight.data = self.target.weight.data.clone()

    def _aliases(self, stacked: torch.Tensor) -> bool:
        weight = self.target.weight
        return (
            weight.device == stacked.device
            and weight.dtype == stacked.dtype
            and weight.data_ptr() == stacked.data_ptr()
            and weight.shape == (stacked.shape[0] - self.rank, stacked.shape[1])
        )

    def _fuse_blocker(self, x: torch.Tensor) -> str | None:
        """None when this forward can take the fused path, else why not."""
        if self._stacked is None:
            return self.fused_reason or "fused is off"
        if torch.compiler.is_compiling():
            return "inside torch.compile (model.compile_blocks), which traces the plain path"
        if self.training and (self.dropout or self.rank_dropout or self.module_dropout):
            return "dropout, rank_dropout or module_dropout draws in training"
        if not self._aliases(self._stacked):
            # Something gave the Linear a new weight (a .to(), a loaded state): stack it again, once.
            if self._restacked:
                self._unstack()
                self.fused_reason = "the layer's weight keeps being replaced (moved or swapped) after fusing"
                return self.fused_reason
            self._restacked = True
            self._stack()
        weight, down = self._stacked, self.lora_down.weight
        if down.device != weight.device:
            return f"lora_down is on {down.device}, the weight on {weight.device}"
        if _autocasting(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if weight.dtype != dtype:
                return f"autocast computes in {dtype}, but the weight is {weight.dtype}"
        elif not (x.dtype == down.dtype == weight.dtype):
            return f"dtypes differ without autocast: input {x.dtype}, lora_down {down.dtype}, weight {weight.dtype}"
        return None

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked, bias, rank = self._stacked, self.target.bias, self.rank
        out_features = stacked.shape[0] - rank
        with torch.no_grad():  # under autocast this is autocast's own cast of lora_down (round to nearest)
            stacked[out_features:].copy_(self.lora_down.weight)
        lead = x.shape[:-1]
        x2d = x.to(stacked.dtype).reshape(-1, x.shape[-1])
        if bias is not None:
            bias = torch.cat([bias.to(stacked.dtype), bias.new_zeros(rank, dtype=stacked.dtype)])
        base, hidden = _StackedLinear.apply(x2d, self.lora_down.weight, stacked, bias, out_features)
        out = base.view(*lead, out_features)
        hidden = hidden.view(*lead, rank)
        return out + (self.lora_up(hidden) * (self.multiplier * self.scale)).to(out.dtype)

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
        if self.fused and not self.merged and (self.multiplier != 0 or torch.is_grad_enabled()):
            self.fused_reason = self._fuse_blocker(x)
            if self.fused_reason is None:
                return self._fused_forward(x)
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
