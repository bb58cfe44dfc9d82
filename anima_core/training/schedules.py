"""Learning-rate schedules as pure functions of the step: factor(step) multiplies the base rate."""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_steps_for(lr_warmup_steps: float, total_steps: int) -> int:
    """The profile gives warmup as steps, or as a fraction of all steps when below 1."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * total_steps)
    return int(lr_warmup_steps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0, min_ratio: float = 0.0) -> float:
    if kind == "adafactor":
        kind = "constant_with_warmup"
    if warmup and step < warmup and kind != "constant":
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "cosine_with_restarts":
        if progress >= 1.0:
            decay = 0.0
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    elif kind == "polynomial":
        decay = (1.0 - progress) ** power
    else:
        raise ValueError(f"unknown lr_scheduler {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, optimizer_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = partial(
        lr_factor,
        kind=optimizer_cfg.lr_scheduler,
        warmup=warmup_steps_for(optimizer_cfg.lr_warmup_steps, total_steps),
        total=total_steps,
        cycles=optimizer_cfg.lr_scheduler_num_cycles,
        power=optimizer_cfg.lr_scheduler_power,
        min_ratio=optimizer_cfg.lr_scheduler_min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
