"""Putting a saved state back into a run: the trained weights, the optimizer, the schedule, the EMA, the
gradient scaler and the random streams, on every process, so the next step is the one the saved run would
have taken (resume, and the NaN guard's reload)."""

from __future__ import annotations

from pathlib import Path

from anima_core.training.optim import train_mode
from anima_core.training.schedules import rebase_rates
from anima_core.training.state import Progress, load_state, restore_rng_state


def restore_state(trainer, state_dir: Path | None, *, lr_scale: float | None = None) -> Progress:
    """Load a state into every process: the main process reads it (the others may be on machines
    without its files) and hands it to them. ``state_dir``: the main process's; others pass None."""
    loaded = load_state(state_dir, profile=trainer.profile, allow_lr_change=trainer.allow_lr_change) \
        if trainer.processes.is_main else None
    progress, network_state, trainer_state = trainer.processes.from_main(loaded)
    trainer.target.load_state_dicts(trainer.optimizer, network_state, trainer_state["optimizer"])
    train_mode(trainer.optimizer)  # a schedule-free state is saved with its eval weights
    trainer.scheduler.load_state_dict(trainer_state["scheduler"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(trainer_state["ema"])
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None and trainer_state["scaler"] is not None:
        scaler.load_state_dict(trainer_state["scaler"])
    restore_rng_state(trainer_state["rng"])
    if lr_scale is not None:
        progress.lr_scale = lr_scale
    # The profile's rates (possibly changed with --allow-lr-change) times any NaN-guard reduction.
    rebase_rates(trainer.scheduler, trainer.optimizer, [lr * progress.lr_scale for lr in trainer.base_lrs])
    progress.bad_steps = 0
    trainer.progress = progress
    return progress
