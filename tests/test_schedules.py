"""Every schedule gives, step for step, the rates of the library function sd-scripts calls for the same
arguments, with sd-scripts' warmup rule (the first step uses factor 0) and its refusals."""

import pytest
import torch
from diffusers.optimization import get_piecewise_constant_schedule
from transformers import optimization as hf
from training_helpers import make_run, read_events

from anima_core.config.schema import OptimizerTable
from anima_core.errors import AnimaError
from anima_core.plugins import build_plugins
from anima_core.training.optim import create_optimizer
from anima_core.config.optimizer_rules import schedule_problems
from anima_core.training.schedules import build_scheduler, rates_used, rebase_rates

LR, TOTAL = 0.5, 40


def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=LR)


def ours(steps=TOTAL, **keys):
    """Our rates for ``steps`` steps of a run planned for TOTAL steps."""
    optimizer = sgd()
    scheduler = build_scheduler(optimizer, OptimizerTable(optimizer_type="SGD", learning_rate=LR, **keys), TOTAL)
    return per_step(optimizer, scheduler, steps)


def per_step(optimizer, scheduler, total=TOTAL):
    """The rate each of ``total`` optimizer steps uses, read as the trainer reads it."""
    rates = []
    for _ in range(total):
        optimizer.step()
        rates.append(rates_used(optimizer)[0])
        scheduler.step()
    return rates


def library(make):
    optimizer = sgd()
    return per_step(optimizer, make(optimizer))


CASES = {
    "constant": ({}, lambda o: hf.get_constant_schedule(o)),
    "constant_with_warmup": ({"lr_warmup_steps": 7}, lambda o: hf.get_constant_schedule_with_warmup(o, 7)),
    "linear": ({"lr_warmup_steps": 5}, lambda o: hf.get_linear_schedule_with_warmup(o, 5, TOTAL)),
    "cosine": ({"lr_warmup_steps": 0.1}, lambda o: hf.get_cosine_schedule_with_warmup(o, 4, TOTAL)),
    "cosine_with_restarts": ({"lr_warmup_steps": 3, "lr_scheduler_num_cycles": 3},
                             lambda o: hf.get_cosine_with_hard_restarts_schedule_with_warmup(o, 3, TOTAL, num_cycles=3)),
    "polynomial": ({"lr_warmup_steps": 2, "lr_scheduler_power": 2.0},
                   lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, 2, TOTAL, power=2.0)),
    "inverse_sqrt": ({"lr_warmup_steps": 4, "lr_scheduler_timescale": 9},
                     lambda o: hf.get_inverse_sqrt_schedule(o, 4, timescale=9)),
    # sd-scripts passes half its num_cycles to the two schedules with a cosine decay.
    "cosine_with_min_lr": ({"lr_warmup_steps": 3, "lr_scheduler_num_cycles": 3, "lr_scheduler_min_lr_ratio": 0.1},
                           lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, 3, TOTAL, num_cycles=1.5, min_lr_rate=0.1)),
    "warmup_stable_decay": ({"lr_warmup_steps": 0.125, "lr_decay_steps": 10, "lr_scheduler_min_lr_ratio": 0.2},
                            lambda o: hf.get_wsd_schedule(o, 5, num_stable_steps=25, num_decay_steps=10, num_cycles=0.5, min_lr_ratio=0.2)),
    "piecewise_constant": ({"lr_scheduler_args": {"step_rules": "1:10,0.5:20,0.1"}},
                           lambda o: get_piecewise_constant_schedule(o, step_rules="1:10,0.5:20,0.1")),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_schedule_gives_the_library_functions_rates(kind):
    keys, make = CASES[kind]
    assert schedule_problems(OptimizerTable(lr_scheduler=kind, **keys)) == []
    assert ours(lr_scheduler=kind, **keys) == library(make)


def test_warmup_follows_sd_scripts_first_step_at_zero_and_fractions_of_all_steps():
    rates = ours(lr_scheduler="constant_with_warmup", lr_warmup_steps=4)
    assert rates[:6] == [0.0, LR / 4, LR / 2, 3 * LR / 4, LR, LR]
    # Below 1 the value is a fraction of all steps, rounded down: 0.1 of 40 is 4 steps of warmup.
    assert ours(lr_scheduler="linear", lr_warmup_steps=0.1)[:5] == pytest.approx([0.0, LR / 4, LR / 2, 3 * LR / 4, LR])
    # The polynomial schedule ends at transformers' lr_end (1e-7), not at zero.
    assert ours(lr_scheduler="polynomial", steps=TOTAL + 2)[-2:] == pytest.approx([1e-7, 1e-7])


def test_a_scheduler_class_by_path_with_its_arguments():
    keys = {"lr_scheduler_type": "torch.optim.lr_scheduler.CosineAnnealingLR", "lr_scheduler_args": {"T_max": 10}}
    bare = {"lr_scheduler_type": "StepLR", "lr_scheduler_args": {"step_size": 3, "gamma": 0.5}}
    assert ours(**keys) == library(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10))
    assert ours(**bare) == library(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))
    with pytest.raises(AnimaError, match="lr_scheduler_type = 'torch.optim.Nope'"):
        ours(lr_scheduler_type="torch.optim.Nope")


@pytest.mark.parametrize(("keys", "message"), [
    ({"lr_warmup_steps": 10}, "'constant' has no warmup"),
    ({"lr_scheduler": "cosine", "lr_scheduler_min_lr_ratio": 0.1}, "lr_scheduler_min_lr_ratio: only cosine_with_min_lr"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "'cosine_with_min_lr' needs it"),
    ({"lr_scheduler": "linear", "lr_scheduler_num_cycles": 2}, "lr_scheduler_num_cycles: only"),
    ({"lr_scheduler": "cosine", "lr_scheduler_power": 2.0}, "lr_scheduler_power: only polynomial"),
    ({"lr_scheduler": "cosine", "lr_decay_steps": 5}, "lr_decay_steps: only warmup_stable_decay"),
    ({"lr_scheduler": "linear", "lr_scheduler_timescale": 5}, "lr_scheduler_timescale: only inverse_sqrt"),
    ({"lr_scheduler": "piecewise_constant"}, "needs step_rules"),
    ({"lr_scheduler_type": "StepLR", "lr_warmup_steps": 3}, "takes no warmup"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler": "cosine"}, "replaces lr_scheduler"),
    ({"lr_scheduler": "adafactor"}, "needs optimizer_type = 'Adafactor'"),
    ({"optimizer_type": "Adafactor", "lr_scheduler": "cosine"}, "Adafactor with relative_step"),
    ({"optimizer_type": "Adafactor", "lr_scheduler": "adafactor", "lr_warmup_steps": 5}, "Adafactor with relative_step"),
    ({"optimizer_type": "AdamWScheduleFree", "lr_scheduler": "linear"}, "brings its own schedule"),
])
def test_settings_a_schedule_would_ignore_are_refused(keys, message):
    problems = schedule_problems(OptimizerTable(**keys))
    assert any(message in p for p in problems), problems


def test_a_zero_floor_is_the_unset_floor():
    assert schedule_problems(OptimizerTable(lr_scheduler="cosine", lr_scheduler_min_lr_ratio=0.0)) == []


def test_adafactor_default_is_relative_step_with_its_own_schedule():
    """No optimizer_args: sd-scripts' relative_step default; the rates are Adafactor's own, as AdafactorSchedule reports."""
    cfg = OptimizerTable(optimizer_type="adafactor", lr_scheduler="adafactor", learning_rate=1e-3)
    param = torch.nn.Parameter(torch.full((4, 4), 0.5))
    optimizer = create_optimizer(build_plugins(entry_points=False), cfg, [{"params": [param], "lr": 1e-3}])
    scheduler = build_scheduler(optimizer, cfg, TOTAL)
    assert isinstance(scheduler, hf.AdafactorSchedule) and scheduler.get_last_lr() == [1e-3]
    for step in range(1, 4):
        param.grad = torch.full_like(param, 0.1 * step)
        rms = float(param.detach().pow(2).mean().sqrt())  # of the weights the step starts from
        optimizer.step()
        used = rates_used(optimizer)
        scheduler.step()
        assert used == scheduler.get_last_lr()
        # relative_step with scale_parameter: min(1e-2, 1/√step) times the parameter's RMS.
        assert used[0] == pytest.approx(min(1e-2, step**-0.5) * rms, rel=1e-6)


def test_rebase_recomputes_the_rate_at_the_current_step():
    optimizer = sgd()
    scheduler = build_scheduler(optimizer, OptimizerTable(lr_scheduler="linear", lr_warmup_steps=2), 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    rebase_rates(scheduler, optimizer, [0.1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 8)  # linear: (10 − 5) / (10 − 2)
    assert scheduler.base_lrs == [0.1] and scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]


def test_step_events_carry_the_rate_each_step_used(tmp_path, tiny_model):
    optimizer = {"learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}
    result = make_run(tmp_path, tiny_model, optimizer=optimizer, training={"max_train_steps": 3}).run()
    rates = [e["lr"][0] for e in read_events(result.run_dir) if e["type"] == "step"]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3])


class Halving(torch.optim.lr_scheduler.LambdaLR):
    """A scheduler class outside torch.optim.lr_scheduler, named by its module path."""

    def __init__(self, optimizer, every):
        super().__init__(optimizer, lambda step: 0.5 ** (step // every))


def test_a_scheduler_class_from_any_module_by_its_path():
    assert ours(steps=5, lr_scheduler_type="test_schedules.Halving", lr_scheduler_args={"every": 2}) == [
        LR, LR, LR / 2, LR / 2, LR / 4]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_lr_scheduler_args_reach_every_schedule(kind):
    """lr_scheduler_args are the schedule function's keyword arguments, for every schedule: an unknown one reaches
    the function and is refused there."""
    keys, _ = CASES[kind]
    args = {**keys.get("lr_scheduler_args", {}), "not_an_argument": 1}
    with pytest.raises(TypeError, match="not_an_argument"):
        ours(lr_scheduler=kind, **{**keys, "lr_scheduler_args": args})


def test_warmup_stable_decay_with_a_fraction_of_decay_steps_cycles_and_no_floor():
    keys = {"lr_decay_steps": 0.25, "lr_scheduler_num_cycles": 3}
    assert schedule_problems(OptimizerTable(lr_scheduler="warmup_stable_decay", **keys)) == []
    assert ours(lr_scheduler="warmup_stable_decay", **keys) == library(
        lambda o: hf.get_wsd_schedule(o, 0, num_stable_steps=30, num_decay_steps=10, num_cycles=1.5, min_lr_ratio=0.0))


def test_a_step_count_of_one_written_as_a_float_is_one_step():
    from anima_core.training.schedules import steps_or_fraction

    assert (steps_or_fraction(1.0, TOTAL), steps_or_fraction(0.5, TOTAL), steps_or_fraction(3, TOTAL)) == (1, 20, 3)


def test_an_accelerate_wrapped_optimizer_is_unwrapped_for_the_schedule_and_the_rates():
    from types import SimpleNamespace

    optimizer = sgd()
    wrapped = SimpleNamespace(optimizer=optimizer)  # accelerate's AcceleratedOptimizer keeps the real one here
    scheduler = build_scheduler(wrapped, OptimizerTable(lr_scheduler="linear", lr_warmup_steps=2), TOTAL)
    assert rates_used(wrapped) == [0.0]
    optimizer.step()
    scheduler.step()
    assert rates_used(wrapped) == [LR / 2]


def test_relative_step_adafactor_reports_zero_before_its_first_step():
    cfg = OptimizerTable(optimizer_type="adafactor", lr_scheduler="adafactor", learning_rate=1e-3)
    optimizer = create_optimizer(build_plugins(entry_points=False), cfg, [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3}])
    assert rates_used(optimizer) == [0.0]


def test_build_scheduler_refuses_what_schedule_problems_finds():
    with pytest.raises(AnimaError, match="'constant' has no warmup"):
        build_scheduler(sgd(), OptimizerTable(lr_warmup_steps=10), TOTAL)
