"""The data phase of a run: the profile's dataset options, every image and caption checked before any model
loads, and the warnings about files that break later (only the main process writes them; the others pass
theirs on with their step reports)."""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path

from anima_core.config.schema import Profile
from anima_core.data import DataOptions, PhaseProgress, build_training_data
from anima_core.training.state import Progress


def data_options(profile: Profile, processes=None) -> DataOptions:
    """The profile's dataset table uses DataOptions' names; the rest comes from other tables. Without
    ``processes`` (reports before a run), the profile's training.num_processes."""
    values = {f.name: getattr(profile.dataset, f.name) for f in fields(DataOptions) if hasattr(profile.dataset, f.name)}
    if isinstance(values.get("resolution"), list):
        values["resolution"] = tuple(values["resolution"])
    return DataOptions(
        **values,
        seed=profile.training.seed,
        max_train_steps=profile.training.max_train_steps,
        qwen3_max_token_length=profile.model.qwen3_max_token_length,
        t5_max_token_length=profile.model.t5_max_token_length,
        num_processes=processes.num_processes if processes else profile.training.num_processes,
        process_index=processes.index if processes else 0,
    )


class DataPhase:
    """The checked training data of a run and what it found; ``report()`` once run_start is written."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.scan_progress: list[PhaseProgress] = []
        self.pending: list[str] = []  # a non-main process's warnings, passed on with its next step report
        self.reported: set[str] = set()

    def build(self):
        trainer = self.trainer
        if trainer.profile.slider.pairs:  # prompt pairs instead of images (data/slider_data.py)
            from anima_core.data.slider_data import build_slider_data

            self.data = build_slider_data(trainer.profile, trainer.processes)
            return self.data

        def show(progress: PhaseProgress) -> None:  # on the console now; as events once run_start is written
            trainer.display.message(progress.describe())
            if progress.finished:
                self.scan_progress.append(progress)

        self.data = build_training_data(data_options(trainer.profile, trainer.processes), base_dir=Path.cwd(),
                                        on_warning=trainer.startup_warnings.append, progress=show)
        return self.data

    def report(self) -> None:
        trainer = self.trainer
        for progress in self.scan_progress:
            trainer.events.emit("cache", **progress.fields())
        for message in trainer.startup_warnings:
            trainer.warn(message)
        for line in self.data.bucket_report():
            trainer.log(line)
        for part in (self.data, self.data.validation):
            if part is not None:
                part.on_warning = self.warning

    def warning(self, message: str) -> None:
        """A file that broke after the scan, found while caching or training. The main process reports each
        once (several processes may find the same file)."""
        if not self.trainer.processes.is_main:
            self.pending.append(message)
        elif message not in self.reported:
            self.reported.add(message)
            self.trainer.warn(message)

    def take_pending(self) -> list[str]:
        pending, self.pending = self.pending, []
        return pending


def planned_batches(data, progress: Progress, *, distributed: bool):
    """(epoch, index in epoch, this process's slice, samples planned in the global batch) from the resume
    point on; past the planned epochs when skipped non-finite steps used batches (the loop ends at
    total_steps), ending if a whole epoch yields none. One process skips a batch none of whose samples
    could be loaded; several keep in step and train an empty slice as nothing."""
    first_epoch, first_batch = progress.epoch, progress.batch_in_epoch
    for epoch in itertools.count(first_epoch):
        start = first_batch if epoch == first_epoch else 0
        empty = True
        for index, batch in data.epoch_slices(epoch, start_batch=start):
            if batch is None and not distributed:
                continue
            empty = False
            yield epoch, index, batch, data.planned_batch_size(epoch, index)
        if empty and start == 0:
            return
