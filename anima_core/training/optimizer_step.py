"""The optimizer side of a step: which optimizer a target gets (the fused backward pass updates each weight
inside backward), the step itself (gradients summed over processes, clipped, skipped when non-finite), and
what follows each update (max-norm regularisation, then the EMA of the result, as sd-scripts orders them).
"""

from __future__ import annotations

import math

from anima_core.training.optim import apply_max_norm, create_fused_backward_optimizer, create_optimizer
from anima_core.training.sharding import gradient_norm, whole


def build_optimizer(profile, plugins, param_groups: list[dict], warn):
    o = profile.optimizer
    if not o.fused_backward_pass:
        return create_optimizer(plugins, o, param_groups)
    if o.max_grad_norm:
        warn("fused_backward_pass with max_grad_norm: the updates wait for the whole gradient to clip it "
             "as sd-scripts does, which saves no memory; set max_grad_norm = 0 to update during backward")
    return create_fused_backward_optimizer(plugins, o, param_groups)


def prepared(accelerator, optimizer, optimizer_cfg):
    """The optimizer under accelerate (its fp16 gradient scaler); a fused backward pass steps inside backward,
    where accelerate's wrapper cannot reach, so it stays as it is."""
    if optimizer_cfg.fused_backward_pass:
        return optimizer
    return accelerator.prepare_optimizer(optimizer, device_placement=False)


def updates_in_backward(optimizer_cfg) -> bool:
    """True when the weights are updated during backward, so no step ever sees the whole gradient."""
    return bool(optimizer_cfg.fused_backward_pass and not optimizer_cfg.max_grad_norm)


def optimizer_step(optimizer, params, *, optimizer_cfg, sum_gradients, accelerator, precision: str) -> float:
    """One update from the accumulated gradients; returns the gradient norm (before clipping; 0.0 when the
    update happened in backward). ``sum_gradients(params)``: the target's sum over the processes. A non-finite
    norm skips the update, except under fp16, whose gradient scaler skips it itself and lowers the scale."""
    max_norm = optimizer_cfg.max_grad_norm
    if updates_in_backward(optimizer_cfg):
        optimizer.step()  # the updates happened in backward; this keeps the scheduler's count right
        return 0.0
    sum_gradients(params)
    if max_norm > 0:
        norm = whole(accelerator.clip_grad_norm_(params, max_norm))
    else:
        norm = gradient_norm([p.grad for p in params if p.grad is not None])
    norm = float(norm)
    if math.isfinite(norm) or precision == "fp16":
        optimizer.step()
    return norm


def after_update(optimizer_cfg, network, ema, step: int) -> dict | None:
    """Max-norm regularisation, then the EMA of the result; returns the weight norms when they were scaled."""
    norms = apply_max_norm(network, optimizer_cfg.scale_weight_norms) if optimizer_cfg.scale_weight_norms else None
    if ema is not None:
        ema.update(step)
    return norms
