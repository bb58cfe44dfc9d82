"""Splitting a pasted sd-scripts command line into the script's arguments.

People paste what they ran: `accelerate launch [options] anima_train_network.py ...` or `python ... .py ...`,
over several lines joined with `\\` (POSIX shells), `^` (Windows cmd) or a backtick (PowerShell), with `#`
comment lines in between. Windows lines keep their backslashes (they are path separators there).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

CONTINUATIONS = ("\\", "^", "`")
WINDOWS_PATH = re.compile(r"(^|[\s=\"'])[A-Za-z]:\\")


@dataclass
class SplitCommand:
    launcher: list[str] = field(default_factory=list)  # tokens before the script (accelerate launch, python ...)
    script: str | None = None
    args: list[str] = field(default_factory=list)
    text: str = ""  # the command as one line, for the profile's header


def _logical_line(text: str) -> tuple[str, bool]:
    """Join continued lines and drop comment lines; also say whether the text is Windows-style."""
    parts: list[str] = []
    windows = bool(WINDOWS_PATH.search(text))
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#") or line.lstrip().upper().startswith("REM "):
            continue
        if line.endswith(CONTINUATIONS):
            windows = windows or line[-1] in "^`"
            line = line[:-1]
        parts.append(line.strip())
    return " ".join(parts), windows


def _split_windows(line: str) -> list[str]:
    """cmd / PowerShell rules as far as they matter here: quotes group and vanish, backslashes stay."""
    tokens: list[str] = []
    current: list[str] = []
    quote: str | None = None
    started = False
    for char in line:
        if quote:
            if char == quote:
                quote = None
            else:
                current.append(char)
        elif char in "\"'":
            quote, started = char, True
        elif char.isspace():
            if started or current:
                tokens.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
    if quote:
        raise ValueError(f"unbalanced {quote} quote in the command line")
    if started or current:
        tokens.append("".join(current))
    return tokens


def _split_posix(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"  # a `#` starting a word begins a trailing comment
    return list(lexer)


def split_command_line(text: str) -> SplitCommand:
    line, windows = _logical_line(text)
    tokens = _split_windows(line) if windows else _split_posix(line)
    for index, token in enumerate(tokens):
        if token.lower().endswith(".py") and not token.startswith("-"):
            return SplitCommand(tokens[:index], token, tokens[index + 1 :], line)
    if tokens and tokens[0].startswith("--"):
        return SplitCommand([], None, tokens, line)  # only the script's arguments were pasted
    raise ValueError(
        "no training script found in the command line: expected `... anima_train_network.py --flag ...` "
        "or just the `--flag ...` arguments"
    )
