"""Killed at any moment, a run loses at most one save interval and never a file.

Kills land inside writes: the test waits for a temporary name (TEMP_MARK) to appear, waits a random
moment, freezes the process with SIGSTOP and, if a write is still in progress, kills it with SIGKILL.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_helpers import read_events, tiny_profile_data, write_images

from anima_core.atomic import TEMP_MARK, DiskWriteError, atomic_path, atomic_write_text, clean_leftovers
from anima_core.config import load_profile, profile_from_dict, profile_to_toml
from anima_core.training.state import list_states, load_state

# Imports once, then forks one saver per line read from stdin (printing its pid), so each kill costs
# milliseconds instead of a fresh interpreter. The parent uses one thread, so forking it is safe.
SAVERS = r"""
import os
import sys

import torch

from anima_core.config import load_profile
from anima_core.training.state import Progress, list_states, save_state
from anima_plugins.lora.files import write_lora_file

profile = load_profile(sys.argv[1])
out = profile.saving.output_dir
torch.set_num_threads(1)  # no thread pool in the forking parent
warm_up = torch.nn.Linear(2, 2)
torch.optim.AdamW(warm_up.parameters()).step()  # import and initialise lazily loaded parts once


def save_forever():
    states = list_states(out / "state")
    step = int(states[-1].name.split("-")[1]) if states else 0
    network = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    while True:
        step += 1
        network(torch.randn(4, 256)).square().mean().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        save_state(out / "state", progress=Progress(step, 0, step), network_state=network.state_dict(),
                   optimizer_state=optimizer.state_dict(), scheduler=scheduler, scaler=None, profile=profile, keep_last=2)
        tensors = {k: v.detach() for k, v in network.state_dict().items()}
        write_lora_file(out / "lora.safetensors", tensors, {"step": str(step)})
        write_lora_file(out / f"lora-step{step:08d}.safetensors", tensors, {"step": str(step)})


for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        save_forever()
    print(pid, flush=True)
    os.waitpid(pid, 0)
"""


def temporaries(folder: Path) -> list[Path]:
    """Temporary names under folder; os.walk skips folders the writer prunes meanwhile."""
    return [Path(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files if name.startswith(TEMP_MARK)]


def kill_inside_a_write(pid: int, alive, folder: Path, rng: random.Random, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail("the writing process ended early")
        if temporaries(folder):
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGSTOP)
            while process_state(pid) not in ("T", "Z"):  # the signal is delivered asynchronously
                time.sleep(0.0005)
            if temporaries(folder):
                os.kill(pid, signal.SIGKILL)
                while pid_alive(pid):
                    time.sleep(0.001)
                return
            os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("no write was caught in progress")


def process_state(pid: int) -> str:
    """R, S, T (stopped), Z (killed, not yet reaped by its parent) ...; X when gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before or while /proc was read
        return "X"


def pid_alive(pid: int) -> bool:
    return process_state(pid) not in ("Z", "X")


def assert_everything_loads(out: Path, profile) -> list[Path]:
    for path in out.glob("*.safetensors"):
        assert load_file(path), path
    states = list_states(out / "state") + [s for run in out.glob("runs/*") for s in list_states(run / "state")]
    for state in states:
        progress, network_state, trainer_state = load_state(state, profile=profile, allow_lr_change=True)
        assert network_state and trainer_state["optimizer"]
    return states


def newest_step(out: Path) -> int:
    states = list_states(out / "state")  # named by step; read while the saver may prune old ones
    return int(states[-1].name.split("-")[1]) if states else 0


def profile_file(root: Path, tiny_model, **tables) -> Path:
    write_images(root / "data", count=2)
    path = root / "profile.toml"
    path.write_text(profile_to_toml(profile_from_dict(tiny_profile_data(root, tiny_model, **tables))))
    return path


def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "lora.safetensors"
    atomic_write_text(target, "old")
    with pytest.raises(DiskWriteError, match=f"could not write {target}: No space left on device"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["lora.safetensors"]


def test_full_disk_during_a_state_save_names_it_and_keeps_earlier_states(tmp_path, monkeypatch):
    import torch

    from anima_core.config.schema import Profile
    from anima_core.training.state import Progress, save_state

    network = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = dict(network_state=network.state_dict(), optimizer_state=optimizer.state_dict(), scheduler=scheduler,
                 scaler=None, profile=Profile(), keep_last=3)
    first = save_state(tmp_path, progress=Progress(step=1, epoch=0, batch_in_epoch=1), **state)

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(DiskWriteError, match="step-00000002.*No space left on device"):
        save_state(tmp_path, progress=Progress(step=2, epoch=0, batch_in_epoch=2), **state)
    monkeypatch.undo()
    assert list_states(tmp_path) == [first] and not clean_leftovers(tmp_path)
    load_state(first, profile=Profile(), allow_lr_change=False)


def test_leftovers_of_dead_writers_are_removed_and_live_writers_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "state").mkdir()
        gone = [tmp_path / f"{TEMP_MARK}{dead.pid}.lora.safetensors.x1", tmp_path / "state" / f"{TEMP_MARK}{dead.pid}.step-00000002.x2"]
        gone[0].write_bytes(b"torn")
        gone[1].mkdir()
        (gone[1] / "network.pt").write_bytes(b"torn")
        kept = tmp_path / f"{TEMP_MARK}{live.pid}.lora.safetensors.x3"
        kept.write_bytes(b"being written")
        assert clean_leftovers(tmp_path) == sorted(gone)
        assert kept.exists() and not any(p.exists() for p in gone)
    finally:
        live.kill()
        live.wait()


def test_sigkill_inside_saves_leaves_previous_files_loadable(tmp_path, tiny_model):
    path = profile_file(tmp_path, tiny_model)
    profile = load_profile(path)
    out = profile.saving.output_dir
    rng = random.Random(0)
    steps_seen = []
    savers = subprocess.Popen([sys.executable, "-c", SAVERS, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(12):
            savers.stdin.write("next\n")
            savers.stdin.flush()
            pid = int(savers.stdout.readline())
            at_least = (steps_seen[-1] if steps_seen else 0) + rng.randint(1, 3)
            wait_for(lambda: newest_step(out) >= at_least, savers, f"a state for step {at_least}")
            kill_inside_a_write(pid, lambda: pid_alive(pid), out, rng)
            states = assert_everything_loads(out, profile)
            assert states, "every state was lost"
            steps_seen.append(newest_step(out))
            assert clean_leftovers(out), "the kill came inside a write, so something was left to clean"
            assert not temporaries(out)
    finally:
        savers.kill()
        savers.wait()
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]


def start_run(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "anima_core.cli", "run", str(path), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def events_of(run_dir: Path) -> list[dict]:
    """Events written so far; a line still being written is skipped."""
    if not (run_dir / "events.jsonl").exists():
        return []
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_killed_run_resumes_latest_and_sigterm_stops_cleanly(tmp_path, tiny_model):
    path = profile_file(tmp_path, tiny_model, training={"max_train_steps": 100},
                        saving={"save_every_n_steps": 2, "save_state_every_n_steps": 1, "keep_last_n_states": 2},
                        logging={"run_name": "first", "progress": "plain"})
    profile = load_profile(path)
    out = profile.saving.output_dir

    first = start_run(path)
    wait_for(lambda: list(out.glob("lora-step*.safetensors")) and list_states(out / "runs/first/state"), first,
             "a LoRA and a state were saved")
    kill_inside_a_write(first.pid, lambda: first.poll() is None, out, random.Random(1))
    first.wait()
    leftovers = temporaries(out)
    assert leftovers
    assert_everything_loads(out, profile)

    # The restart resumes the newest state, reports what the kill left, and takes a new learning rate.
    second = start_run(path, "--resume", "latest", "--allow-lr-change",
                       "--set", "logging.run_name=second", "--set", "optimizer.learning_rate=2e-3")
    run_dir = out / "runs/second"
    wait_for(lambda: [e for e in events_of(run_dir) if e["type"] == "step"], second, "the first resumed step")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=240) == 0, second.stderr.read()[-3000:]
    events = read_events(run_dir)
    cleaned = [e["message"] for e in events if e["type"] == "warning" and "left by an interrupted write" in e["message"]]
    assert sorted(cleaned) == sorted(f"removed {p}, left by an interrupted write" for p in leftovers)
    resumed = next(e for e in events if e["type"] == "log" and e["message"].startswith("resumed from"))
    assert "runs/first/state/step-" in resumed["message"]
    steps = [e for e in events if e["type"] == "step"]
    assert steps[0]["step"] > 1 and set(steps[0]["lr"]) == {2e-3}
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped" and end["reason"] == "signal SIGTERM"
    assert load_file(end["lora"]) and Path(end["lora"]).name == f"lora-step{end['step']:08d}.safetensors"
    assert json.loads((list_states(run_dir / "state")[-1] / "progress.json").read_text())["step"] == end["step"]

    # Ctrl+C asks for a graceful stop; a second signal during the saves ends the process at once.
    third = start_run(path, "--resume", str(run_dir), "--allow-lr-change",
                      "--set", "logging.run_name=third", "--set", "optimizer.learning_rate=2e-3")
    wait_for(lambda: [e for e in events_of(out / "runs/third") if e["type"] == "step"], third, "a step")
    saves_before = len([e for e in events_of(out / "runs/third") if e["type"] == "save"])
    third.send_signal(signal.SIGINT)
    wait_for(lambda: temporaries(out) or len([e for e in events_of(out / "runs/third") if e["type"] == "save"]) > saves_before,
             third, "the stop's saves", poll=0.001)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 128 + signal.SIGTERM
    assert_everything_loads(out, load_profile(path, ["optimizer.learning_rate=2e-3"]))
