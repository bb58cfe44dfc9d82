"""Helpers for the TUI tests: the screen as plain text, as a person would read it in the terminal."""

from __future__ import annotations

import io

from rich.console import Console


def screen_text(app) -> str:
    """What the terminal shows now (the top screen over the ones below), one line per row, colours dropped."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()
