"""Stop and save requests: signals, and files in ``run_dir/control`` that the TUI and `anima-train ctl` create."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


def _say(text: str) -> None:
    """Straight to stderr: safe inside a signal handler, even while a live progress bar owns the terminal."""
    try:
        os.write(2, ("\n" + text + "\n").encode())
    except OSError:
        pass


class StopDuringSetup(Exception):
    """A stop signal arrived while caching or loading, before anything was trained."""


class StopRequests:
    """First SIGINT/SIGTERM: finish the step, save, exit 0. Second: exit at once (writes are atomic).

    Before training starts (``training`` False) there is no step to finish: the first signal raises
    StopDuringSetup at once, so a long caching phase does not make the user wait.
    """

    def __init__(self, control_dir: Path | None):
        """``control_dir`` None: signals only, silently (the processes of a run other than the main one)."""
        self.control_dir = control_dir
        self.stop_reason: str | None = None
        self.training = False
        # What is complete on disk, said when a second signal quits at once (set by the trainer).
        self.on_disk: Callable[[], str] = lambda: "no LoRA or state was saved by this run yet"
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _say(self, text: str) -> None:
        if self.control_dir is not None:
            _say(text)

    def _on_signal(self, signum, frame):
        if self.stop_reason is not None:
            self._say(f"quitting now. {self.on_disk()} Every file is written whole or not at all, so nothing "
                 "half-written is left.")
            os._exit(128 + signum)
        self.stop_reason = f"signal {signal.Signals(signum).name}"
        if not self.training:
            self._say("stopping now: nothing has been trained yet.")
            raise StopDuringSetup(self.stop_reason)
        self._say("stopping after this step (the LoRA and a state are saved); Ctrl+C again to quit at once.")

    def _take(self, name: str) -> bool:
        if self.control_dir is None:
            return False
        path = self.control_dir / name
        if path.exists():
            path.unlink(missing_ok=True)
            return True
        return False

    def poll(self) -> tuple[bool, bool]:
        """(stop requested, save requested) since the last poll."""
        if self._take("stop") and self.stop_reason is None:
            self.stop_reason = "stop requested through the control file"
        return self.stop_reason is not None, self._take("save")
