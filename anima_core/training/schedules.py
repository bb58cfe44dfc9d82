"""Learning-rate schedules: transformers' and diffusers' scheduler functions (the ones sd-scripts calls),
given sd-scripts' argument names and rules.

Nothing here computes a rate itself; this module only decides which library function gets which of the
profile's values, and refuses values a schedule would ignore (sd-scripts ignores some silently). The
libraries are imported where they are used, so checking a profile does not load them.
"""

from __future__ import annotations

import importlib
import torch

from anima_core.errors import AnimaError

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


def steps_or_fraction(value: float, total_steps: int) -> int:
    """sd-scripts' int_or_float rule: below 1 a fraction of all steps (rounded down), else a step count."""
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def warmup_steps_for(lr_warmup_steps: float, total_steps: int) -> int:
    return steps_or_fraction(lr_warmup_steps, total_steps)


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


def _import_scheduler_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        return getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise AnimaError(
            f"optimizer.lr_scheduler_type = {path!r}: cannot import it ({exc}); give a torch.optim.lr_scheduler class name or `module.Class`."
        ) from None


def unwrapped(optimizer):
    """The optimizer accelerate wraps (schedulers and optimizer-specific reads need the real one)."""
    return getattr(optimizer, "optimizer", optimizer)


def build_scheduler(optimizer, optimizer_cfg, total_steps: int):
    """The schedule sd-scripts' get_scheduler_fix builds for the same arguments (one process)."""
    from diffusers.optimization import get_piecewise_constant_schedule
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, AdafactorSchedule, SchedulerType

    o = optimizer_cfg
    problems = schedule_problems(o)
    if problems:
        raise AnimaError("; ".join(problems))
    optimizer = unwrapped(optimizer)
    kwargs = dict(o.lr_scheduler_args)
    if o.lr_scheduler_type:
        return _import_scheduler_class(o.lr_scheduler_type)(optimizer, **kwargs)
    if uses_relative_step(o):
        return AdafactorSchedule(optimizer, o.learning_rate)
    if is_schedule_free(o):  # sd-scripts uses a do-nothing scheduler; a constant one is the same and can be saved
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType.CONSTANT](optimizer)
    if o.lr_scheduler == "piecewise_constant":
        return get_piecewise_constant_schedule(optimizer, **kwargs)
    kind = SchedulerType(o.lr_scheduler)
    schedule = TYPE_TO_SCHEDULER_FUNCTION[kind]
    if kind == SchedulerType.CONSTANT:
        return schedule(optimizer, **kwargs)
    warmup = warmup_steps_for(o.lr_warmup_steps, total_steps)
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return schedule(optimizer, num_warmup_steps=warmup, **kwargs)
    if kind == SchedulerType.INVERSE_SQRT:
        return schedule(optimizer, num_warmup_steps=warmup, timescale=o.lr_scheduler_timescale, **kwargs)
    common = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        return schedule(optimizer, **common, num_cycles=o.lr_scheduler_num_cycles, **kwargs)
    if kind == SchedulerType.POLYNOMIAL:
        return schedule(optimizer, **common, power=o.lr_scheduler_power, **kwargs)
    if kind == SchedulerType.COSINE_WITH_MIN_LR:
        # sd-scripts passes half its cycle count: one "cycle" there is one half-wave of the cosine.
        return schedule(optimizer, **common, num_cycles=o.lr_scheduler_num_cycles / 2,
                        min_lr_rate=o.lr_scheduler_min_lr_ratio, **kwargs)
    if kind == SchedulerType.WARMUP_STABLE_DECAY:
        decay = steps_or_fraction(o.lr_decay_steps, total_steps)
        return schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=total_steps - warmup - decay,
                        num_decay_steps=decay, num_cycles=o.lr_scheduler_num_cycles / 2,
                        min_lr_ratio=o.lr_scheduler_min_lr_ratio or 0.0, **kwargs)
    return schedule(optimizer, **common, **kwargs)  # linear, cosine


def rates_used(optimizer) -> list[float]:
    """The rate each parameter group's last step used; call it after optimizer.step(), before scheduler.step().

    A relative-step Adafactor ignores the group's rate and derives its own from the group's first parameter's
    step count (what transformers' AdafactorSchedule reports). The fused backward pass reports the groups it
    was given, not its one group per parameter."""
    from transformers.optimization import Adafactor

    optimizer = unwrapped(optimizer)
    rates = []
    for group in getattr(optimizer, "reported_groups", optimizer.param_groups):
        if group.get("relative_step"):
            state = optimizer.state.get(group["params"][0])
            rates.append(float(Adafactor._get_lr(group, state)) if state else 0.0)
        else:
            rates.append(float(group["lr"]))
    return rates


def rebase_rates(scheduler, optimizer, base_lrs: list[float]) -> None:
    """Give a resumed schedule new base rates (--allow-lr-change, the NaN guard's lower rate) at its current step.

    transformers' schedules are factors of the base rate, recomputed exactly; other scheduler classes keep
    their current rate scaled by the change of its base."""
    from transformers.optimization import AdafactorSchedule

    optimizer = unwrapped(optimizer)
    lambdas = getattr(scheduler, "lr_lambdas", None) if not isinstance(scheduler, AdafactorSchedule) else None
    for index, (group, old, new) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs, base_lrs)):
        if group.get("lr") is None:
            continue
        if lambdas is not None:
            group["lr"] = new * lambdas[index](scheduler.last_epoch)
        elif old:
            group["lr"] = group["lr"] * new / old
    scheduler.base_lrs = list(base_lrs)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

