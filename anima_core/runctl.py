"""Run control shared by the TUI and the CLI: detached launch, the runs list, control files, event reading.

Everything goes through the run directory's files (docs/ARCHITECTURE.md, "Run directory and events"); there
are no sockets, so SSH stays the only way in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from anima_core.atomic import atomic_write_text, make_owner_only_dirs, open_owner_only
from anima_core.errors import AnimaError

CONTROL_ACTIONS = ("save", "stop")
LAUNCH_RECORD = "launch.json"
LAUNCH_LOG = "launch.log"
_TAIL_BYTES = 64 * 1024


class RunDirError(AnimaError):
    """A path given as a run directory is not one."""


class EventRead(NamedTuple):
    events: list[dict]
    offset: int
    bad_lines: int


def read_events(path: str | Path, from_offset: int = 0) -> EventRead:
    """Complete event lines after ``from_offset``; a torn last line is left for the next call.

    Lines that are not JSON objects with a string ``type`` are skipped and counted, never raised: the file
    may be written by a newer trainer or damaged by a full disk, and a viewer must keep going.
    A file shorter than ``from_offset`` was replaced, so reading starts again from its beginning.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return EventRead([], from_offset, 0)
    if size < from_offset:
        from_offset = 0
    with open(path, "rb") as handle:
        handle.seek(from_offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1
    events, bad = parse_event_lines(chunk[:end])
    return EventRead(events, from_offset + end, bad)


def parse_event_lines(data: bytes) -> tuple[list[dict], int]:
    """(events, number of bad lines) of complete JSONL text; blank lines are neither."""
    events, bad = [], 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            events.append(event)
        else:
            bad += 1
    return events, bad


def pid_alive(pid: object) -> bool:
    """True while a process with this id exists and is not a zombie (an exited child nobody reaped yet)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass
class RunInfo:
    run_dir: Path
    run_id: str
    status: str  # starting / running / finished / failed / stopped / died
    step: int | None = None
    total_steps: int | None = None
    started: float | None = None
    updated: float | None = None
    pid: int | None = None
    reason: str | None = None


def _first_and_last_events(path: Path) -> tuple[dict | None, list[dict]]:
    """run_start (the first line) and the events in the file's last 64 KiB, without reading a long history."""
    try:
        with open(path, "rb") as handle:
            head = handle.readline()
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except OSError:
        return None, []
    first, _ = parse_event_lines(head)
    start = first[0] if first and first[0].get("type") == "run_start" else None
    if size > _TAIL_BYTES:
        tail = tail[tail.find(b"\n") + 1:]
    return start, parse_event_lines(tail)[0]


def _launch_record(run_dir: Path) -> dict:
    try:
        record = json.loads((run_dir / LAUNCH_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_info(run_dir: str | Path) -> RunInfo:
    """Status of one run: its run_end event decides; without one, a live trainer process means running."""
    run_dir = Path(run_dir)
    start, recent = _first_and_last_events(run_dir / "events.jsonl")
    launch = _launch_record(run_dir)
    info = RunInfo(run_dir=run_dir, run_id=run_dir.name, status="died")
    if start is not None:
        info.run_id = str(start.get("run_id") or run_dir.name)
        info.total_steps = _as_int(start.get("total_steps"))
        info.started = start.get("time") if isinstance(start.get("time"), (int, float)) else None
        info.pid = _as_int(start.get("pid"))
    if info.pid is None:
        info.pid = _as_int(launch.get("pid"))
    if info.started is None and isinstance(launch.get("time"), (int, float)):
        info.started = launch["time"]
    for event in recent:
        if isinstance(event.get("time"), (int, float)):
            info.updated = event["time"]
        if _as_int(event.get("step")) is not None:
            info.step = event["step"]
    end = next((e for e in reversed(recent) if e["type"] == "run_end"), None)
    if end is not None:
        info.status = str(end.get("status") or "finished")
        info.reason = end.get("reason") if isinstance(end.get("reason"), str) else None
    elif pid_alive(info.pid):
        info.status = "running" if start is not None else "starting"
    return info


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("events.jsonl", LAUNCH_RECORD))


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise RunDirError(
            f"{path} is not a run directory (it has no events.jsonl); give a folder under <output_dir>/runs/, "
            "as listed by `anima-train tui`."
        )
    return path


def list_runs(root: str | Path) -> list[RunInfo]:
    """Runs under ``root`` (an output_dir, its ``runs`` folder, or a folder of either), newest first."""
    root = Path(root)
    folder = root / "runs" if (root / "runs").is_dir() else root
    try:
        candidates = [p for p in folder.iterdir() if is_run_dir(p)]
    except OSError:
        return []
    runs = [run_info(p) for p in candidates]
    return sorted(runs, key=lambda r: (r.started or r.updated or 0, r.run_dir.name), reverse=True)


def request(run_dir: str | Path, action: str) -> Path:
    """Ask the trainer of ``run_dir`` to ``save`` now or ``stop`` (save, then exit) by creating control/<action>.

    The file appears whole (written aside, then renamed) so the trainer never reads half a request.
    """
    if action not in CONTROL_ACTIONS:
        raise ValueError(f"unknown control action {action!r}; use one of {', '.join(CONTROL_ACTIONS)}")
    run_dir = require_run_dir(run_dir)
    control = make_owner_only_dirs(run_dir / "control")
    target = control / action
    atomic_write_text(target, json.dumps({"requested": round(time.time(), 3), "pid": os.getpid()}) + "\n")
    return target


@dataclass
class Launch:
    pid: int
    run_dir: Path
    log_path: Path
    process: subprocess.Popen


def trainer_command() -> list[str]:
    """The `anima-train` of this Python environment, so a launch uses the same install as the TUI."""
    script = Path(sys.executable).parent / "anima-train"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from anima_core.cli import main; sys.exit(main())"]


def new_run_name(output_name: str, runs_dir: Path) -> str:
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{output_name}"
    name, n = stem, 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def launch_detached(
    profile_path: str | Path,
    *,
    extra_args: tuple[str, ...] | list[str] = (),
    run_name: str | None = None,
    command: list[str] | None = None,
) -> Launch:
    """Start `anima-train run PROFILE` in its own session, so closing the terminal or SSH does not stop it.

    The run directory is chosen here and passed as ``logging.run_name``, so the caller can watch it at
    once; the process's output goes to ``launch.log`` inside it (a profile the trainer refuses ends up
    there, and the run shows as died). ``command`` replaces the trainer executable.
    """
    profile_path = Path(profile_path).resolve()
    output_dir, output_name, named = _run_location(profile_path, _overrides(extra_args))
    runs_dir = output_dir / "runs"
    run_name = run_name or named or new_run_name(output_name, runs_dir)
    run_dir = runs_dir / run_name
    make_owner_only_dirs(run_dir)  # the trainer's make_run_dir then finds it (and runs/) owner-only
    for folder in (runs_dir, run_dir):
        os.chmod(folder, 0o700)
    argv = [*(command or trainer_command()), "run", str(profile_path), *extra_args,
            "--set", f'logging.run_name="{run_name}"']
    log_path = run_dir / LAUNCH_LOG
    with open_owner_only(log_path, binary=True) as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=profile_path.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    atomic_write_text(
        run_dir / LAUNCH_RECORD,
        json.dumps({"pid": process.pid, "argv": argv, "profile": str(profile_path), "time": round(time.time(), 3)}),
    )
    # Reap the child when it exits, so a TUI left open never shows a finished trainer as a live zombie.
    threading.Thread(target=process.wait, daemon=True).start()
    return Launch(pid=process.pid, run_dir=run_dir, log_path=log_path, process=process)


def _run_location(profile_path: Path, overrides: list[str]) -> tuple[Path, str, str | None]:
    """(output_dir, output_name, run_name) as the trainer will resolve them, reading only those tables,
    so a launch never waits on the model and dataset checks the trainer repeats anyway."""
    from anima_core.config.load import apply_overrides, read_profile_data
    from anima_core.config.schema import LoggingTable, SavingTable
    from anima_core.errors import ProfileError

    try:
        data = apply_overrides(read_profile_data(profile_path), overrides)
        saving = SavingTable.model_validate(data.get("saving", {}))
        logging = LoggingTable.model_validate(data.get("logging", {}))
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ProfileError(profile_path, [str(exc)]) from None
    output_dir = saving.output_dir.expanduser()
    if not output_dir.is_absolute():
        output_dir = profile_path.parent / output_dir
    return output_dir, saving.output_name, logging.run_name


def _overrides(extra_args) -> list[str]:
    """The ``key=value`` of each ``--set key=value`` (or ``--set=key=value``) among extra CLI arguments."""
    args, found = list(extra_args), []
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--set="):
            found.append(arg.removeprefix("--set="))
    return found
