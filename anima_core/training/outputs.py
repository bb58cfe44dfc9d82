"""What a run leaves on disk: the trained files under their names, the resumable states, the pruning of
older saves, the self-check of each file after it is written, and what to say about them on a stop.

Only the main process writes; the others keep track of the names so every process knows the newest state
(the NaN guard reloads it on all of them). A sharded target's saves gather its tensors from every process, so
then every process goes through them and the main one writes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from anima_core.training.devices import SAVE_DTYPES
from anima_core.training.metadata import save_metadata
from anima_core.training.state import Progress, epoch_number, save_state, state_path


class RunOutputs:
    """The saves of one run. ``trainer`` gives the profile, the processes, the event log and (once
    built) the training target, the optimizer, the scheduler, the EMA and the base metadata."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.saving = trainer.profile.saving
        self.last_file: Path | None = None  # the newest trained file written (or, off the main process, named)
        self.last_state: Path | None = None
        self.saved_progress: Progress | None = None

    @property
    def is_main(self) -> bool:
        return self.trainer.processes.is_main

    def path(self, *, step: int | None = None, epoch: int | None = None) -> Path:
        s = self.saving
        if epoch is not None:
            name = f"{s.output_name}-{epoch:06d}"
        elif step is not None:
            name = f"{s.output_name}-step{step:08d}"
        else:
            name = s.output_name
        return s.output_dir / f"{name}.safetensors"

    def save(self, path: Path, progress: Progress) -> None:
        """The trained file (with ema_save = "lora" the EMA weights; with "beside" also <name>-ema next to it)."""
        self.last_file = path
        trainer = self.trainer
        if not (self.is_main or trainer.target.collective):
            return
        ema = trainer.ema is not None and trainer.profile.optimizer.ema_save
        with trainer.ema.applied() if ema == "lora" else contextlib.nullcontext():
            self._write(path, progress)
        if ema == "beside":
            with trainer.ema.applied():
                self._write(path.with_name(f"{path.stem}-ema{path.suffix}"), progress)

    def _write(self, path: Path, progress: Progress) -> None:
        trainer = self.trainer
        target = trainer.target
        metadata = save_metadata(trainer.profile, trainer.base_metadata, target.metadata(), step=progress.step,
                                 epoch=epoch_number(progress))
        precision = self.saving.save_precision
        target.save(path, metadata=metadata, dtype=SAVE_DTYPES[precision] if precision else target.default_save_dtype)
        if not self.is_main:
            return
        trainer.events.emit("save", kind=target.file_kind, path=str(path), step=progress.step, epoch=epoch_number(progress))
        self._self_check(path)

    def _self_check(self, path: Path) -> None:
        result = self.trainer.target.self_check(path)
        if result is None:
            return
        if result.ok:
            self.trainer.events.emit("log", message=f"self-check of {path.name}: {result.summary}")
        else:
            self.trainer.warn(f"self-check of {path.name} failed: {result.summary}")

    def keep_earlier_final(self, progress: Progress, total_steps: int) -> None:
        """Extending a finished run would overwrite its final file at the end: keep that file under the name of
        its epoch (when it ended on an epoch boundary of an epoch-counted run) or of its step."""
        final = self.path()
        if progress.step >= total_steps or not final.is_file() or not self.is_main:
            return
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as f:
            meta = f.metadata() or {}
        step = int(meta.get("ss_steps", progress.step))
        epoch_end = progress.batch_in_epoch == 0 and self.trainer.profile.training.max_train_epochs
        kept = self.path(epoch=int(meta.get("ss_epoch", progress.epoch))) if epoch_end else self.path(step=step)
        if kept.exists():
            return
        os.replace(final, kept)
        self.trainer.log(f"kept the earlier final {self.trainer.target_kind.file_label} as {kept.name} "
                         f"(this run writes a new {final.name} when it ends)")

    def on_disk(self) -> str:
        """What an interrupted run leaves, for the message of a second Ctrl+C."""
        label = self.trainer.target_kind.file_label
        saved = f"the last {label} saved is {self.last_file}" if self.last_file else f"no {label} was saved by this run"
        state = (f"the last state is {self.last_state} (continue with --resume {self.trainer.run_dir})" if self.last_state
                 else "no resumable state was saved")
        return f"On disk: {saved}; {state}."

    def save_state(self, progress: Progress) -> None:
        if progress == self.saved_progress:  # a stop right after a scheduled save: that state is this one
            return
        trainer = self.trainer
        if self.is_main or trainer.target.collective:
            weights, optimizer_state = trainer.target.state_dicts(trainer.optimizer)
            ema = {"ema": trainer.ema.state_dict()} if trainer.ema is not None else None
        if not self.is_main:
            self.last_state, self.saved_progress = state_path(trainer.run_dir / "state", progress.step), replace(progress)
            return
        scaler = getattr(trainer.accelerator, "scaler", None)
        path = save_state(trainer.run_dir / "state", progress=progress, network_state=weights,
                          optimizer_state=optimizer_state, scheduler=trainer.scheduler, scaler=scaler,
                          profile=trainer.profile, keep_last=self.saving.keep_last_n_states, extra=ema)
        self.last_state, self.saved_progress = path, replace(progress)
        trainer.events.emit("save", kind="state", path=str(path), step=progress.step, epoch=epoch_number(progress))

    def scheduled(self, progress: Progress, *, final: bool, epoch_done: bool, epoch: int, save_now: bool) -> None:
        """The saves due after a step: every N steps / epochs (pruning the older ones), a requested save, and the
        state beside any of them (or every save_state_every_n_steps)."""
        s = self.saving
        saved = False
        if not final and s.save_every_n_steps and progress.step % s.save_every_n_steps == 0:
            self.save(self.path(step=progress.step), progress)
            self._prune_steps(progress.step)
            saved = True
        if not final and epoch_done and s.save_every_n_epochs and (epoch + 1) % s.save_every_n_epochs == 0:
            self.save(self.path(epoch=epoch + 1), progress)
            self._prune_epochs(epoch + 1)
            saved = True
        if save_now and not saved:
            self.save(self.path(step=progress.step), progress)
            saved = True
        state_every = s.save_state_every_n_steps
        if s.save_state and not final and (saved or (state_every and progress.step % state_every == 0)):
            self.save_state(progress)

    def _prune_epochs(self, epoch: int) -> None:
        keep = self.saving.save_last_n_epochs
        if keep and self.is_main:
            old = epoch - keep
            if old >= 1:
                self.path(epoch=old).unlink(missing_ok=True)

    def _prune_steps(self, step: int) -> None:
        keep, every = self.saving.save_last_n_steps, self.saving.save_every_n_steps
        if keep and every and self.is_main:
            for old in range(every, step - keep, every):
                self.path(step=old).unlink(missing_ok=True)
