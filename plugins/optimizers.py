"""Built-in optimizers: AdamW, AdamW8bit (bitsandbytes) and Adafactor (transformers)."""

from __future__ import annotations

import torch

from anima_core.errors import AnimaError
from anima_core.hookspecs import hookimpl


def create_adamw(param_groups, lr, optimizer_args):
    args = dict(optimizer_args)
    if torch.cuda.is_available() and all(p.is_cuda for g in param_groups for p in g["params"]):
        args.setdefault("fused", True)
    return torch.optim.AdamW(param_groups, lr=lr, **args)


def create_adamw8bit(param_groups, lr, optimizer_args):
    if not torch.cuda.is_available():
        raise AnimaError(
            "optimizer.optimizer_type = 'AdamW8bit' needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on the GPU). "
            "On this machine set optimizer.optimizer_type = 'AdamW'."
        )
    try:
        import bitsandbytes
    except ImportError:
        raise AnimaError(
            "optimizer.optimizer_type = 'AdamW8bit' needs bitsandbytes: `pip install 'anima-train[cuda]'`, "
            "or set optimizer.optimizer_type = 'AdamW'."
        ) from None
    return bitsandbytes.optim.AdamW8bit(param_groups, lr=lr, **optimizer_args)


def create_adafactor(param_groups, lr, optimizer_args):
    from transformers.optimization import Adafactor

    args = dict(optimizer_args)
    if args.get("relative_step"):
        # Adafactor computes its own step size; the base rate only seeds the schedule sd-scripts prints.
        lr = None
    return Adafactor(param_groups, lr=lr, **args)


@hookimpl
def register_optimizers(register):
    register("AdamW", create_adamw, aliases=["adamw", "torch.optim.AdamW"])
    register("AdamW8bit", create_adamw8bit, aliases=["adamw8bit", "bitsandbytes.optim.AdamW8bit"])
    register("Adafactor", create_adafactor, aliases=["adafactor", "transformers.optimization.Adafactor"])
