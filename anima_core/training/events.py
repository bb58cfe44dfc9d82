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

from anima_core.atomic import make_owner_only_dirs, open_owner_only

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
    """Create ``root/runs/name`` readable by its owner only (SSH does the authentication): the run's
    folders 0700 and, through open_owner_only and the atomic writers, its files 0600, whatever the umask.
    ``root`` (output_dir) is created 0700 when it does not exist; ``runs`` (run names) is always 0700."""
    run_dir = root / "runs" / name
    make_owner_only_dirs(run_dir)
    for folder in (root / "runs", run_dir):
        os.chmod(folder, 0o700)
    for sub in ("control", "state", "samples"):
        make_owner_only_dirs(run_dir / sub)
    return run_dir


class EventLog:
    """Writes events to events.jsonl and hands each to the registered sinks."""

    def __init__(self, run_dir: Path, sinks=()):
        self.path = run_dir / "events.jsonl"
        self._file = open_owner_only(self.path)
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
