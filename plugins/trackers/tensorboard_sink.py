"""TensorBoard: event files under `<log folder>/<log_tracker_name>`, as accelerate lays them out for sd-scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anima_plugins.trackers.base import TrackerSink


class TensorBoardSink(TrackerSink):
    package = "tensorboard"

    def __init__(self, run_dir: Path, profile, tracker_config: dict):
        super().__init__(run_dir, profile)
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (the extra)

        self.path = self.folder / self.tracker_name
        self.writer = SummaryWriter(log_dir=str(self.path), **tracker_config)
        if self.profile_toml is not None:
            # TensorBoard renders text as Markdown: indent the TOML so it shows as code.
            self.writer.add_text("config", "    " + self.profile_toml.replace("\n", "\n    "), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, path: Path, caption: str, step: int) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()
