"""The run's folder: created by the main process with the resolved profile and the event log (its sinks
attached); the other processes only know its name and build events without writing them."""

from __future__ import annotations

import time

from rich.console import Console

from anima_core.atomic import atomic_write_text, clean_leftovers
from anima_core.config.load import profile_to_toml
from anima_core.training.events import EventLog, make_run_dir
from anima_core.training.progress import ProgressDisplay


class QuietEvents:
    """The event log of a process other than the main one: events are built (the display reads them),
    never written."""

    def emit(self, type_: str, **fields) -> dict:
        return {"type": type_, "time": time.time(), **fields}

    def close(self) -> None:
        pass


def open_run(profile, plugins, processes, console):
    """(run folder, events, display, warnings to report once run_start is written)."""
    saving = profile.saving
    name = profile.logging.run_name or time.strftime("%Y%m%d-%H%M%S-") + saving.output_name
    if not processes.is_main:  # only the main process writes the run; the others name its folder
        display = ProgressDisplay("plain", 1, profile.logging.log_every_n_steps, Console(quiet=True))
        return saving.output_dir / "runs" / name, QuietEvents(), display, []
    run_dir = make_run_dir(saving.output_dir, name)
    atomic_write_text(run_dir / "profile.toml", profile_to_toml(profile))
    made = (e.obj(run_dir, profile) for e in plugins.registry("register_event_sinks").entries.values())
    events = EventLog(run_dir, [sink for sink in made if sink is not None])  # None: a sink this profile does not select
    display = ProgressDisplay(profile.logging.progress, 1, profile.logging.log_every_n_steps, console)
    warnings = [f"removed {p}, left by an interrupted write" for p in clean_leftovers(saving.output_dir)]
    # A request left from an earlier run in this folder must not stop or save this one.
    for stale in sorted((run_dir / "control").glob("*")):
        stale.unlink(missing_ok=True)
        warnings.append(f"ignored the leftover control request {stale.name!r} from an earlier run")
    return run_dir, events, display, warnings
