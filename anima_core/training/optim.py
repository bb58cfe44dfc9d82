"""Building the optimizer from the profile (sd-scripts' names and rules), the fused backward pass,
schedule-free train/eval modes, and max-norm regularisation of LoRA weights."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from anima_core.errors import AnimaError
from anima_core.plugins import Plugins
from anima_core.config.optimizer_rules import optimizer_factory
from anima_core.training.schedules import unwrapped


def create_optimizer(plugins: Plugins, optimizer_cfg, param_groups: list[dict]) -> torch.optim.Optimizer:
    factory = optimizer_factory(plugins, optimizer_cfg.optimizer_type)
    optimizer = factory(param_groups, optimizer_cfg.learning_rate, dict(optimizer_cfg.optimizer_args))
    train_mode(optimizer)
    return optimizer


# ---- schedule-free optimizers: train weights while stepping, eval weights for everything else ---------------


def train_mode(optimizer) -> None:
    """Schedule-free optimizers step only in train mode (sd-scripts switches it on at creation and after each use
    of the eval weights). Other optimizers have no modes."""
    switch = getattr(unwrapped(optimizer), "train", None)
    if callable(switch):
        switch()


@contextmanager
def eval_weights(optimizer):
    """The weights to preview, validate and save: a schedule-free optimizer's averaged (eval) weights.

    sd-scripts switches to eval and back after every step (around its preview and save checks); the round
    trip changes the train weights by rounding, so doing it on the same steps keeps runs identical to its."""
    inner = unwrapped(optimizer)
    switch = getattr(inner, "eval", None)
    if not callable(switch):
        yield
        return
    switch()
    try:
        yield
    finally:
        inner.train()


# ---- the fused backward pass (Adafactor) -----------------------------------------------------------------


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from the parameter's gradient hook during backward.

    Without clipping, gradients are applied and freed as soon as they exist, so at most one parameter's
    gradient is alive. With ``max_grad_norm`` the update must wait for the whole gradient: sd-scripts' LoRA
    training clips the norm of all gradients together, which no parameter-by-parameter pass can know early.
    Param-group dicts are shared with the inner optimizers, so schedulers that edit ``lr`` reach them.
    """

    def __init__(self, make_inner, param_groups: list[dict], max_grad_norm: float):
        self.inner = []
        self.max_grad_norm = max_grad_norm
        groups = []
        self.reported_groups = []  # the first parameter's group of each given group: what step events report
        for group in param_groups:
            for index, param in enumerate(group["params"]):
                inner = make_inner([{**group, "params": [param]}])
                self.inner.append(inner)
                groups.extend(inner.param_groups)
                if index == 0:
                    self.reported_groups.append(inner.param_groups[0])
                if not max_grad_norm:
                    param.register_post_accumulate_grad_hook(self._make_hook(inner))
        self.param_groups = groups
        self.defaults = {}

    @property
    def state(self):
        """Every inner optimizer's state by parameter (schedulers such as AdafactorSchedule read it)."""
        return {param: state for inner in self.inner for param, state in inner.state.items()}

    @staticmethod
    def _make_hook(inner):
        def hook(param):
            inner.step()
            param.grad = None

        return hook

    def step(self, closure=None):
        """Without clipping the updates already happened in backward; with it, the trainer has clipped the whole
        gradient as for any optimizer, and the updates are applied now."""
        if self.max_grad_norm:
            for inner in self.inner:
                inner.step()

    def zero_grad(self, set_to_none: bool = True):
        for inner in self.inner:
            inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": [inner.state_dict() for inner in self.inner]}

    def load_state_dict(self, state_dict):
        for inner, sd in zip(self.inner, state_dict["inner"], strict=True):
            inner.load_state_dict(sd)


def create_fused_backward_optimizer(plugins: Plugins, optimizer_cfg, param_groups: list[dict]):
    return FusedBackwardOptimizer(
        lambda groups: create_optimizer(plugins, optimizer_cfg, groups), param_groups, optimizer_cfg.max_grad_norm
    )


# ---- max-norm regularisation (sd-scripts' scale_weight_norms) ----------------------------------------------


@torch.no_grad()
def apply_max_norm(network, max_norm: float) -> dict:
    """Scale each LoRA pair whose ΔW = (alpha / rank) · up @ down has a Frobenius norm above ``max_norm`` back
    to it, up and down by the same √ratio, as sd-scripts' networks do after every optimizer step.

    Returns the keys scaled and the mean and largest ΔW norm after scaling (sd-scripts' step logs)."""
    own = getattr(network, "apply_max_norm_regularization", None)
    if callable(own):
        return own(max_norm)
    pairs = [m for m in network.modules() if hasattr(m, "lora_up") and hasattr(m, "lora_down") and hasattr(m, "alpha")]
    if not pairs:
        raise AnimaError("optimizer.scale_weight_norms: this network has no LoRA up/down pairs to scale; remove scale_weight_norms")
    scaled, norms = 0, []
    for module in pairs:
        up, down = module.lora_up.weight, module.lora_down.weight
        delta = (up @ down) * (module.alpha.to(up.device) / down.shape[0])
        norm = delta.norm().clamp(min=max_norm / 2)  # the floor only keeps the ratio finite for a zero ΔW
        ratio = norm.clamp(max=max_norm).cpu() / norm.cpu()
        if ratio != 1:
            scaled += 1
            up.mul_(ratio**0.5)
            down.mul_(ratio**0.5)
        norms.append(float(delta.norm().cpu() * ratio))
    return {"keys_scaled": scaled, "mean_norm": sum(norms) / len(norms), "max_norm": max(norms)}
