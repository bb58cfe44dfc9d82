"""Run control: tolerant event reading, run status, control files, detached launch."""

import json
import os
import sys
import time

import pytest

from anima_core import runctl


def write_events(path, events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail, encoding="utf-8")


def test_read_events_keeps_torn_last_line_for_later_and_counts_bad_lines(tmp_path):
    events = tmp_path / "events.jsonl"
    write_events(events, [{"v": 1, "type": "step", "step": 1}], tail='not json\n[1, 2]\n{"v": 1, "type": "st')
    read = runctl.read_events(events)
    assert [e["step"] for e in read.events] == [1]
    assert read.bad_lines == 2
    with open(events, "a") as handle:
        handle.write('ep", "step": 2}\n')
    more = runctl.read_events(events, read.offset)
    assert [e["step"] for e in more.events] == [2] and more.bad_lines == 0
    assert runctl.read_events(events, more.offset).events == []


def test_read_events_of_missing_or_replaced_file(tmp_path):
    events = tmp_path / "events.jsonl"
    assert runctl.read_events(events, 0) == ([], 0, 0)
    write_events(events, [{"type": "log", "message": "x"}])
    assert len(runctl.read_events(events, 10_000).events) == 1


def test_run_status_from_events_and_pid(tmp_path):
    finished, live, died = (tmp_path / "runs" / name for name in ("a", "b", "c"))
    for run in (finished, live, died):
        run.mkdir(parents=True)
    start = {"v": 1, "type": "run_start", "run_id": "x", "total_steps": 10, "time": 1.0}
    write_events(finished / "events.jsonl", [start, {"type": "step", "step": 10}, {"type": "run_end", "status": "stopped", "reason": "asked"}])
    write_events(live / "events.jsonl", [{**start, "pid": os.getpid(), "time": 2.0}, {"type": "step", "step": 3}])
    write_events(died / "events.jsonl", [{**start, "pid": 2**22 + 12345, "time": 3.0}])
    runs = runctl.list_runs(tmp_path)
    assert [(r.run_dir.name, r.status) for r in runs] == [("c", "died"), ("b", "running"), ("a", "stopped")]
    assert runs[2].step == 10 and runs[2].total_steps == 10 and runs[2].reason == "asked"


def test_request_creates_control_files(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    for action in ("save", "stop"):
        path = runctl.request(tmp_path, action)
        assert path == tmp_path / "control" / action and path.exists()
    assert sorted(p.name for p in (tmp_path / "control").iterdir()) == ["save", "stop"]
    with pytest.raises(ValueError):
        runctl.request(tmp_path, "explode")
    with pytest.raises(runctl.RunDirError):
        runctl.request(tmp_path / "nope", "save")


FAKE_TRAINER = """
import json, sys, time, pathlib
args = sys.argv[1:]
name = args[args.index("--set") + 1].split("=", 1)[1].strip('"')
run = pathlib.Path("out/runs") / name
with open(run / "events.jsonl", "a") as f:
    f.write(json.dumps({"v": 1, "type": "run_start", "run_id": name, "pid": __import__("os").getpid()}) + "\\n")
print("argv", args, flush=True)
while not (run / "control" / "stop").exists():
    time.sleep(0.05)
with open(run / "events.jsonl", "a") as f:
    f.write(json.dumps({"v": 1, "type": "run_end", "status": "stopped"}) + "\\n")
"""


def test_launch_detached_runs_in_its_own_session_and_obeys_stop(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text('[saving]\noutput_dir = "out"\noutput_name = "demo"\n')
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    launch = runctl.launch_detached(profile, run_name="r1", command=[sys.executable, str(script)])
    assert launch.run_dir == tmp_path / "out" / "runs" / "r1"
    assert oct(launch.run_dir.stat().st_mode & 0o777) == "0o700"
    assert os.getsid(launch.pid) == launch.pid != os.getsid(0)
    deadline = time.time() + 20
    while runctl.run_info(launch.run_dir).status != "running":
        assert time.time() < deadline, launch.log_path.read_text()
        time.sleep(0.05)
    runctl.request(launch.run_dir, "stop")
    launch.process.wait(timeout=20)
    assert runctl.run_info(launch.run_dir).status == "stopped"
    assert "logging.run_name=\"r1\"" in launch.log_path.read_text()
