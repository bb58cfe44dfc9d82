"""`anima-train tui` and `anima-train watch`: the Textual applications."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.screen import Screen

from anima_core import runctl
from anima_tui.editor import EditorScreen
from anima_tui.home import HomeScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft
from anima_tui.system_stats import SystemReading, probe_system


# The app's own commands in the command palette (ctrl+p): (title, help, screen action). Each is offered on
# the screens that have the action, beside Textual's built-in commands.
PALETTE_COMMANDS = (
    ("Edit profile", "open the highlighted profile in the editor", "edit"),
    ("Open profile…", "open or create a profile by its path", "open"),
    ("New profile…", "a new profile starting from the highlighted one", "new"),
    ("Watch run", "open the monitor of the highlighted run", "watch"),
    ("Save profile", "write the profile after showing the diff", "save"),
    ("Launch run", "start a detached training run from the saved profile", "launch"),
    ("Use the default", "remove the focused field's key from the profile so its default applies", "use_default"),
    ("Save now", "ask the run to save a LoRA and its state after the current step", "save_now"),
    ("Stop run", "ask the run to save, then stop (asks first)", "stop"),
    ("Previews", "the run's sample images by prompt and step", "gallery"),
)


class PaletteCommands(App):
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in PALETTE_COMMANDS:
            method = getattr(screen, f"action_{action}", None)
            if method is not None:
                yield SystemCommand(title, help_text, method)


class AnimaApp(PaletteCommands):
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


class WatchApp(PaletteCommands):
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
