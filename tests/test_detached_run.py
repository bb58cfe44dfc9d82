"""A run launched detached keeps going on its own; it is watched and stopped only through its files."""

import time

import tomli_w
from training_helpers import tiny_profile_data, write_images

from anima_core.runctl import launch_detached, read_events, request, run_info


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_detached_run_is_watched_and_stopped_through_its_files(tmp_path, tiny_model):
    write_images(tmp_path / "data", count=1)
    data = tiny_profile_data(tmp_path, tiny_model, training={"max_train_steps": 5000})
    del data["logging"]["run_name"]
    profile = tmp_path / "profile.toml"
    profile.write_text(tomli_w.dumps(data))

    launch = launch_detached(profile, extra_args=["--set", "training.seed=11"])
    try:
        assert launch.run_dir.parent == tmp_path / "out" / "runs"
        events_path = launch.run_dir / "events.jsonl"

        def steps_seen():
            if not events_path.exists():
                return 0
            return max((e["step"] for e in read_events(events_path).events if e["type"] == "step"), default=0)

        first = wait_for(steps_seen, 240, "the first steps")
        wait_for(lambda: steps_seen() > first, 60, "the step count to rise")
        assert run_info(launch.run_dir).status == "running"

        request(launch.run_dir, "stop")
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
