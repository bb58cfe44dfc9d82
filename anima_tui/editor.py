"""The profile editor: a form per table, validated when typing pauses, saved with comments and order kept.

Validation runs in a background thread (the plugin checks import the trainer's modules, which takes seconds on a
busy machine), so the screen shows at once and keys are never held up by it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import ContentSwitcher, Footer, OptionList, Static
from textual.widgets.option_list import Option

from anima_core import runctl
from anima_core.config import TABLES
from anima_core.errors import AnimaError
from anima_core.plugins import network_arg_help
from anima_tui.dialogs import ConfirmScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft, find_problems, sort_problems
from anima_tui.widgets.field_row import FieldRow
from anima_tui.widgets.table_form import TableForm

DEBOUNCE_SECONDS = 0.4  # validate once typing pauses this long, not on every key
FIRST_CHECK_DELAY = 0.2


def shown_path(path: Path) -> str:
    """A path as short as it reads unambiguously: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class EditorScreen(Screen):
    CSS_PATH = "editor.tcss"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("ctrl+r", "launch", "Launch", priority=True),
        Binding("ctrl+d", "use_default", "Default", priority=True),
        Binding("ctrl+t", "focus_tables", "Tables"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, draft: ProfileDraft) -> None:
        super().__init__()
        self.draft = draft
        self.problems: list[str] = []
        self._edits = 0  # counts edits; a validation result is current when it saw the latest one
        self._checked = -1
        self._checking = False
        self._check_again = False
        self._pending: Timer | None = None

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
        self._show_title()
        # The first frame first: the first check imports the trainer, and its thread would slow the drawing.
        self.call_after_refresh(self.set_timer, FIRST_CHECK_DELAY, self.validate)

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
            self._edits += 1
            self._show_title()
            if self._pending is not None:
                self._pending.stop()
            self._pending = self.set_timer(DEBOUNCE_SECONDS, self.validate)

    @property
    def problems_known(self) -> bool:
        """True when the problems shown are those of the draft as it is now."""
        return self._checked == self._edits

    def validate(self) -> None:
        """Check the draft as it is now in a background thread, one check at a time (asked again during a
        check, it checks once more when that one ends). A daemon thread, not a Textual worker: quitting while
        the first check still imports the trainer must not wait for it."""
        if self._checking:
            self._check_again = True
            return
        self._checking = True
        snapshot, edits, app = self.draft.snapshot(), self._edits, self.app

        def check() -> None:
            problems = find_problems(snapshot)
            network = snapshot.data.get("network")
            network = network if isinstance(network, dict) else {}
            try:
                arg_help = network_arg_help(network.get("module") or "lora_anima", network.get("args"))
            except Exception:  # a broken plugin: find_problems has said so; no help texts
                arg_help = {}
            try:
                app.call_from_thread(self._checked_result, edits, problems, arg_help)
            except RuntimeError:  # the app has closed meanwhile
                pass

        threading.Thread(target=check, name="profile-check", daemon=True).start()

    def _checked_result(self, edits: int, problems: list[str], arg_help: dict[str, str]) -> None:
        self._checking = False
        if edits == self._edits:
            self._show_problems(problems, arg_help)
            self._checked = edits
            self._show_title()
        if self._check_again:
            self._check_again = False
            self.validate()

    def _show_problems(self, problems: list[str], arg_help: dict[str, str]) -> None:
        self.problems = problems
        by_field, by_table, general = sort_problems(self.problems)
        for form in self.query(TableForm):
            form.show_problems(by_field, by_table.get(form.table, []), arg_help)
        tables = self.query_one("#tables", OptionList)
        for index, table in enumerate(TABLES):
            count = sum(len(v) for k, v in by_field.items() if k.startswith(table + ".")) + len(by_table.get(table, []))
            tables.replace_option_prompt_at_index(index, Text(table) + (Text(f" ✗{count}", style="red") if count else ""))
        errors = self.query_one("#general-errors", Static)
        errors.update(Text("\n".join(f"✗ {p}" for p in general)))
        errors.display = bool(general)

    def _show_title(self) -> None:
        state = "modified" if self.draft.modified else "saved"
        if not self.problems_known:
            problems = "checking…"
        else:
            problems = f"{len(self.problems)} problem(s)" if self.problems else "valid"
        self.query_one("#title", Static).update(Text.assemble((self.draft.path.name, "bold"), f" · {state} · {problems}"))

    def action_save(self) -> None:
        if not self.draft.modified:
            self.notify("nothing to save")
            return
        if self.draft.empty:
            names = ", ".join(f"{t}.{k}" for t, k in sorted(self.draft.empty))
            self.notify(f"{names}: empty; type a value, or ctrl+d to remove the key", severity="warning")
            return
        question = f"Write {shown_path(self.draft.path)}?"
        if not self.problems_known:
            question += " (It is still being checked.)"
        elif self.problems:
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
        if not self.problems_known:
            self.notify("the profile is still being checked; launch again in a moment", severity="warning")
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

    def action_use_default(self) -> None:
        """Remove the focused field's key from the file on purpose, so its default applies."""
        row = next((node for node in (self.focused.ancestors if self.focused else []) if isinstance(node, FieldRow)), None)
        if row is None:
            self.notify("focus a field first", severity="warning")
            return
        row.use_default()

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
