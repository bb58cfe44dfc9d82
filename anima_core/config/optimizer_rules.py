"""The optimizer and schedule rules a profile is checked against: which optimizer a name means (sd-scripts'
names, torch.optim's, or a class path), which settings an optimizer or schedule would ignore, and which cannot
be combined. Config's checks and training's builders share them, so a profile `validate` passes is one the
trainer builds."""

from __future__ import annotations

import difflib
import importlib

from anima_core.errors import AnimaError
from anima_core.plugins import Plugins

# Which optional knobs each schedule reads; every other schedule must leave them at their defaults.
USES_WARMUP = {"constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
               "cosine_with_min_lr", "warmup_stable_decay"}
USES_CYCLES = {"cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"}
USES_MIN_LR_RATIO = {"cosine_with_min_lr", "warmup_stable_decay"}
KNOBS = (  # (key, values that change nothing, schedules that read it); a 0.0 floor is the unset one
    ("lr_decay_steps", (0,), {"warmup_stable_decay"}),
    ("lr_scheduler_num_cycles", (1,), USES_CYCLES),
    ("lr_scheduler_power", (1.0,), {"polynomial"}),
    ("lr_scheduler_min_lr_ratio", (None, 0.0), USES_MIN_LR_RATIO),
    ("lr_scheduler_timescale", (None,), {"inverse_sqrt"}),
)


def uses_relative_step(optimizer_cfg) -> bool:
    """Adafactor computes its own rate unless told otherwise (sd-scripts' default, and warmup_init implies it)."""
    if optimizer_cfg.optimizer_type.lower() not in ("adafactor", "transformers.optimization.adafactor"):
        return False
    args = optimizer_cfg.optimizer_args
    return bool(args.get("relative_step", True) or args.get("warmup_init", False))


def is_schedule_free(optimizer_cfg) -> bool:
    """sd-scripts' rule: an optimizer whose name ends in ScheduleFree brings its own schedule."""
    return optimizer_cfg.optimizer_type.lower().endswith("schedulefree")


def schedule_problems(optimizer_cfg) -> list[str]:
    """Schedule settings that cannot take effect, each naming the key and what to do."""
    o = optimizer_cfg
    kind, problems = o.lr_scheduler, []
    warmup_given = bool(o.lr_warmup_steps)
    if o.lr_scheduler_type:
        if kind != "constant":
            problems.append(f"optimizer.lr_scheduler_type = {o.lr_scheduler_type!r} replaces lr_scheduler; leave lr_scheduler at 'constant'")
        if warmup_given:
            problems.append("optimizer.lr_warmup_steps: a scheduler class given by lr_scheduler_type takes no warmup (sd-scripts refuses it); set it to 0")
        kind = None
    elif is_schedule_free(o):
        if kind != "constant" or warmup_given:
            problems.append(
                f"optimizer.lr_scheduler: {o.optimizer_type} brings its own schedule, so lr_scheduler must be 'constant' with "
                "lr_warmup_steps = 0 (give its warmup as optimizer_args warmup_steps)"
            )
        kind = None
    elif uses_relative_step(o):
        if kind not in ("constant", "adafactor") or warmup_given:
            problems.append(
                "optimizer.lr_scheduler: Adafactor with relative_step (its default) computes its own rate, and sd-scripts then "
                "uses the 'adafactor' schedule without warmup; set lr_scheduler = 'adafactor' and lr_warmup_steps = 0, or "
                "optimizer_args relative_step = false to use a schedule"
            )
        kind = None
    elif kind == "adafactor":
        problems.append(
            "optimizer.lr_scheduler: 'adafactor' reports Adafactor's own relative-step rate; it needs optimizer_type = 'Adafactor' "
            "without relative_step = false"
        )
        kind = None
    elif warmup_given and kind not in USES_WARMUP:
        problems.append(f"optimizer.lr_warmup_steps: {kind!r} has no warmup (sd-scripts refuses it); use 'constant_with_warmup' or set it to 0")
    if kind == "cosine_with_min_lr" and o.lr_scheduler_min_lr_ratio is None:
        problems.append("optimizer.lr_scheduler_min_lr_ratio: 'cosine_with_min_lr' needs it (the floor as a fraction of the rate)")
    if kind == "piecewise_constant" and "step_rules" not in o.lr_scheduler_args:
        problems.append("optimizer.lr_scheduler_args: 'piecewise_constant' needs step_rules, e.g. \"1:10,0.1:20,0.01\"")
    schedule = kind or ("lr_scheduler_type" if o.lr_scheduler_type else f"{o.optimizer_type}'s own schedule")
    for key, inert, readers in KNOBS:
        if getattr(o, key) not in inert and kind not in readers:
            problems.append(f"optimizer.{key}: only {', '.join(sorted(readers))} read it, not {schedule}; remove it")
    return problems


def _registered(plugins: Plugins, name: str):
    """The registered factory for ``name``; sd-scripts compares optimizer names without case."""
    registry = plugins.registry("register_optimizers")
    for known, canonical in [*((n, n) for n in registry.entries), *registry.aliases.items()]:
        if known.lower() == name.lower():
            return registry.get(canonical)
    return None


def _import_class(plugins: Plugins, path: str):
    """A `module.Class` path, or (as sd-scripts does) a bare name from torch.optim."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name or "torch.optim")
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        names = plugins.registry("register_optimizers").names()
        close = difflib.get_close_matches(path, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close and not module_name else ""
        raise AnimaError(
            f"optimizer.optimizer_type = {path!r}: neither a registered optimizer nor importable ({exc}); {hint}Give one "
            f"of {', '.join(names)}, a torch.optim class, or an importable `module.Class` (install its package first)."
        ) from None


def optimizer_factory(plugins: Plugins, name: str):
    """``factory(param_groups, lr, args) -> Optimizer`` for a registered name, a torch.optim name or a class path."""
    factory = _registered(plugins, name)
    if factory is not None:
        return factory
    cls = _import_class(plugins, name)
    return lambda groups, lr, args: cls(groups, lr=lr, **args)


def optimizer_problems(profile, plugins: Plugins) -> list[str]:
    """Optimizer, schedule and EMA settings that cannot work together; each names its key and what to do."""
    o, problems = profile.optimizer, []
    try:
        optimizer_factory(plugins, o.optimizer_type)
    except AnimaError as exc:
        problems.append(str(exc))
    if o.fused_backward_pass:
        if o.optimizer_type.lower() != "adafactor":
            problems.append("optimizer.fused_backward_pass: works only with optimizer_type = 'Adafactor' (as in sd-scripts)")
        if profile.training.gradient_accumulation_steps > 1:
            problems.append("optimizer.fused_backward_pass: cannot be combined with gradient_accumulation_steps > 1")
    if uses_relative_step(o):
        group_rates = [k for k in ("unet_lr", "text_encoder_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "llm_adapter_lr")
                       if getattr(o, k) is not None]
        if group_rates:
            problems.append(
                f"optimizer.{group_rates[0]}: Adafactor with relative_step computes one rate for every parameter, so per-group "
                "rates cannot apply (sd-scripts drops them); remove them, or set optimizer_args relative_step = false"
            )
    if o.ema_decay is not None and is_schedule_free(o):
        problems.append(
            f"optimizer.ema_decay: {o.optimizer_type} already averages the weights (its eval weights are what is saved); remove ema_decay"
        )
    if not o.ema_decay:
        for key, default in (("ema_every_n_steps", 1), ("ema_device", "device"), ("ema_save", "lora"),
                             ("ema_for_previews", False), ("ema_for_validation", False)):
            if getattr(o, key) != default:
                problems.append(f"optimizer.{key}: has no effect without ema_decay; set ema_decay or remove it")
    return problems + schedule_problems(o)


