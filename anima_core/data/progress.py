"""Progress of the long data phases (scan, cache checks, encoding): counts, rate and ETA.

A phase reports when it starts, at most once a `interval_s` while it runs, and when it ends, so a phase
longer than a second is never silent and a short one costs two reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class PhaseProgress:
    phase: str  # "scan", "count tokens", "check latents", "latents", "check text", "text"
    done: int  # items finished, reused ones included
    total: int
    reused: int  # items whose existing cache was kept (counted in `done`)
    elapsed_s: float
    finished: bool = False
    new_by_process: list[int] | None = None  # in-memory caching divided among processes: who encoded how many

    @property
    def new(self) -> int:
        return self.done - self.reused

    @property
    def rate(self) -> float:
        """Items per second over the phase so far."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.finished:
            return 0.0
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def fields(self) -> dict:
        """The fields of a `cache` event."""
        values = asdict(self)
        if values["new_by_process"] is None:
            del values["new_by_process"]
        values.update(new=self.new, rate=round(self.rate, 2), eta_s=None if self.eta_s is None else round(self.eta_s, 1))
        values["elapsed_s"] = round(self.elapsed_s, 2)
        return values

    def describe(self) -> str:
        text = f"{self.phase}: {self.done}/{self.total}"
        if self.reused:
            text += f" ({self.reused} reused, {self.new} new)"
        text += f" | {self.rate:.1f}/s"
        if self.finished:
            text += f" | done in {self.elapsed_s:.1f}s"
        elif self.eta_s is not None:
            text += f" | ETA {int(self.eta_s // 60)}m{int(self.eta_s % 60):02d}s"
        return text


ProgressSink = Callable[[PhaseProgress], None]


class PhaseReporter:
    """Counts one phase and calls the sink at its start, every `interval_s` and at its end."""

    def __init__(self, sink: ProgressSink | None, phase: str, total: int, *, reused: int = 0, interval_s: float = 1.0,
                 world: int = 1):
        """`world` > 1: the phase is divided among that many processes, counted in `by_process`."""
        self.sink = sink
        self.world = world
        self.by_process: list[int] | None = [0] * world if world > 1 else None
        self.phase = phase
        self.total = total
        self.done = self.reused = reused
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last = self.started
        self._report(False)

    def _report(self, finished: bool) -> None:
        if self.sink is not None:
            elapsed = time.monotonic() - self.started
            by_process = None if self.by_process is None else list(self.by_process)
            self.sink(PhaseProgress(self.phase, self.done, self.total, self.reused, elapsed, finished, by_process))

    def advance(self, n: int = 1, *, reused: int = 0) -> None:
        self.done += n
        self.reused += reused
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._report(False)

    def finish(self) -> None:
        self._report(True)
