"""A run launched detached keeps going on its own; the TUI attaches to it, watches it and stops it, only
through the run directory's files."""

import asyncio
import os
import stat
import time

import tomli_w
from training_helpers import tiny_profile_data, write_images

from anima_core.runctl import launch_detached, read_events, run_info
from anima_tui.app import WatchApp


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def attach_watch_and_stop(run_dir):
    app = WatchApp(run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        state = app.screen.state
        while "step" not in state.last_step:  # the monitor reads the files in a worker thread
            await pilot.pause(0.1)
        first = state.last_step["step"]
        deadline = time.monotonic() + 60
        while state.last_step["step"] <= first:  # the monitor follows the live file by itself
            assert time.monotonic() < deadline, "the monitor never showed a new step"
            await pilot.pause(0.3)
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")  # confirm; only this can end a run of 5000 steps with status "stopped"
        await pilot.pause()


def test_detached_run_is_watched_and_stopped_through_its_files(tmp_path, tiny_model):
    write_images(tmp_path / "data", count=1)
    data = tiny_profile_data(tmp_path, tiny_model, training={"max_train_steps": 5000})
    del data["logging"]["run_name"]
    profile = tmp_path / "profile.toml"
    profile.write_text(tomli_w.dumps(data))

    old_umask = os.umask(0o022)  # a usual umask: run files must still be owner-only
    try:
        launch = launch_detached(profile, extra_args=["--set", "training.seed=11"])
    finally:
        os.umask(old_umask)
    try:
        assert launch.run_dir.parent == tmp_path / "out" / "runs"
        events_path = launch.run_dir / "events.jsonl"

        def steps_seen():
            if not events_path.exists():
                return 0
            return max((e["step"] for e in read_events(events_path).events if e["type"] == "step"), default=0)

        wait_for(steps_seen, 240, "the first steps")
        assert run_info(launch.run_dir).status == "running"
        asyncio.run(attach_watch_and_stop(launch.run_dir))
        assert launch.process.wait(timeout=120) == 0
    finally:
        if launch.process.poll() is None:
            launch.process.kill()
    events = read_events(events_path).events
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped"
    lora_saves = [e for e in events if e["type"] == "save" and e["kind"] == "lora"]
    assert lora_saves and (tmp_path / "out").joinpath(lora_saves[-1]["path"]).exists()
    assert run_info(launch.run_dir).status == "stopped"
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert {"out", "out/runs", f"out/runs/{launch.run_dir.name}/events.jsonl", f"out/runs/{launch.run_dir.name}/train.log",
            f"out/runs/{launch.run_dir.name}/launch.log"} <= {str(p) for p in modes}
    assert any("state" in p.parts and p.suffix for p in modes), "the stop saved a state"
    wrong = {str(p): oct(mode) for p, mode in modes.items() if mode != (0o700 if (tmp_path / p).is_dir() else 0o600)}
    assert not wrong, f"not owner-only: {wrong}"
