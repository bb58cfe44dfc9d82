"""Building the optimizer from the profile, and the fused backward pass."""

from __future__ import annotations

import importlib

import torch

from anima_core.errors import AnimaError
from anima_core.plugins import Plugins


def _import_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise AnimaError(
            f"optimizer.optimizer_type = {path!r}: cannot import it ({exc}). Give an importable `module.Class`, or AdamW / AdamW8bit / Adafactor."
        ) from None


def create_optimizer(plugins: Plugins, optimizer_cfg, param_groups: list[dict]) -> torch.optim.Optimizer:
    name, lr, args = optimizer_cfg.optimizer_type, optimizer_cfg.learning_rate, dict(optimizer_cfg.optimizer_args)
    registry = plugins.registry("register_optimizers")
    if name in registry.entries or name in registry.aliases or "." not in name:
        create = registry.get(name)
        return create(param_groups, lr, args)
    return _import_class(name)(param_groups, lr=lr, **args)


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from the parameter's gradient hook during backward.

    Gradients are applied and freed as soon as they exist, so at most one parameter's gradient is alive.
    Param-group dicts are shared with the inner optimizers, so schedulers that edit ``lr`` reach them.
    """

    def __init__(self, make_inner, param_groups: list[dict], max_grad_norm: float):
        self.inner = []
        groups = []
        for group in param_groups:
            for param in group["params"]:
                inner = make_inner([{**group, "params": [param]}])
                self.inner.append(inner)
                groups.extend(inner.param_groups)
                param.register_post_accumulate_grad_hook(self._make_hook(inner, max_grad_norm))
        self.param_groups = groups
        self.defaults = {}
        self.state = {}

    @staticmethod
    def _make_hook(inner, max_grad_norm):
        def hook(param):
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
            inner.step()
            param.grad = None

        return hook

    def step(self, closure=None):
        """Updates already happened in backward; nothing is left to do here."""

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
