"""One profile field: its name, an input chosen by type, help text with the default, and its problems."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select, Static, Switch

from anima_tui.profile_draft import REMOVE, FieldSpec, parse, shown, to_toml_text
from anima_tui.widgets import css_beside


def default_text(spec: FieldSpec) -> str:
    if spec.default is None:
        return "empty"
    return to_toml_text(str(spec.default) if spec.kind == "text" else spec.default)


class FieldRow(Vertical):
    DEFAULT_CSS = css_beside(__file__)

    class Edited(Message):
        def __init__(self, row: "FieldRow", value: Any) -> None:
            super().__init__()
            self.row = row
            self.value = value

    def __init__(self, spec: FieldSpec, value: Any) -> None:
        super().__init__(id=f"field-{spec.table}-{spec.name}")
        self.spec = spec
        self.initial = value

    def compose(self) -> ComposeResult:
        spec, value = self.spec, self.initial
        with Horizontal(classes="field-line"):
            yield Label(spec.name, classes="field-name")
            if spec.kind == "bool":
                yield Switch(value=bool(spec.default if value is None else value), classes="field-input")
            elif spec.kind == "choice" and (value is None or value in spec.choices):
                yield Select(
                    [(str(c), c) for c in spec.choices],
                    value=spec.default if value is None else value,
                    allow_blank=spec.optional,
                    prompt="(empty)",
                    classes="field-input",
                )
            else:
                yield Input(shown(value, spec), placeholder=f"default: {default_text(spec)}", classes="field-input")
        yield Static(Text(f"{spec.help}  [default: {default_text(spec)}]"), classes="field-help")
        yield Static(classes="field-error")

    def show_problems(self, problems: list[str]) -> None:
        error = self.query_one(".field-error", Static)
        error.update(Text("\n".join(f"✗ {p}" for p in problems)))
        error.display = bool(problems)
        self.set_class(bool(problems), "has-error")

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.Edited(self, parse(event.value, self.spec)))

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        self.post_message(self.Edited(self, event.value))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self.post_message(self.Edited(self, REMOVE if event.value is Select.BLANK else event.value))
