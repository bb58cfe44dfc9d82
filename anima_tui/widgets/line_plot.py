"""A braille line plot drawn from lists of floats; non-finite values are skipped, never raised on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from anima_tui.widgets import css_beside

# Braille dot bits by [row][column] inside one 2×4 cell.
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
LABEL_WIDTH = 8


@dataclass
class Series:
    values: list[float]
    style: str
    band: bool = False  # draw each column's min..max span (raw, noisy data) instead of its mean


def _columns(values: list[float], width: int, band: bool) -> list[tuple[float, float] | None]:
    """Downsample to ``width`` columns: (low, high) per column, or None where a column has no value."""
    finite = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]
    n = len(finite)
    columns: list[tuple[float, float] | None] = [None] * width
    if n == 0 or width <= 0:
        return columns
    if n <= width:
        # Fewer points than columns: interpolate, so a young run shows a line rather than scattered dots.
        for x in range(width):
            position = x * (n - 1) / max(width - 1, 1)
            left, right = finite[int(position)], finite[min(int(position) + 1, n - 1)]
            if left is not None and right is not None:
                value = left + (right - left) * (position - int(position))
                columns[x] = (value, value)
        return columns
    for x in range(width):
        bucket = [v for v in finite[x * n // width:(x + 1) * n // width] if v is not None]
        if bucket:
            columns[x] = (min(bucket), max(bucket)) if band else (sum(bucket) / len(bucket),) * 2
    return columns


NEAR_FLAT = 0.01  # a line whose whole range is under 1% of its value is drawn zoomed, and the title says so


def _tick(value: float, digits: int) -> str:
    return f"{value:.{digits}g}".replace("e-0", "e-").replace("e+0", "e+")


def tick_labels(high: float, low: float) -> tuple[str, str]:
    """Labels for the top and bottom of the axis, with as many digits as it takes for them to differ."""
    for digits in range(3, 9):
        top, bottom = _tick(high, digits), _tick(low, digits)
        if top != bottom:
            break
    return top, bottom


def zoom_note(high: float, low: float) -> str:
    """Said in the title when the plot stretches a nearly flat line over its whole height."""
    magnitude = max(abs(high), abs(low))
    if not magnitude or (high - low) / magnitude >= NEAR_FLAT:
        return ""
    return f" · zoomed: range {100 * (high - low) / magnitude:.2g}% of value"


class LinePlot(Widget):
    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, title: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.series: list[Series] = []

    def plot(self, series: list[Series]) -> None:
        self.series = series
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        out = Text(self.title, style="bold", no_wrap=True, overflow="crop")
        finite = [v for s in self.series for v in s.values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not finite:
            return out.append("\n" + "(no data yet)".center(width), style="dim")
        low, high = min(finite), max(finite)
        if high - low < 1e-12 * max(1.0, abs(high)):
            low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)
        top_label, bottom_label = tick_labels(high, low)
        label_width = max(LABEL_WIDTH, len(top_label) + 1, len(bottom_label) + 1)
        out.append(zoom_note(high, low), style="yellow")
        plot_w, plot_h = width - label_width, height - 1
        if plot_w < 2 or plot_h < 1:
            return out
        columns = [_columns(s.values, plot_w * 2, s.band) for s in self.series]
        dots_h = plot_h * 4
        cells = [[0] * plot_w for _ in range(plot_h)]
        styles: list[list[str | None]] = [[None] * plot_w for _ in range(plot_h)]
        for series, cols in zip(self.series, columns):
            for x, col in enumerate(cols):
                if col is None:
                    continue
                top = round((high - col[1]) / (high - low) * (dots_h - 1))
                bottom = round((high - col[0]) / (high - low) * (dots_h - 1))
                for y in range(top, bottom + 1):
                    cells[y // 4][x // 2] |= _DOTS[y % 4][x % 2]
                    styles[y // 4][x // 2] = series.style
        labels = {0: top_label, plot_h - 1: bottom_label}
        for row in range(plot_h):
            out.append("\n" + labels.get(row, "").rjust(label_width - 1) + "┤", style="dim")
            for x in range(plot_w):
                bits = cells[row][x]
                out.append(chr(0x2800 + bits) if bits else " ", style=styles[row][x] or "")
        return out
