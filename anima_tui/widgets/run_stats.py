"""The monitor's numbers: loss, learning rate, speed, ETA, VRAM and RAM; an ended run's final figures.

Step and epoch are in the monitor's title line, not repeated here, so the panel fits an 80×24 terminal.
"""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from anima_tui.run_state import RunState, integer, learning_rate, number
from anima_tui.system_stats import SystemReading
from anima_tui.widgets import css_beside

GIB = 1024**3


def gib(value: object) -> str:
    amount = number(value)
    return "–" if amount is None else f"{amount / GIB:.2f}G"


def duration(seconds: object) -> str:
    value = number(seconds)
    if value is None or value < 0:
        return "–"
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def speed(step: dict) -> str:
    """it/s when fast, s/it when slow: whichever reads without leading zeros."""
    it_per_s, s_per_it = number(step.get("it_per_s")), number(step.get("s_per_it"))
    if it_per_s is None and s_per_it:
        it_per_s = 1 / s_per_it
    return rate(it_per_s)


def rate(it_per_s: float | None) -> str:
    if it_per_s is None:
        return "–"
    if it_per_s >= 1 or not it_per_s:
        return f"{it_per_s:.2f} it/s"
    return f"{1 / it_per_s:.2f} s/it"


def fixed(value: object, fmt: str) -> str:
    amount = number(value)
    return "–" if amount is None else format(amount, fmt)


def lr_text(value: object) -> str:
    shown = fixed(learning_rate(value), ".2e")
    groups = {learning_rate([v]) for v in value} if isinstance(value, list) else set()
    return f"{shown} (groups differ)" if len(groups) > 1 else shown


def of_total(value: object, total: int | None) -> str:
    current = integer(value)
    shown = "–" if current is None else str(current)
    return f"{shown}/{total}" if total is not None else shown


class RunStats(Static):
    DEFAULT_CSS = css_beside(__file__)

    def show(self, state: RunState, system: SystemReading) -> None:
        step = state.last_step
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim", no_wrap=True)
        table.add_column(no_wrap=True, overflow="ellipsis")
        table.add_row("loss", f"{fixed(step.get('loss'), '.4f')}  avg {fixed(step.get('loss_avg'), '.4f')}")
        if number(step.get("prior_loss")) is not None:  # prior preservation: the loss to the base model's prediction
            table.add_row("prior", fixed(step.get("prior_loss"), ".4f"))
        table.add_row("lr", lr_text(step.get("lr")))
        if state.status is None:
            table.add_row("speed", speed(step))
            table.add_row("ETA", duration(step.get("eta_s")))
        else:  # an ended run has no current speed or ETA: what it did, and how it ended
            mean = state.mean_step_seconds
            table.add_row("speed", f"{rate(1 / mean if mean else None)} mean")
            table.add_row("took", duration(state.elapsed))
            ended = f"{state.status}: {state.end_reason}" if state.end_reason else state.status
            table.add_row("ended", ended, style="yellow" if state.status in ("failed", "stopped") else "")
        processes = step.get("processes") if isinstance(step.get("processes"), list) else []
        if len(processes) > 1:  # one line per process (its GPU) of a multi-process run
            for rank, p in enumerate(processes):
                p = p if isinstance(p, dict) else {}
                table.add_row(f"VRAM {rank}", f"{gib(p.get('vram_allocated'))} alloc {gib(p.get('vram_peak'))} peak")
        else:
            table.add_row("VRAM", f"{gib(step.get('vram_allocated'))} alloc {gib(step.get('vram_reserved'))} res")
        table.add_row("peak", f"{gib(step.get('vram_peak'))}  process RAM {gib(step.get('ram_used'))}")
        for index, gpu in enumerate(system.gpus):
            util = "–" if gpu.utilisation is None else f"{gpu.utilisation}%"
            table.add_row(f"GPU{index}", f"{gib(gpu.used)}/{gib(gpu.total)} {util}")
        if system.ram_total:
            table.add_row("RAM", f"{gib(system.ram_used)}/{gib(system.ram_total)}")
        if state.bad_lines:
            table.add_row("skipped", f"{state.bad_lines} bad event line(s)", style="yellow")
        self.update(table)
