"""Built-in event sink: a human-readable train.log beside events.jsonl."""

from __future__ import annotations

import time
from pathlib import Path

from anima_core.atomic import open_owner_only
from anima_core.hookspecs import hookimpl

_FIELDS = ("step", "epoch", "loss", "loss_avg", "lr", "s_per_it", "eta_s", "vram_peak")


def format_event(event: dict) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("time", time.time())))
    kind = event.get("type", "?")
    if kind == "step":
        parts = [f"{k}={event[k]:.4g}" if isinstance(event[k], float) else f"{k}={event[k]}" for k in _FIELDS if event.get(k) is not None]
        body = " ".join(parts)
    elif kind == "validation":
        by_sigma = " ".join(f"σ{s}={v:.4g}" for s, v in (event.get("by_sigma") or {}).items() if isinstance(v, float))
        loss = event.get("loss")
        loss = f"{loss:.4g}" if isinstance(loss, float) else loss
        body = f"step={event.get('step')} epoch={event.get('epoch')} loss={loss} {by_sigma} images={event.get('images')}"
    else:
        body = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("v", "type", "time"))
    return f"{stamp} {kind:9s} {body}"


class LogFileSink:
    def __init__(self, path: Path):
        self._file = open_owner_only(path)

    def __call__(self, event: dict) -> None:
        self._file.write(format_event(event) + "\n")
        self._file.flush()


def make_log_file_sink(run_dir: Path, profile):
    return LogFileSink(run_dir / "train.log")


@hookimpl
def register_event_sinks(register):
    register("log_file", make_log_file_sink)
