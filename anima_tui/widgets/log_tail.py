"""The end of a growing text file, followed by polling; undecodable bytes are replaced.

Lines wrap to the pane's width (a trainer's log line is ~110 characters; cutting it hides the numbers), so
there is no sideways scrolling. The view follows new lines while it is at the bottom; scrolled up to read,
it stays put until scrolled back down (or End).

Given several paths it follows the first that exists: a run's train.log, else the trainer's launch.log
(where a run that failed before its first event explains why).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from rich.text import Text
from textual import events
from textual.widgets import RichLog

from anima_tui.widgets import css_beside

MAX_LINES = 1000
INITIAL_BYTES = 256 * 1024


class LogTail(RichLog):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, *paths: Path, **kwargs) -> None:
        super().__init__(max_lines=4 * MAX_LINES, wrap=True, min_width=1, auto_scroll=False, **kwargs)
        self.paths = paths
        self.path = paths[0]
        self.texts: deque[str] = deque(maxlen=MAX_LINES)  # the file's lines, re-wrapped when the width changes
        self._offset: int | None = None
        self._partial = b""
        self._width = 0
        self._switched = False  # read_new moved to another file; show clears the old one's lines

    def _choose(self) -> None:
        path = next((p for p in self.paths if p.exists()), self.paths[0])
        if path != self.path:
            self.path, self._offset, self._partial = path, None, b""
            self._switched = True

    def read_new(self) -> list[str]:
        """The complete lines added since the last call (file work only: safe in a worker thread)."""
        self._choose()
        try:
            size = self.path.stat().st_size
            if self._offset is None or size < self._offset:
                # On attach (or after the file was replaced) show only the end of a long log.
                self._offset, self._partial = max(0, size - INITIAL_BYTES), b""
            if size == self._offset:
                return []
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = self._partial + handle.read(size - self._offset)
        except OSError:
            return []
        self._offset = size
        complete, _, self._partial = data.rpartition(b"\n")
        return complete.decode("utf-8", errors="replace").splitlines() if complete else []

    def show(self, lines: list[str]) -> None:
        if self._switched:
            self._switched = False
            self.texts.clear()
            self.clear()
            self.border_title = self.path.name
        self.texts.extend(lines)
        self._write(lines[-MAX_LINES:])

    def poll(self) -> None:
        self.show(self.read_new())

    def _write(self, lines: list[str]) -> None:
        follow = not self.lines or self.is_vertical_scroll_end
        for line in lines:
            self.write(Text(line), shrink=True, scroll_end=follow)

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._width:
            self._width = event.size.width
            self.clear()
            self._write(list(self.texts))
