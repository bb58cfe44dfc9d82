"""Weights & Biases: one W&B run per training run, in the log folder (WANDB_MODE=offline works without network).

The API key is never read from or written to a profile, an event or a log: wandb takes it from its own login
(`wandb login`) or from WANDB_API_KEY, as it would for any script.
"""

from __future__ import annotations

from pathlib import Path

from anima_core.errors import AnimaError
from anima_plugins.trackers.base import TrackerSink


class WandbSink(TrackerSink):
    package = "wandb"

    def __init__(self, run_dir: Path, profile, tracker_config: dict):
        super().__init__(run_dir, profile)
        import wandb

        self.wandb = wandb
        self.folder.mkdir(parents=True, exist_ok=True)
        arguments = {"project": self.tracker_name, "name": profile.logging.wandb_run_name or self.run_name,
                     "dir": str(self.folder), "config": self.profile_dict, **tracker_config}
        try:
            self.run = wandb.init(**arguments)
        except Exception as exc:  # no login, no network: say what to do before any compute is spent
            raise AnimaError(
                f"W&B could not start a run ({exc}). Log in with `wandb login` or set WANDB_API_KEY, or set "
                "WANDB_MODE=offline and upload later with `wandb sync`."
            ) from exc

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, path: Path, caption: str, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path), caption=caption)}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("finished", "stopped", "cached") else 1)
