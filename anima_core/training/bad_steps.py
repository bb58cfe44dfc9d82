"""The NaN guard: a step whose loss or gradient is not finite is skipped and its samples named; after too many
in a row the last saved state is reloaded once with a lower learning rate, or the run stops saying why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anima_core.training.state import Progress


class NanGuard:
    """``restore(state, lr_scale=...)`` reloads a state into the run; ``last_state()`` names the newest one."""

    def __init__(self, training_cfg, *, warn: Callable[..., None], last_state: Callable[[], Path | None],
                 restore: Callable[..., Progress]):
        self.cfg = training_cfg
        self.warn = warn
        self.last_state = last_state
        self.restore = restore
        self.reloaded_from: Path | None = None
        self.stop_reason: str | None = None

    def handle(self, progress: Progress, samples: list[tuple[str, float]], loss: float, norm: float) -> str:
        """After a non-finite step (its gradients already cleared): "skipped", "reloaded" or "stop"
        (``stop_reason`` then says why and what to do)."""
        t = self.cfg
        progress.bad_steps += 1
        images, sigmas = [str(p) for p, _ in samples], [round(s, 5) for _, s in samples]
        named = ", ".join(f"{Path(p).name} (σ {s})" for p, s in zip(images, sigmas))
        self.warn(f"non-finite loss or gradient at step {progress.step + 1}, step skipped; samples: {named}",
                  loss=loss, grad_norm=norm, images=images, sigmas=sigmas)
        if progress.bad_steps < t.nan_guard_max_bad_steps:
            return "skipped"
        seen = f"{progress.bad_steps} non-finite steps in a row (last loss {loss}, gradient norm {norm})"
        state = self.last_state()
        # One reload per saved state: going bad again before the next save means the reload did not help.
        if state is not None and t.nan_guard_lr_factor and state != self.reloaded_from:
            self.warn(f"{seen}: reloading {state.name} with the learning rate × {t.nan_guard_lr_factor}")
            self.reloaded_from = state
            self.restore(state, lr_scale=progress.lr_scale * t.nan_guard_lr_factor)
            return "reloaded"
        again = f", again after reloading {state.name} with a lower learning rate" if state and state == self.reloaded_from else ""
        self.stop_reason = (
            f"{seen}{again}. Likely causes: a learning rate too high for this alpha/rank, fp16 overflow (use bf16), "
            "or broken images/latents (see the samples named in the warnings). Lower optimizer.learning_rate, "
            "set training.nan_guard_lr_factor to reload the last state automatically, or rebuild the caches."
        )
        return "stop"
