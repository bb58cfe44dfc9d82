"""Learning-rate schedules: transformers' and diffusers' scheduler functions (the ones sd-scripts calls),
given sd-scripts' argument names and rules.

Nothing here computes a rate itself; this module only decides which library function gets which of the
profile's values, and refuses values a schedule would ignore (sd-scripts ignores some silently). The
libraries are imported where they are used, so checking a profile does not load them.
"""

from __future__ import annotations

import importlib
import torch

from anima_core.config.optimizer_rules import is_schedule_free, schedule_problems, uses_relative_step
from anima_core.errors import AnimaError

def steps_or_fraction(value: float, total_steps: int) -> int:
    """sd-scripts' int_or_float rule: below 1 a fraction of all steps (rounded down), else a step count."""
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def warmup_steps_for(lr_warmup_steps: float, total_steps: int) -> int:
    return steps_or_fraction(lr_warmup_steps, total_steps)


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

