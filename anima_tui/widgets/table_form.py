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
    can_focus = False  # focus goes to the fields; the form scrolls to the focused one

    def __init__(self, table: str, draft: ProfileDraft) -> None:
        super().__init__(id=f"table-{table}")
        self.table = table
        self.draft = draft
        self._by_field: dict[str, list[str]] = {}
        self._arg_help: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        summary = Profile.model_fields[self.table].description or ""
        yield Static(Text(f"[{self.table}]  {summary}"), classes="table-title")
        yield Static(classes="table-errors")

    def populate(self) -> None:
        """Mount the field rows the first time the table is shown (all tables at once are ~1000 widgets)."""
        if self.query(FieldRow):
            return
        self.mount_all(FieldRow(spec, self.draft.value(self.table, spec.name)) for spec in field_specs(self.table))
        self.call_after_refresh(self._apply_problems)

    def show_problems(self, by_field: dict[str, list[str]], table_level: list[str], arg_help: dict[str, str]) -> None:
        """The check's results: problems, and the help of the network plugin's args (looked up with the
        plugins, in the check's thread)."""
        self._by_field, self._arg_help = by_field, arg_help
        errors = self.query_one(".table-errors", Static)
        errors.update(Text("\n".join(f"✗ {p}" for p in table_level)))
        errors.display = bool(table_level)
        self._apply_problems()

    def _apply_problems(self) -> None:
        for row in self.query(FieldRow):
            row.show_problems(self._by_field.get(row.spec.dotted, []))
            if row.spec.dotted == "network.args":  # the args the chosen network plugin (and algorithm) takes
                row.show_arg_help(self._arg_help)
