"""What a person watching the run sees: a rich progress line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text


def format_rate(s_per_it: float) -> str:
    if s_per_it <= 0:
        return "-"
    return f"{1 / s_per_it:.2f} it/s" if s_per_it < 1 else f"{s_per_it:.2f} s/it"


def format_gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def step_summary(event: dict) -> str:
    lr = event["lr"][0] if isinstance(event["lr"], list) else event["lr"]
    parts = [f"loss {event['loss']:.4f}", f"avg {event['loss_avg']:.4f}", f"lr {lr:.2e}", format_rate(event["s_per_it"])]
    if event.get("vram_peak") is not None:
        parts.append(f"VRAM {format_gib(event['vram_allocated'])} (peak {format_gib(event['vram_peak'])})")
    return " | ".join(parts)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressDisplay:
    """A live bar (step N/total, epoch, loss, lr, rate, ETA) on a terminal; every ``every`` steps a plain line
    otherwise. Messages are printed as text, never as markup (they name keys in brackets)."""

    def __init__(self, mode: str, total_steps: int, every: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        interactive = mode == "rich" or (mode == "auto" and sys.stderr.isatty())
        self.every = every
        self._total = total_steps
        self._progress = None
        if interactive:
            self._progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[summary]}", markup=False), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, summary="")

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, steps: int) -> None:
        """Known once the dataset is scanned, after the display exists."""
        self._total = steps
        if self._progress:
            self._progress.update(self._task, total=steps)

    def __enter__(self):
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.stop()

    def step(self, event: dict) -> None:
        line = f"epoch {event['epoch']} | {step_summary(event)} | ETA {format_eta(event.get('eta_s'))}"
        if self._progress:
            self._progress.update(self._task, completed=event["step"], summary=line)
        elif event["step"] % self.every == 0 or event["step"] == self.total:
            self.console.print(f"step {event['step']}/{self.total} {line}", markup=False, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.console.print(Text("warning: ", style="yellow") + Text(text), highlight=False, soft_wrap=True)
