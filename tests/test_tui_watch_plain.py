"""`anima-train watch --plain` (and watch into a pipe): plain lines, a run followed until it ends."""

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_tui_snapshots import STEPS, recorded_run

from anima_tui.plain_watch import watch_plain


def append(path, *events):
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(e) + "\n" for e in events))


def test_an_ended_run_prints_its_history_and_returns(tmp_path):
    out = io.StringIO()
    assert watch_plain(recorded_run(tmp_path), out=out, poll_seconds=0.01) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "run 20261201-090000-snap started on cuda:0: 0/10000 steps"
    steps = [line for line in lines if line.startswith("step ") and "  epoch " in line]
    assert len(steps) == STEPS
    assert steps[-1].startswith("step 5000/10000  epoch 11/20  loss ") and "1.72 it/s  ETA 48m20s" in steps[-1]
    assert "step 4000: saved lora out/snap-004000.safetensors" in lines
    assert "step 4001: warning: bucket 512x768 has one image" in lines
    assert lines[-1] == "run ended at step 5000: stopped (asked)"
    assert "\x1b" not in out.getvalue()


def test_a_live_run_is_followed_until_its_end(tmp_path):
    run = tmp_path / "runs" / "live"
    run.mkdir(parents=True)
    events = run / "events.jsonl"
    append(events, {"v": 1, "type": "run_start", "run_id": "live", "total_steps": 3, "pid": os.getpid(), "time": 0.0})

    def trainer():
        for n in (1, 2, 3):
            time.sleep(0.1)
            append(events, {"v": 1, "type": "step", "step": n, "loss": 0.5, "time": float(n)})
        append(events, {"v": 1, "type": "run_end", "status": "failed", "reason": "boom", "step": 3, "time": 4.0})

    writer = threading.Thread(target=trainer)
    writer.start()
    out = io.StringIO()
    try:
        assert watch_plain(run, out=out, poll_seconds=0.02) == 1  # a failed run fails the command
    finally:
        writer.join()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines[1:4]] == ["step 1/3", "step 2/3", "step 3/3"]
    assert lines[-1] == "run ended at step 3: failed (boom)"


def test_a_run_whose_trainer_is_gone_ends_the_watch(tmp_path):
    run = tmp_path / "runs" / "dead"
    run.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    append(run / "events.jsonl", {"v": 1, "type": "run_start", "run_id": "dead", "pid": int(gone.stdout), "time": 0.0})
    out = io.StringIO()
    assert watch_plain(run, out=out, poll_seconds=0.01) == 1
    assert "the trainer process is gone" in out.getvalue().splitlines()[-1]


def test_watch_into_a_pipe_is_plain(tmp_path):
    run = recorded_run(tmp_path)
    script = Path(sys.executable).parent / "anima-train"
    done = subprocess.run([str(script), "watch", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and done.stdout.splitlines()[-1] == "run ended at step 5000: stopped (asked)"
