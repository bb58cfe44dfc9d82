"""Startup benchmark of the terminal UI and `validate`: seconds from process start to the first frame.

    python bench/bench_startup.py                 # every target, 3 runs each, a table last
    python bench/bench_startup.py --runs 5 --targets editor,validate

Each run is a fresh Python process (imports included, as a user pays them). For a screen the child runs the
app headless at 80×24 and marks when the screen is mounted and its first refresh has been processed (the
first frame). The editor also marks when its validation problems are shown, the monitor when the run's
history is drawn (the old monitor read it before its first frame), and `leave` times going back
from an open, validated editor to the start screen. `validate` is `anima-train validate` on the same
profile. Inputs: the repository's profiles/anima-lora.toml (copied aside, so its model paths do not exist
and validation reports them) and a recorded run of 20,000 steps for the monitor and the runs list.
Reported: the median and the fastest of the runs; the marks share the clock of this process (monotonic).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "anima-lora.toml"
TARGETS = ("home", "editor", "monitor", "leave", "validate")
RUN_STEPS = 20_000


def write_run(folder: Path) -> Path:
    run = folder / "output" / "runs" / "bench-run"
    run.mkdir(parents=True)
    lines = [{"v": 1, "type": "run_start", "time": 0.0, "run_id": "bench-run", "total_steps": RUN_STEPS * 2}]
    lines += [{"v": 1, "type": "step", "time": float(n), "step": n, "epoch": 1 + n // 500, "loss": 0.3 + (n % 17) / 100,
               "loss_avg": 0.35, "lr": 1e-4, "it_per_s": 1.5, "eta_s": 9000.0} for n in range(1, RUN_STEPS + 1)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (run / "train.log").write_text("".join(f"step {n} loss 0.3\n" for n in range(RUN_STEPS - 2000, RUN_STEPS + 1)))
    return run


# The child builds the app and writes "<mark> <perf_counter>" lines to file descriptor 1 (Textual captures
# sys.stdout while it runs). It polls the app every 2 ms; that granularity is far below what is measured.
CHILD = r"""
import os, sys, time
from pathlib import Path

def mark(name):
    os.write(1, f"{name} {time.perf_counter()}\n".encode())

target, profile, run = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
from anima_tui.app import AnimaApp, WatchApp
from anima_tui.editor import EditorScreen
from anima_tui.home import HomeScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft

if target == "monitor":
    app, wanted = WatchApp(run), MonitorScreen
elif target == "editor":
    app, wanted = AnimaApp(profile), EditorScreen
else:
    app, wanted = AnimaApp(None), HomeScreen
stage = "open"

def drawn(name, next_stage):
    def done():
        global stage
        mark(name)
        stage = next_stage
    return done

def watch():
    global stage
    screen = app.screen
    if stage == "open" and isinstance(screen, wanted) and screen.is_mounted:
        stage = "drawing"
        screen.call_after_refresh(drawn("frame", {"editor": "validating", "leave": "opening", "monitor": "reading"}.get(target, "done")))
    elif stage == "reading" and screen.state.events_seen:
        stage = "drawing"
        screen.call_after_refresh(drawn("history", "done"))
    elif stage == "opening":
        stage = "validating"
        app.push_screen(EditorScreen(ProfileDraft.open(profile)))
    elif stage == "validating" and isinstance(screen, EditorScreen) and screen.is_mounted and getattr(screen, "problems_known", True):
        mark("problems")
        if target == "leave":
            stage = "leaving"
            mark("leave_start")
            screen.action_back()
        else:
            stage = "done"
    elif stage == "leaving" and isinstance(screen, HomeScreen):
        stage = "drawing"
        screen.call_after_refresh(drawn("home_again", "done"))
    elif stage == "done":
        app.exit()

app.call_later(lambda: app.set_interval(0.002, watch))
app.run(headless=True, size=(80, 24))
"""


def run_child(target: str, folder: Path, profile: Path, run: Path) -> dict[str, float]:
    """Seconds from spawning the process to each mark; `leave` is the time from leave_start to home_again."""
    if target == "validate":
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "anima-train"), "validate", str(profile)], cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"done": time.perf_counter() - start}
    env = {**os.environ, "TEXTUAL": "", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", CHILD, target, str(profile), str(run)], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    marks = {}
    for line in output.stdout.splitlines():
        name, _, value = line.partition(" ")
        try:
            marks[name] = float(value) - start
        except ValueError:
            continue
    if "frame" not in marks:
        raise SystemExit(f"{target}: no frame mark; stderr:\n{output.stderr[-2000:]}")
    if target == "leave":
        return {"leave": marks["home_again"] - marks["leave_start"]}
    return {k: v for k, v in marks.items() if k in ("frame", "problems", "history")}


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    results: dict[str, dict[str, list[float]]] = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = write_run(folder)
        profile = folder / PROFILE.name
        shutil.copy(PROFILE, profile)
        for target in targets:
            for _ in range(args.runs):
                for name, seconds in run_child(target, folder, profile, run).items():
                    results.setdefault(target, {}).setdefault(name, []).append(seconds)
    print(f"load average at start: {load:.2f}; {os.cpu_count()} CPU(s)")
    print(f"{'target':<10} {'mark':<9} {'median s':>9} {'fastest s':>10}")
    for target, marks in results.items():
        for name, values in marks.items():
            print(f"{target:<10} {name:<9} {statistics.median(values):>9.2f} {min(values):>10.2f}")
    return results


if __name__ == "__main__":
    main()
