"""What the monitor knows about a run, folded from its events; tolerant of missing, wrong or non-finite fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from anima_tui.preview_index import Preview, PreviewIndex

EMA_WEIGHT = 0.9  # TensorBoard's default smoothing: readable trend without hiding a divergence for long


def number(value: object) -> float | None:
    """A finite float, or None for anything else (missing, strings like "nan", booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def learning_rate(value: object) -> float | None:
    """The trainer writes one lr per parameter group (a list) or a single number; the first group leads."""
    if isinstance(value, list):
        return number(value[0]) if value else None
    return number(value)


def integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


@dataclass
class Note:
    """One line of the saves / samples / warnings list."""

    kind: str
    step: int | None
    message: str


@dataclass
class RunState:
    run_id: str = ""
    device: str = ""
    total_steps: int | None = None
    total_epochs: int | None = None
    pid: int | None = None
    started: float | None = None  # the time of the latest run_start (a resume starts again)
    last_step: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # the latest `cache` event: scan / cache checks / encoding progress
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    prior_losses: list[float | None] = field(default_factory=list)  # one per plotted step; None: no prior samples
    lrs: list[float] = field(default_factory=list)
    validation_steps: list[int] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    previews: PreviewIndex = field(default_factory=PreviewIndex)
    end: dict | None = None
    events_seen: int = 0
    bad_lines: int = 0
    _ema: float | None = None
    _step_seconds: list[float] = field(default_factory=list)  # s/it of each step since the latest start

    def add(self, events: list[dict], bad_lines: int = 0) -> None:
        self.bad_lines += bad_lines
        for event in events:
            self.events_seen += 1
            handler = getattr(self, f"_on_{event.get('type')}", None)
            if handler is not None:
                handler(event)

    def _on_run_start(self, event: dict) -> None:
        self.run_id = text(event.get("run_id"), self.run_id)
        self.device = text(event.get("device"), self.device)
        self.total_steps = integer(event.get("total_steps"))
        self.total_epochs = integer(event.get("total_epochs"))
        self.pid = integer(event.get("pid"))
        self.started = number(event.get("time"))
        self._step_seconds = []
        self.end = None  # a resumed run appends a new start after an old end

    def _on_step(self, event: dict) -> None:
        self.last_step = event
        loss = number(event.get("loss"))
        step = integer(event.get("step"))
        if loss is not None:
            self.steps.append(step if step is not None else len(self.steps))
            self.losses.append(loss)
            # Starting from the first loss (not 0) keeps the early points unbiased.
            self._ema = loss if self._ema is None else EMA_WEIGHT * self._ema + (1 - EMA_WEIGHT) * loss
            self.smoothed.append(self._ema)
            self.prior_losses.append(number(event.get("prior_loss")))
        lr = learning_rate(event.get("lr"))
        if lr is not None:
            self.lrs.append(lr)
        s_per_it, it_per_s = number(event.get("s_per_it")), number(event.get("it_per_s"))
        if s_per_it is None and it_per_s:
            s_per_it = 1 / it_per_s
        if s_per_it is not None:
            self._step_seconds.append(s_per_it)

    def _on_cache(self, event: dict) -> None:
        self.cache = event

    @property
    def cache_progress(self) -> str:
        """The data phase in progress ('latents 1200/20000 · 85.3/s · ETA 3m40s'), '' once training steps arrive."""
        event = self.cache
        if not event or self.last_step:
            return ""
        line = f"{text(event.get('phase'), 'caching')} {integer(event.get('done'))}/{integer(event.get('total'))}"
        reused = integer(event.get("reused"))
        if reused:
            line += f" ({reused} reused)"
        rate, eta = number(event.get("rate")), number(event.get("eta_s"))
        if rate is not None:
            line += f" · {rate:.1f}/s"
        if eta is not None and not event.get("finished"):
            line += f" · ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        return line

    def _on_validation(self, event: dict) -> None:
        loss, step = number(event.get("loss")), integer(event.get("step"))
        if loss is not None and step is not None:
            self.validation_steps.append(step)
            self.validation_losses.append(loss)

    def validation_curve(self) -> list[float | None]:
        """Validation loss on the training-loss axis (one value per plotted step): linear between evaluations,
        the latest one held after it, nothing before the first."""
        curve: list[float | None] = []
        points = list(zip(self.validation_steps, self.validation_losses))
        for step in self.steps:
            before = [(s, v) for s, v in points if s <= step]
            after = [(s, v) for s, v in points if s > step]
            if not before:
                curve.append(None)
            elif not after:
                curve.append(before[-1][1])
            else:
                (s0, v0), (s1, v1) = before[-1], after[0]
                curve.append(v0 + (v1 - v0) * (step - s0) / (s1 - s0))
        return curve

    def _on_save(self, event: dict) -> None:
        kind = text(event.get("kind"), "save")
        self.notes.append(Note("save", integer(event.get("step")), f"{kind}: {_file_name(event.get('path'))}"))

    def _on_sample(self, event: dict) -> None:
        prompt = text(event.get("prompt"))
        self.notes.append(Note("sample", integer(event.get("step")), f"{_file_name(event.get('path'))}  {prompt}"))
        if isinstance(event.get("path"), str):
            self.previews.add(Preview(event["path"], prompt, integer(event.get("step")), integer(event.get("epoch"))))

    def _on_warning(self, event: dict) -> None:
        self.notes.append(Note("warning", integer(event.get("step")), text(event.get("message"), "(no message)")))

    def _on_run_end(self, event: dict) -> None:
        self.end = event

    @property
    def mean_step_seconds(self) -> float | None:
        """Mean seconds per step since the latest start: the figure a finished run is remembered by."""
        return sum(self._step_seconds) / len(self._step_seconds) if self._step_seconds else None

    @property
    def elapsed(self) -> float | None:
        """Seconds from the latest run_start to run_end (loading included), once the run has ended."""
        end = number(self.end.get("time")) if self.end is not None else None
        return end - self.started if end is not None and self.started is not None else None

    @property
    def end_reason(self) -> str:
        return text(self.end.get("reason")) if self.end is not None else ""

    @property
    def status(self) -> str | None:
        """The run's final status, or None while no run_end was seen."""
        return text(self.end.get("status"), "ended") if self.end is not None else None


def _file_name(path: object) -> str:
    return text(path, "?").replace("\\", "/").rsplit("/", 1)[-1]
