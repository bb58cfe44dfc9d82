"""The profile editor: a form per table, validated as you type, saved with comments and order kept."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, OptionList, Static
from textual.widgets.option_list import Option

from anima_core import runctl
from anima_core.config import TABLES
from anima_core.errors import AnimaError
from anima_tui.dialogs import ConfirmScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft, sort_problems
from anima_tui.widgets.field_row import FieldRow
from anima_tui.widgets.table_form import TableForm


class EditorScreen(Screen):
    CSS_PATH = "editor.tcss"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("ctrl+r", "launch", "Launch run", priority=True),
        Binding("ctrl+t", "focus_tables", "Tables"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, draft: ProfileDraft) -> None:
        super().__init__()
        self.draft = draft
        self.problems: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal():
            yield OptionList(*[Option(table, id=table) for table in TABLES], id="tables")
            with ContentSwitcher(initial=f"table-{TABLES[0]}", id="forms"):
                for table in TABLES:
                    yield TableForm(table, self.draft)
        yield Static(id="general-errors")
        yield Footer()

    def on_mount(self) -> None:
        self.show_table(TABLES[0])
        self.validate()

    def show_table(self, table: str) -> None:
        self.query_one(f"#table-{table}", TableForm).populate()
        self.query_one(ContentSwitcher).current = f"table-{table}"

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.show_table(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.show_table(event.option.id)
        self.call_after_refresh(self.focus_next)  # into the table's first field

    def on_field_row_edited(self, event: FieldRow.Edited) -> None:
        if self.draft.set(event.row.spec.table, event.row.spec.name, event.value):
            self.validate()

    def validate(self) -> None:
        self.problems = self.draft.problems()
        by_field, by_table, general = sort_problems(self.problems)
        for form in self.query(TableForm):
            form.show_problems(by_field, by_table.get(form.table, []))
        tables = self.query_one("#tables", OptionList)
        for index, table in enumerate(TABLES):
            count = sum(len(v) for k, v in by_field.items() if k.startswith(table + ".")) + len(by_table.get(table, []))
            tables.replace_option_prompt_at_index(index, Text(table) + (Text(f" ✗{count}", style="red") if count else ""))
        errors = self.query_one("#general-errors", Static)
        errors.update(Text("\n".join(f"✗ {p}" for p in general)))
        errors.display = bool(general)
        self._show_title()

    def _show_title(self) -> None:
        state = "modified" if self.draft.modified else "saved"
        problems = f"{len(self.problems)} problem(s)" if self.problems else "valid"
        self.query_one("#title", Static).update(Text.assemble((self.draft.path.name, "bold"), f" · {state} · {problems}"))

    def action_save(self) -> None:
        if not self.draft.modified:
            self.notify("nothing to save")
            return
        question = f"Write {self.draft.path}?"
        if self.problems:
            question += f" It still has {len(self.problems)} problem(s); a run would refuse it."

        def answered(confirmed: bool | None) -> None:
            if not confirmed:
                return
            try:
                self.draft.save()
            except AnimaError as exc:
                self.notify(str(exc), severity="error")
                return
            self.notify(f"saved {self.draft.path.name}")
            self._show_title()

        self.app.push_screen(ConfirmScreen(question, diff=self.draft.diff()), answered)

    def action_launch(self) -> None:
        if self.draft.modified:
            self.notify("save the profile first (ctrl+s): a run starts from the file on disk", severity="warning")
            return
        if self.problems:
            self.notify("fix the problems shown in red first", severity="warning")
            return
        try:
            launch = runctl.launch_detached(self.draft.path)
        except (AnimaError, OSError) as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"started run {launch.run_dir.name} (pid {launch.pid}); it keeps running if you disconnect")
        self.app.push_screen(MonitorScreen(launch.run_dir))

    def action_focus_tables(self) -> None:
        self.query_one("#tables", OptionList).focus()

    def action_back(self) -> None:
        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self._leave()

        if self.draft.modified:
            self.app.push_screen(ConfirmScreen("Leave without saving your changes?"), answered)
        else:
            self._leave()

    def _leave(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:
            self.app.exit()
