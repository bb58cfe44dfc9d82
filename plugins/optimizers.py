"""Built-in optimizers under sd-scripts' names, each from the package that defines it.

Names compare without case (as in sd-scripts). Packages beyond torch and transformers are optional extras;
a missing one is named with the command that installs it.
"""

from __future__ import annotations

import importlib

import torch

from anima_core.errors import AnimaError
from anima_core.hookspecs import hookimpl


def _package(name: str, module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AnimaError(
            f"optimizer.optimizer_type = {name!r} needs the {module} package: `pip install 'anima-train[{extra}]'`, "
            "or choose another optimizer_type (AdamW needs nothing more)."
        ) from None


def create_adamw(param_groups, lr, optimizer_args):
    args = dict(optimizer_args)
    if torch.cuda.is_available() and all(p.is_cuda for g in param_groups for p in g["params"]):
        args.setdefault("fused", True)
    return torch.optim.AdamW(param_groups, lr=lr, **args)


def create_sgd_nesterov(param_groups, lr, optimizer_args):
    args = {"momentum": 0.9, **optimizer_args}  # Nesterov needs momentum; sd-scripts defaults it to 0.9
    return torch.optim.SGD(param_groups, lr=lr, nesterov=True, **args)


def bitsandbytes_optimizer(name: str, class_name: str, *, nesterov: bool = False):
    """bitsandbytes' 8-bit and paged optimizers keep their state on the GPU: refused on a CPU-only machine."""

    def create(param_groups, lr, optimizer_args):
        if not torch.cuda.is_available():
            raise AnimaError(
                f"optimizer.optimizer_type = {name!r} needs a CUDA GPU (bitsandbytes' 8-bit and paged optimizers run on the GPU). "
                "On this machine set optimizer.optimizer_type = 'AdamW'."
            )
        bnb = _package(name, "bitsandbytes", "cuda")
        args = dict(optimizer_args)
        if nesterov:
            args = {"momentum": 0.9, **args, "nesterov": True}
        return getattr(bnb.optim, class_name)(param_groups, lr=lr, **args)

    return create


def package_optimizer(name: str, module: str, class_name: str, extra: str):
    def create(param_groups, lr, optimizer_args):
        return getattr(_package(name, module, extra), class_name)(param_groups, lr=lr, **optimizer_args)

    return create


def create_adafactor(param_groups, lr, optimizer_args):
    """sd-scripts' Adafactor rules: relative_step unless turned off (warmup_init turns it back on); with it,
    Adafactor derives its own rate and ignores the learning rate (the 'adafactor' schedule reports it)."""
    from transformers.optimization import Adafactor

    args = {"relative_step": True, **optimizer_args}
    if args.get("warmup_init"):
        args["relative_step"] = True
    if args["relative_step"]:
        lr = None
        param_groups = [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]
    return Adafactor(param_groups, lr=lr, **args)


BITSANDBYTES = {
    "AdamW8bit": "AdamW8bit", "Lion8bit": "Lion8bit", "PagedAdamW": "PagedAdamW", "PagedAdamW8bit": "PagedAdamW8bit",
    "PagedAdamW32bit": "PagedAdamW32bit", "PagedLion8bit": "PagedLion8bit",
}
PACKAGES = {  # name: (module, class, extra)
    "Lion": ("lion_pytorch", "Lion", "lion"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigy"),
    "CAME": ("came_pytorch", "CAME", "came"),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "RAdamScheduleFree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "SGDScheduleFree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
    # sd-scripts' D-Adaptation names; "DAdaptation" is its name for the AdamPreprint variant.
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    **{name: ("dadaptation", name, "dadaptation") for name in ("DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptLion", "DAdaptSGD")},
}


@hookimpl
def register_optimizers(register):
    register("AdamW", create_adamw, aliases=["torch.optim.AdamW"])
    register("SGDNesterov", create_sgd_nesterov)
    register("Adafactor", create_adafactor, aliases=["transformers.optimization.Adafactor"])
    for name, class_name in BITSANDBYTES.items():
        register(name, bitsandbytes_optimizer(name, class_name), aliases=[f"bitsandbytes.optim.{class_name}"])
    register("SGDNesterov8bit", bitsandbytes_optimizer("SGDNesterov8bit", "SGD8bit", nesterov=True))
    for name, (module, class_name, extra) in PACKAGES.items():
        aliases = [f"{module}.{class_name}"] if name == class_name else []
        register(name, package_optimizer(name, module, class_name, extra), aliases=aliases)
