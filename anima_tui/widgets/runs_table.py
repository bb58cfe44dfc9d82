"""The runs found under the known output folders: status, progress and name (last: long names are cut, not
the step column)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from anima_core.runctl import RunInfo
from anima_tui.widgets import css_beside

STATUS_STYLE = {"running": "bold green", "starting": "green", "finished": "cyan", "stopped": "yellow", "failed": "red", "died": "red"}


class RunsTable(DataTable):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.runs: list[RunInfo] = []

    def on_mount(self) -> None:
        self.add_columns("status", "step", "run")

    def show(self, runs: list[RunInfo]) -> None:
        kept = self.selected()
        self.runs = runs
        self.clear()
        for run in runs:
            step = "–" if run.step is None else str(run.step)
            progress = f"{step}/{run.total_steps}" if run.total_steps else step
            self.add_row(Text(run.status, style=STATUS_STYLE.get(run.status, "")), progress, run.run_id, key=str(run.run_dir))
        if kept is not None:  # the list is rebuilt every few seconds: the cursor stays on its run
            self.move_cursor(row=next((i for i, r in enumerate(runs) if r.run_dir == kept.run_dir), 0))

    def selected(self) -> RunInfo | None:
        if not self.runs or self.cursor_row < 0:
            return None
        return self.runs[min(self.cursor_row, len(self.runs) - 1)]
