"""Paths of an imported command line mean what they meant where the command ran, wherever the profile is written.

sd-scripts reads a relative path against the folder it runs in; a profile reads it against the profile's own
folder. The importer therefore rewrites relative paths: relative to the profile's folder when it writes a file
(`-o`), absolute when it prints the profile (it cannot know where that text will be saved).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

from anima_core.config.schema import Profile
from anima_core.kohya.importer import ImportResult

PATH_KEYS = {
    (table, key)
    for table, field in Profile.model_fields.items()
    for key, info in field.annotation.model_fields.items()
    if info.annotation is Path or Path in typing.get_args(info.annotation)
}


def _is_placeholder(text: str) -> bool:
    return "<" in text or ">" in text  # the guide's "<path to ...>"


def rebase_paths(result: ImportResult, ran_in: Path, profile_dir: Path | None) -> None:
    """Rewrite the relative paths of ``result`` (written for ``ran_in``) for a profile in ``profile_dir`` (None:
    printed, so absolute), and say so in the profile's notes."""
    changed = []
    for table, values in result.data.items():
        for key, value in values.items():
            if (table, key) not in PATH_KEYS or not isinstance(value, str) or _is_placeholder(value):
                continue
            if Path(value).is_absolute() or value.startswith("~"):
                continue
            target = (ran_in / value).resolve()
            rebased = str(target) if profile_dir is None else os.path.relpath(target, profile_dir.resolve())
            rebased = rebased.replace(os.sep, "/")
            if rebased != value:
                values[key] = rebased
                changed.append(f"{table}.{key}")
    if changed:
        where = "absolute, as printed" if profile_dir is None else "relative to this profile's folder"
        result.warnings.append(
            f"relative paths ({', '.join(changed)}) were relative to the folder the command ran in ({ran_in}); they are "
            f"written {where}, since a profile reads relative paths against its own folder"
        )
