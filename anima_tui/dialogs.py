"""Modal questions: yes/no (optionally with a diff to read first) and a file path."""

from __future__ import annotations

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, ScrollableContainer, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Static

from anima_tui.widgets.ordered_input import OrderedInput


class ConfirmScreen(ModalScreen[bool]):
    CSS_PATH = "dialogs.tcss"
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, diff: str | None = None) -> None:
        super().__init__()
        self.question = question
        self.diff = diff

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog with-diff" if self.diff is not None else "dialog"):
            yield Label(self.question, classes="question")
            if self.diff is not None:
                with ScrollableContainer(classes="diff"):
                    yield Static(Syntax(self.diff or "(no changes)", "diff", theme="ansi_dark", word_wrap=False), expand=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="primary", id="yes", compact=True)
                yield Button("No (n)", id="no", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.diff is not None:  # arrows and PageUp/PageDown read the diff; y / n answer from anywhere
            self.query_one(".diff").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PathPrompt(ModalScreen[str | None]):
    CSS_PATH = "dialogs.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            yield OrderedInput(self.value, id="path")
        yield Footer()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
