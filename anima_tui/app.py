"""`anima-train tui` and `anima-train watch`: the Textual applications."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual.app import App

from anima_core import runctl
from anima_tui.editor import EditorScreen
from anima_tui.home import HomeScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft
from anima_tui.system_stats import SystemReading, probe_system


class AnimaApp(App):
    """Opens on the start screen, or straight on a profile's editor or a run's monitor."""

    TITLE = "anima-train"

    def __init__(self, target: Path | None = None, *, probe: Callable[[], SystemReading] = probe_system) -> None:
        super().__init__()
        self.target = Path(target) if target is not None else None
        self.probe = probe

    def on_mount(self) -> None:
        target = self.target
        if target is None:
            self.push_screen(HomeScreen())
        elif target.is_dir():
            self.push_screen(MonitorScreen(target, probe=self.probe))
        else:
            self.push_screen(EditorScreen(ProfileDraft.open(target)))


class WatchApp(App):
    """The monitor alone."""

    TITLE = "anima-train watch"

    def __init__(self, run_dir: Path, *, probe: Callable[[], SystemReading] = probe_system) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.probe = probe

    def on_mount(self) -> None:
        self.push_screen(MonitorScreen(self.run_dir, probe=self.probe))


def run_tui(target: Path | None = None) -> None:
    """A directory target must be a run directory; anything else is a profile to edit (or create)."""
    if target is not None and Path(target).is_dir():
        runctl.require_run_dir(target)
    AnimaApp(target).run()


def run_watch(run_dir: Path) -> None:
    WatchApp(runctl.require_run_dir(run_dir)).run()
