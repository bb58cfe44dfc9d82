"""Saves, samples and warnings of a run, newest last."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from anima_tui.run_state import Note
from anima_tui.widgets import css_beside

KIND_STYLE = {"save": "green", "sample": "cyan", "warning": "yellow"}


class NotesList(DataTable):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, show_header=True, **kwargs)
        self._shown = 0

    def on_mount(self) -> None:
        self.add_columns("step", "what", "detail")

    def show(self, notes: list[Note]) -> None:
        for note in notes[self._shown:]:
            step = "" if note.step is None else str(note.step)
            # no_wrap: a Text is otherwise measured wrapped to the width the table has at that moment.
            self.add_row(step, Text(note.kind, style=KIND_STYLE.get(note.kind, ""), no_wrap=True), Text(note.message, no_wrap=True))
        if len(notes) > self._shown:
            # After the next refresh: moving now would draw the rows before their columns are measured.
            self.call_after_refresh(self.move_cursor, row=len(notes) - 1)
        self._shown = len(notes)
