"""The form for one profile table: every field of the schema, in schema order, with table-wide problems first."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from anima_core.config import Profile
from anima_tui.profile_draft import ProfileDraft, field_specs
from anima_tui.widgets import css_beside
from anima_tui.widgets.field_row import FieldRow


class TableForm(VerticalScroll):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, table: str, draft: ProfileDraft) -> None:
        super().__init__(id=f"table-{table}")
        self.table = table
        self.draft = draft

    def compose(self) -> ComposeResult:
        summary = Profile.model_fields[self.table].description or ""
        yield Static(Text(f"[{self.table}]  {summary}"), classes="table-title")
        yield Static(classes="table-errors")
        for spec in field_specs(self.table):
            yield FieldRow(spec, self.draft.value(self.table, spec.name))

    def show_problems(self, by_field: dict[str, list[str]], table_level: list[str]) -> None:
        errors = self.query_one(".table-errors", Static)
        errors.update(Text("\n".join(f"✗ {p}" for p in table_level)))
        errors.display = bool(table_level)
        for row in self.query(FieldRow):
            row.show_problems(by_field.get(row.spec.dotted, []))
