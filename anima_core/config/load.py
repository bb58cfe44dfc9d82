"""Reading a profile: TOML → overrides → schema → cross-field checks, every problem reported at once."""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from anima_core.config.checks import cross_field_problems
from anima_core.config.schema import Profile
from anima_core.errors import ProfileError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``table.key=value`` → (["table", "key"], value). The value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected table.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return dotted.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return data


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (the location of an unknown key), for did-you-mean."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _suggest(loc: tuple) -> str | None:
    """The nearest valid key: first in the same table, then in any table (keys often land in the wrong one)."""
    close = difflib.get_close_matches(str(loc[-1]), _known_fields(Profile, loc), n=1)
    if close:
        return ".".join(str(p) for p in loc[:-1] + (close[0],))
    if len(loc) == 2:
        everywhere = {
            f"{table}.{key}": key
            for table, field in Profile.model_fields.items()
            for key in field.annotation.model_fields
        }
        close = difflib.get_close_matches(str(loc[-1]), list(everywhere.values()), n=1)
        if close:
            return next(dotted for dotted, key in everywhere.items() if key == close[0])
    return None


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        suggestion = _suggest(loc)
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        return f"{where}: unknown key{hint}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{where}: {error['msg']}{shown}"


def _resolve_paths(model: BaseModel, base_dir: Path) -> None:
    """Relative paths in a profile are relative to the profile file, as people expect."""
    for name, value in model:
        if isinstance(value, BaseModel):
            _resolve_paths(value, base_dir)
        elif isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, (base_dir / value.expanduser()).resolve())


def _without(data: dict, locations: list[tuple]) -> tuple[dict, dict[str, list[int]]]:
    """A copy of ``data`` with the offending keys removed, so the remaining checks can still run. A problem inside
    an entry of a list of tables (``slider.pairs.2.positive``) removes that entry (a missing key cannot be); the
    second value maps each such list's dotted path to the original index of every entry kept, in order."""
    pruned = copy.deepcopy(data)
    entries: dict[int, tuple[str, list, set[int]]] = {}  # list id -> (its dotted path, the list, entries to remove)
    for loc in locations:
        node = pruned
        for depth, part in enumerate(loc):
            if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                dotted = ".".join(str(p) for p in loc[:depth])
                entries.setdefault(id(node), (dotted, node, set()))[2].add(part)
                break
            if depth == len(loc) - 1 and isinstance(node, dict):
                node.pop(part, None)
            node = node.get(part) if isinstance(node, dict) else None
    kept = {}
    for dotted, node, indices in entries.values():
        kept[dotted] = [i for i in range(len(node)) if i not in indices]
        for index in sorted(indices, reverse=True):
            del node[index]
    return pruned, kept


def _renumbered(problem: str, kept: dict[str, list[int]]) -> str:
    """A later check's problem naming ``path.K`` of a pruned list, with K the entry's index in the profile."""
    for dotted, original in kept.items():
        problem = re.sub(rf"(?<![\w.]){re.escape(dotted)}\.(\d+)\b",
                         lambda m: f"{dotted}.{original[int(m.group(1))]}" if int(m.group(1)) < len(original)
                         else m.group(0), problem)
    return problem


def profile_from_dict(data: dict, *, source: str = "<profile>", base_dir: Path | None = None, plugins=None,
                      preflight=None) -> Profile:
    """Validate ``data``; raise one ProfileError listing every problem (schema and cross-field, then what
    ``preflight(profile, problems so far)`` returns: checks of files, device and dataset)."""
    problems: list[str] = []
    kept: dict[str, list[int]] = {}
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        pruned, kept = _without(data, [tuple(e["loc"]) for e in exc.errors()])
        try:
            profile = Profile.model_validate(pruned)
        except ValidationError:
            raise ProfileError(source, problems) from None
    if base_dir is not None:
        _resolve_paths(profile, base_dir)
    later = cross_field_problems(profile, plugins)
    if preflight is not None:
        later += preflight(profile, problems + later)
    problems += [_renumbered(p, kept) for p in later]
    if problems:
        raise ProfileError(source, problems)
    return profile


def read_profile_data(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(path, ["the profile file does not exist; check the path"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, [f"not valid TOML: {exc}"]) from None


def load_profile(path: str | Path, overrides: list[str] = (), *, preflight=None) -> Profile:
    path = Path(path)
    data = read_profile_data(path)
    try:
        apply_overrides(data, list(overrides))
    except ValueError as exc:
        raise ProfileError(path, [str(exc)]) from None
    return profile_from_dict(data, source=str(path), base_dir=path.resolve().parent, preflight=preflight)


def profile_to_dict(profile: Profile) -> dict:
    """A TOML-ready dict: paths as strings, empty values left out (TOML has no null)."""
    return profile.model_dump(mode="json", exclude_none=True)


def profile_to_toml(profile: Profile) -> str:
    return tomli_w.dumps(profile_to_dict(profile))
