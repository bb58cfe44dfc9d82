"""A profile being edited: the tomlkit document (comments and order kept), its schema fields and problems."""

from __future__ import annotations

import difflib
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import tomlkit
from pydantic import BaseModel, ValidationError

from anima_core.atomic import atomic_write_text
from anima_core.config import Profile, profile_from_dict
from anima_core.errors import ProfileError

REMOVE = object()
"""An edit that deletes the key on purpose, so the schema default applies."""

EMPTY = object()
"""A field emptied while typing: not a deletion. A key of the file keeps its place and comment until a
value is typed again (or the key is removed on purpose with REMOVE)."""


@dataclass(frozen=True)
class FieldSpec:
    table: str
    name: str
    kind: str  # bool / choice / number / text / toml (dicts, lists, unions: typed as inline TOML)
    optional: bool
    choices: tuple
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}"


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
        rest = tuple(a for a in get_args(annotation) if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return annotation, False


def _kind(annotation) -> tuple[str, tuple]:
    if annotation is bool:
        return "bool", ()
    if get_origin(annotation) is Literal:
        return "choice", get_args(annotation)
    if annotation in (int, float):
        return "number", ()
    if annotation in (str, Path):
        return "text", ()
    return "toml", ()


def table_model(table: str) -> type[BaseModel]:
    return Profile.model_fields[table].annotation


def field_specs(table: str) -> list[FieldSpec]:
    specs = []
    for name, info in table_model(table).model_fields.items():
        annotation, optional = _unwrap_optional(info.annotation)
        kind, choices = _kind(annotation)
        default = info.get_default(call_default_factory=True)
        specs.append(FieldSpec(table, name, kind, optional, choices, default, info.description or ""))
    return specs


def to_toml_text(value: Any) -> str:
    """A value as one line of inline TOML, the way people write it in a profile."""
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update(value)
        return table.as_string()
    if isinstance(value, list) and any(isinstance(entry, dict) for entry in value):  # [[slider.pairs]] tables
        return "[" + ", ".join(to_toml_text(entry) for entry in value) + "]"
    return tomlkit.item(value).as_string()


def shown(value: Any, spec: FieldSpec) -> str:
    """Text for an Input showing ``value``; empty for None (TOML has no null, the key is simply absent)."""
    if value is None:
        return ""
    if spec.kind == "toml" or (spec.kind == "number" and not isinstance(value, str)):
        return to_toml_text(value)
    return str(value)


def parse(text: str, spec: FieldSpec) -> Any:
    """An Input's text as the value to store: EMPTY for no text; text that does not parse is kept as a
    string so validation reports it at the field instead of the editor refusing a keystroke."""
    text = text.strip()
    if not text:
        return EMPTY
    if spec.kind == "text":
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _plain(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


def _keys(document) -> set[tuple[str, str]]:
    return {(table, key) for table, section in document.items() if isinstance(section, dict) for key in section}


@dataclass(frozen=True)
class Snapshot:
    """What validation needs, copied on the UI thread so it can be checked in a worker thread."""

    path: Path
    data: dict
    empty: tuple[str, ...]  # "table.key" of emptied keys


class ProfileDraft:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.document = tomlkit.parse(text)
        self._saved_text = path.read_text(encoding="utf-8") if path.exists() else ""
        self._opened_keys = _keys(self.document)  # keys whose place and comment an emptied field keeps
        self.empty: set[tuple[str, str]] = set()

    @classmethod
    def open(cls, path: Path, *, start_from: Path | None = None) -> "ProfileDraft":
        """Edit ``path``; a new file starts from ``start_from`` (a profile in profiles/) or empty."""
        source = path if path.exists() else start_from
        text = source.read_text(encoding="utf-8") if source is not None else ""
        return cls(path, text)

    def value(self, table: str, key: str) -> Any:
        section = self.document.get(table)
        return _plain(section[key]) if isinstance(section, dict) and key in section else None

    def has(self, table: str, key: str) -> bool:
        section = self.document.get(table)
        return isinstance(section, dict) and key in section

    def set(self, table: str, key: str, value: Any) -> bool:
        """Store an edit; False when it changes nothing (widgets report their initial values too).

        A new value replaces the old one in place, so the key keeps its position and comment. EMPTY keeps a
        key of the file in the document (marked empty) for the value typed next; a key added in this
        session simply goes. Only REMOVE deletes a key of the file."""
        was_empty = (table, key) in self.empty
        self.empty.discard((table, key))
        if value is EMPTY and (table, key) in self._opened_keys and self.has(table, key):
            self.empty.add((table, key))
            return not was_empty
        if value is REMOVE or value is EMPTY:
            if not self.has(table, key):
                return was_empty
            del self.document[table][key]
            return True
        if self.has(table, key) and self.value(table, key) == value and type(self.value(table, key)) is type(value):
            return was_empty
        if table not in self.document:
            self.document[table] = tomlkit.table()
        self.document[table][key] = value
        return True

    def text(self) -> str:
        return tomlkit.dumps(self.document)

    @property
    def modified(self) -> bool:
        return bool(self.empty) or self.text() != self._saved_text

    def snapshot(self) -> Snapshot:
        data = self.document.unwrap()
        for table, key in self.empty:
            del data[table][key]  # checked as if absent, so an old value's problems do not linger
        return Snapshot(self.path, data, tuple(sorted(f"{t}.{k}" for t, k in self.empty)))

    def problems(self) -> list[str]:
        return find_problems(self.snapshot())

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self._saved_text.splitlines(keepends=True),
                self.text().splitlines(keepends=True),
                fromfile=f"{self.path.name} (on disk)",
                tofile=f"{self.path.name} (edited)",
            )
        )

    def save(self) -> None:
        if self.empty:
            raise ProfileError(self.path, [empty_problem(f"{t}.{k}") for t, k in sorted(self.empty)])
        text = self.text()
        atomic_write_text(self.path, text)
        self._saved_text = text
        self._opened_keys = _keys(self.document)


def empty_problem(dotted: str) -> str:
    return f"{dotted}: empty; type a value, or press ctrl+d to remove the key so the default applies"


def find_problems(snapshot: Snapshot) -> list[str]:
    """The same checks as `anima-train validate` (schema, then cross-field and file checks), and the
    emptied fields. Pure, so it runs in a worker thread."""
    data = snapshot.data
    problems = [empty_problem(dotted) for dotted in snapshot.empty]
    try:
        profile_from_dict(data, source=str(snapshot.path), base_dir=snapshot.path.resolve().parent)
    except ProfileError as exc:
        return problems + exc.problems
    except Exception as exc:  # a broken plugin must not take the editor down: schema problems, and say so
        return [*problems, *_schema_problems(data), f"plugin checks could not run: {type(exc).__name__}: {exc}"]
    return problems


def _schema_problems(data: dict) -> list[str]:
    try:
        Profile.model_validate(data)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return []


def sort_problems(problems: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Problems by field ("table.key"), by table (unknown keys, table-wide checks), and the rest."""
    fields = {spec.dotted for table in Profile.model_fields for spec in field_specs(table)}
    by_field: dict[str, list[str]] = {}
    by_table: dict[str, list[str]] = {}
    general: list[str] = []
    for problem in problems:
        where, _, message = problem.partition(":")
        parts = where.split(".")
        dotted = ".".join(parts[:2])
        if dotted in fields:
            by_field.setdefault(dotted, []).append(message.strip() if where == dotted else problem)
        elif parts[0] in Profile.model_fields:
            by_table.setdefault(parts[0], []).append(problem)
        else:
            general.append(problem)
    return by_field, by_table, general
