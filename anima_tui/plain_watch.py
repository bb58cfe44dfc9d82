"""`anima-train watch --plain`: a run's events as plain lines (no escape codes), followed until the run ends.

Used when the output is not a terminal (a pipe, a file, a CI log) or when asked. One line per step and one
per other event, history first; then the file is polled until a run_end (exit 0, or 1 for a failed run) or
until the trainer process is gone without one (exit 1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from anima_core import runctl
from anima_tui.run_state import learning_rate, number, text
from anima_tui.widgets.run_stats import duration, fixed, of_total, speed

POLL_SECONDS = 0.5
FAILED = ("failed",)


def format_event(event: dict, totals: dict) -> str | None:
    """One line for an event; None for events a reader of the log does not need (e.g. progress ticks)."""
    kind = event.get("type")
    step = event.get("step")
    if kind == "run_start":
        totals.update(steps=event.get("total_steps"), epochs=event.get("total_epochs"))
        return f"run {text(event.get('run_id'), '?')} started on {text(event.get('device'), '?')}: {of_total(0, totals['steps'])} steps"
    if kind == "step":
        lr = learning_rate(event.get("lr"))
        return (f"step {of_total(step, totals.get('steps'))}  epoch {of_total(event.get('epoch'), totals.get('epochs'))}  "
                f"loss {fixed(event.get('loss'), '.4f')} (avg {fixed(event.get('loss_avg'), '.4f')})  "
                + (f"prior {fixed(event.get('prior_loss'), '.4f')}  " if number(event.get("prior_loss")) is not None else "")
                + f"lr {'–' if lr is None else f'{lr:.3e}'}  {speed(event)}  ETA {duration(event.get('eta_s'))}")
    at = f"step {step}: " if number(step) is not None else ""
    if kind == "save":
        return f"{at}saved {text(event.get('kind'), 'file')} {text(event.get('path'), '?')}"
    if kind == "sample":
        return f"{at}sample {text(event.get('path'), '?')}  {text(event.get('prompt'))}"
    if kind == "warning":
        return f"{at}warning: {text(event.get('message'), '(no message)')}"
    if kind == "log":
        return text(event.get("message")) or None
    if kind == "run_end":
        reason = text(event.get("reason"))
        return f"run ended at step {step}: {text(event.get('status'), 'ended')}" + (f" ({reason})" if reason else "")
    return None


def watch_plain(run_dir: Path, *, out: TextIO = sys.stdout, poll_seconds: float = POLL_SECONDS) -> int:
    run_dir = runctl.require_run_dir(run_dir)
    path, offset, totals = run_dir / "events.jsonl", 0, {}
    while True:
        read = runctl.read_events(path, offset)
        offset = read.offset
        for event in read.events:
            line = format_event(event, totals)
            if line is not None:
                print(line, file=out, flush=True)
            if event.get("type") == "run_end":
                return 1 if event.get("status") in FAILED else 0
        if not read.events and not runctl.pid_alive(runctl.run_info(run_dir).pid):
            print("the trainer process is gone and the run has no end event (see launch.log)", file=out, flush=True)
            return 1
        time.sleep(poll_seconds)
