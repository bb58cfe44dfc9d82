"""Widgets of the terminal UI, one per module with its stylesheet beside it."""

from pathlib import Path


def css_beside(module_file: str) -> str:
    """The .tcss file next to a widget module, used as the widget's DEFAULT_CSS."""
    return Path(module_file).with_suffix(".tcss").read_text(encoding="utf-8")
