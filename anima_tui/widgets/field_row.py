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
from anima_tui.widgets.ordered_input import OrderedInput


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
        self._problems: list[str] = []
        self._shown_value: Any = None  # what the control shows; its initial Changed event is not an edit

    def compose(self) -> ComposeResult:
        spec, value = self.spec, self.initial
        with Horizontal(classes="field-line"):
            yield Label(spec.name, classes="field-name")
            if spec.kind == "bool":
                self._shown_value = bool(spec.default if value is None else value)
                yield Switch(value=self._shown_value, classes="field-input")
            elif spec.kind == "choice" and (value is None or value in spec.choices):
                current = spec.default if value is None else value
                self._shown_value = Select.NULL if current is None else current
                yield Select(
                    [(str(c), c) for c in spec.choices],
                    value=self._shown_value,
                    allow_blank=spec.optional,
                    prompt="(empty)",
                    compact=True,
                    classes="field-input",
                )
            else:
                self._shown_value = shown(value, spec)
                yield OrderedInput(self._shown_value, placeholder=f"default: {default_text(spec)}", compact=True, classes="field-input")
        yield Static(Text(f"{spec.help}  [default: {default_text(spec)}]"), classes="field-help")
        yield Static(classes="field-help field-arg-help")
        yield Static(classes="field-error")

    def on_mount(self) -> None:
        self._render_problems()

    def show_problems(self, problems: list[str]) -> None:
        if problems != self._problems:
            self._problems = problems
            self._render_problems()

    def show_arg_help(self, texts: dict[str, str]) -> None:
        """Help per key of a table-valued field (the network plugin's args), shown under its own help."""
        helps = self.query(".field-arg-help")
        if not helps:
            return
        help_static = helps.first(Static)
        help_static.update(Text("\n".join(f"  {name}: {text}" for name, text in texts.items())))
        help_static.display = bool(texts)

    def _render_problems(self) -> None:
        errors = self.query(".field-error")
        if not errors:  # not composed yet: on_mount renders them
            return
        problems = self._problems
        error = errors.first(Static)
        error.update(Text("\n".join(f"✗ {p}" for p in problems)))
        error.display = bool(problems)
        self.set_class(bool(problems), "has-error")

    def use_default(self) -> None:
        """Remove the key on purpose: the control shows the default, the draft drops the key."""
        spec = self.spec
        control = self.query_one(".field-input")
        if isinstance(control, Switch):
            self._shown_value = bool(spec.default)
        elif isinstance(control, Select):
            self._shown_value = Select.NULL if spec.default is None else spec.default
        else:
            self._shown_value = ""
        control.value = self._shown_value  # its Changed event matches _shown_value, so it is not an edit
        self.post_message(self.Edited(self, REMOVE))

    def _edited(self, control_value: Any, value: Any) -> None:
        if control_value != self._shown_value:
            self._shown_value = control_value
            self.post_message(self.Edited(self, value))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._edited(event.value, parse(event.value, self.spec))

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        self._edited(event.value, event.value)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._edited(event.value, REMOVE if event.value is Select.NULL else event.value)
