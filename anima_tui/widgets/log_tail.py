"""The end of a growing text file, followed by polling; undecodable bytes are replaced.

Given several paths it follows the first that exists: a run's train.log, else the trainer's launch.log
(where a run that failed before its first event explains why).
"""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Log

from anima_tui.widgets import css_beside

MAX_LINES = 1000
INITIAL_BYTES = 256 * 1024


class LogTail(Log):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, *paths: Path, **kwargs) -> None:
        super().__init__(max_lines=MAX_LINES, **kwargs)
        self.paths = paths
        self.path = paths[0]
        self._offset: int | None = None
        self._partial = b""

    def _choose(self) -> None:
        path = next((p for p in self.paths if p.exists()), self.paths[0])
        if path != self.path:
            self.path, self._offset, self._partial = path, None, b""
            self.clear()
            self.border_title = path.name

    def poll(self) -> None:
        self._choose()
        try:
            size = self.path.stat().st_size
            if self._offset is None or size < self._offset:
                # On attach (or after the file was replaced) show only the end of a long log.
                self._offset, self._partial = max(0, size - INITIAL_BYTES), b""
            if size == self._offset:
                return
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = self._partial + handle.read(size - self._offset)
        except OSError:
            return
        self._offset = size
        complete, _, self._partial = data.rpartition(b"\n")
        if complete:
            self.write_lines(complete.decode("utf-8", errors="replace").splitlines())
