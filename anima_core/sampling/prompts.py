"""sd-scripts preview prompt files: `.txt` lines with ` --` options, `.toml` (`[prompt]` + `[[prompt.subset]]`)
or `.json` (a list of objects or lines).

A broken line or entry never raises: it becomes a warning naming the file and where in it, and the rest of
the file still renders. Only an unreadable file or an unknown extension raises PromptFileError.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from anima_core.errors import AnimaError

SIZE_MULTIPLE = 16
MIN_SIZE = 64
MAX_STEPS = 1000

# ` --<name> <value>` options of a `.txt` line and the prompt key each one sets.
LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "sample_steps",
                "l": "scale", "fs": "flow_shift"}  # fmt: skip


class PromptFileError(AnimaError):
    """The preview prompt file is missing, unreadable or not one of the three formats."""


@dataclass(frozen=True)
class SamplePrompt:
    """One preview: defaults are sd-scripts' Anima preview defaults (spec §6)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    sample_steps: int = 30
    scale: float = 7.5
    flow_shift: float = 3.0
    index: int = 0  # position in the file; names the image (`_NN_`)

    def normalized(self) -> SamplePrompt:
        """Sizes rounded down to multiples of 16 (at least 64), steps within 1..1000."""
        return replace(
            self,
            width=round_size(self.width),
            height=round_size(self.height),
            sample_steps=max(1, min(MAX_STEPS, self.sample_steps)),
        )

    def seed_or(self, fallback: int) -> int:
        """The prompt's seed, else ``fallback + index`` so every unseeded prompt is still repeatable."""
        return self.seed if self.seed is not None else fallback + self.index


KEY_TYPES = {f.name: f.type for f in fields(SamplePrompt) if f.name != "index"}


def round_size(value: int) -> int:
    return max(MIN_SIZE, int(value) // SIZE_MULTIPLE * SIZE_MULTIPLE)


@dataclass
class PromptFile:
    prompts: list[SamplePrompt] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _convert(key: str, value, where: str) -> object:
    """The value of one prompt key in its proper type; ValueError names the key and what was found."""
    kind = KEY_TYPES[key]
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool):
            raise TypeError
        if kind in ("int", "int | None"):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        expected = "text" if kind == "str" else "a number"
        raise ValueError(f"{where}: `{key}` must be {expected}, got {value!r}") from None


def parse_prompt_line(line: str, *, index: int = 0, where: str = "prompt") -> tuple[SamplePrompt, list[str]]:
    """One `.txt` line: the prompt text, then ` --n <negative> --w 768 --h 512 --d 42 --s 30 --l 5 --fs 3`.

    An unknown option or a bad value is reported and left at its default; the prompt still renders.
    """
    text, *options = line.strip().split(" --")
    values: dict[str, object] = {}
    warnings = []
    for option in options:
        match = re.fullmatch(r"(\w+)\s+(.*)", option.strip(), re.DOTALL)
        name = match.group(1).lower() if match else option.strip()
        if not match or name not in LINE_OPTIONS:
            warnings.append(
                f"{where}: option --{option.strip()} ignored (Anima previews use --n --w --h --d --s --l --fs, "
                "each followed by a value)"
            )
            continue
        key = LINE_OPTIONS[name]
        raw = match.group(2).strip()
        try:
            values[key] = raw if key == "negative_prompt" else _convert(key, _number(raw), where)
        except ValueError as exc:
            warnings.append(f"{exc}; the default is used")
    return SamplePrompt(prompt=text.strip(), index=index, **values).normalized(), warnings


def _number(raw: str) -> float | int | str:
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


def _from_mapping(entry, *, index: int, where: str) -> tuple[SamplePrompt | None, list[str]]:
    """A `.toml` subset or `.json` object; a line string in a `.json` list is parsed like a `.txt` line."""
    if isinstance(entry, str):
        return parse_prompt_line(entry, index=index, where=where)
    if not isinstance(entry, dict):
        return None, [f"{where}: expected an object with a `prompt` key, got {type(entry).__name__}; skipped"]
    if not isinstance(entry.get("prompt"), str):
        return None, [f"{where}: no `prompt` text; skipped"]
    values, warnings = {}, []
    for key, value in entry.items():
        if key not in KEY_TYPES:
            warnings.append(f"{where}: key `{key}` ignored (known keys: {', '.join(KEY_TYPES)})")
            continue
        try:
            values[key] = _convert(key, value, where)
        except ValueError as exc:
            warnings.append(f"{exc}; the default is used")
    return SamplePrompt(index=index, **values).normalized(), warnings


def _read_txt(path: Path, text: str, result: PromptFile) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, warnings = parse_prompt_line(line, index=len(result.prompts), where=f"{path}:{number}")
        result.prompts.append(prompt)
        result.warnings.extend(warnings)


def _add_entries(entries, path: Path, label: str, result: PromptFile, defaults: dict | None = None) -> None:
    for number, entry in enumerate(entries):
        if defaults is not None and isinstance(entry, dict):
            entry = {**defaults, **entry}
        prompt, warnings = _from_mapping(entry, index=len(result.prompts), where=f"{path}: {label}[{number}]")
        result.warnings.extend(warnings)
        if prompt is not None:
            result.prompts.append(prompt)


def _read_toml(path: Path, text: str, result: PromptFile) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        result.warnings.append(f"{path}: not valid TOML ({exc}); no previews from this file")
        return
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        result.warnings.append(f"{path}: expected a [prompt] table with [[prompt.subset]] entries; no previews")
        return
    defaults = {k: v for k, v in table.items() if k != "subset"}
    _add_entries(table["subset"], path, "prompt.subset", result, defaults)


def _read_json(path: Path, text: str, result: PromptFile) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        result.warnings.append(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); no previews from this file")
        return
    if not isinstance(data, list):
        result.warnings.append(f"{path}: expected a JSON list of prompt objects; no previews from this file")
        return
    _add_entries(data, path, "item", result)


READERS = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}


def load_prompt_file(path: str | Path) -> PromptFile:
    """Every prompt the file holds, plus one warning per broken line, option or entry."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(
            f"{path}: preview prompts must be a .txt, .toml or .json file (sd-scripts formats). Rename or convert it."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(
            f"{path}: the preview prompt file cannot be read ({exc}). Check sampling.sample_prompts."
        ) from exc
    result = PromptFile()
    reader(path, text, result)
    return result
