"""The run directory and its versioned, append-only events.jsonl.

events.jsonl is appended line by line (each line one JSON object with "v", "type", "time"); a reader
skips a torn last line, so a killed run never leaves an unreadable file. Important events are fsynced.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

EVENTS_VERSION = 1
DURABLE_TYPES = {"run_start", "save", "run_end", "warning"}


def _clean(value):
    """JSON has no NaN or infinity; write them as strings a reader can still show."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def make_run_dir(root: Path, name: str) -> Path:
    """Create ``root/runs/name`` readable by its owner only (SSH does the authentication)."""
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run_dir, 0o700)
    for sub in ("control", "state", "samples"):
        (run_dir / sub).mkdir(exist_ok=True, mode=0o700)
    return run_dir


class EventLog:
    """Writes events to events.jsonl and hands each to the registered sinks."""

    def __init__(self, run_dir: Path, sinks=()):
        self.path = run_dir / "events.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._sinks = list(sinks)

    def emit(self, type_: str, **fields) -> dict:
        event = {"v": EVENTS_VERSION, "type": type_, "time": round(time.time(), 3), **_clean(fields)}
        self._file.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._file.flush()
        if type_ in DURABLE_TYPES:
            os.fsync(self._file.fileno())
        for sink in self._sinks:
            sink(event)
        return event

    def close(self) -> None:
        self._file.close()
