"""Snapshots of home, the editor, the save-diff dialog and the monitor at 80×24 and 120×40, with a long run's
data (regenerate with --snapshot-update). Every screen must be usable at 80×24: tests/test_tui_layout.py
checks what must be visible there; these pictures catch any other change."""

import json
from pathlib import Path

import pytest

from anima_tui.app import AnimaApp, WatchApp
from anima_tui.system_stats import GpuReading, SystemReading

GIB = 1024**3
SIZES = [(80, 24), (120, 40)]
STEPS = 5000


def fixed_system():
    return SystemReading(ram_used=12 * GIB, ram_total=64 * GIB, gpus=[GpuReading("GPU", 20 * GIB, 80 * GIB, 87)])


def log_line(n: int, loss: float, lr: float) -> str:
    """A train.log step line as the log_file sink writes it (fixed clock, so the picture never changes)."""
    return (f"2026-12-01 09:{n // 60 % 60:02d}:{n % 60:02d} step      step={n} epoch={1 + n // 500} loss={loss:.4g} "
            f"loss_avg=0.35 lr={lr:.4g} s_per_it=0.58 eta_s=2900 vram_peak=1.181e+10")


def recorded_run(folder: Path, *, ended: bool = True) -> Path:
    """A run of 5000 of 10000 steps: warm-up then a slow decay of the lr, noisy falling loss, saves, a sample,
    a warning; stopped on request."""
    run = folder / "runs" / "snap"
    run.mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "time": 0.0, "run_id": "20261201-090000-snap", "total_steps": 2 * STEPS,
               "total_epochs": 20, "device": "cuda:0"}]
    lines = []
    for n in range(1, STEPS + 1):
        loss = 0.3 + 0.2 * (0.999 ** n) + 0.05 * ((n * 37) % 11 - 5) / 5
        lr = 2e-4 * min(1.0, n / 200) * (1 - 0.3 * n / (2 * STEPS))
        events.append({"v": 1, "type": "step", "time": 0.58 * n, "step": n, "epoch": 1 + n // 500, "loss": loss,
                       "loss_avg": 0.35, "lr": lr, "s_per_it": 0.58, "eta_s": 2900.0,
                       "vram_allocated": 9 * GIB, "vram_reserved": 10 * GIB, "vram_peak": 11 * GIB})
        lines.append(log_line(n, loss, lr))
    for n in range(1000, STEPS + 1, 1000):
        events.append({"v": 1, "type": "save", "time": 0.58 * n, "kind": "lora", "path": f"out/snap-{n:06d}.safetensors", "step": n})
    events += [
        {"v": 1, "type": "sample", "time": 2000.0, "path": "out/samples/snap-004000-0.png", "prompt": "1girl, solo", "step": 4000},
        {"v": 1, "type": "warning", "time": 2001.0, "message": "bucket 512x768 has one image", "step": 4001},
    ]
    if ended:
        events.append({"v": 1, "type": "run_end", "time": 0.58 * STEPS + 60, "status": "stopped", "reason": "asked", "step": STEPS})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "broken line\n")
    (run / "train.log").write_text("\n".join(lines[-300:]) + "\n")
    return run


PROFILE = """\
# snapshot profile
[network]
dim = 16  # rank

[training]
max_train_steps = "many"
gradient_accumulation_steps = 2
"""


@pytest.fixture
def quiet_checks(monkeypatch):
    """The plugin and file checks depend on what is installed; the schema's own problems are enough to show."""
    monkeypatch.setattr("anima_core.config.load.cross_field_problems", lambda profile, plugins=None: ["model.dit: required; set the path of the dit file"])


async def validated(pilot) -> None:
    for _ in range(400):
        await pilot.pause(0.05)
        if getattr(pilot.app.screen, "problems_known", False):
            return
    raise AssertionError("validation did not finish")


@pytest.mark.parametrize("size", SIZES)
def test_monitor_snapshot(snap_compare, tmp_path, size):
    async def polled(pilot):  # the first read starts after the first frame, in a worker
        for _ in range(3):
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()

    assert snap_compare(WatchApp(recorded_run(tmp_path), probe=fixed_system), terminal_size=size, run_before=polled)


@pytest.mark.parametrize("size", SIZES)
def test_editor_snapshot(snap_compare, tmp_path, size, quiet_checks):
    profile = tmp_path / "snap.toml"
    profile.write_text(PROFILE)

    async def show_training(pilot):
        pilot.app.screen.show_table("training")
        await validated(pilot)

    assert snap_compare(AnimaApp(profile), terminal_size=size, run_before=show_training)


@pytest.mark.parametrize("size", SIZES)
def test_diff_dialog_snapshot(snap_compare, tmp_path, size, quiet_checks, monkeypatch):
    """A new profile started from a long template: the whole file is the diff, and it must scroll to its end."""
    monkeypatch.chdir(tmp_path)
    template = tmp_path / "template.toml"
    template.write_text(PROFILE + "".join(f"\n[sampling]\n# comment {i}\n" if i == 0 else f"# line {i} of a long template\n" for i in range(40)))
    profile = tmp_path / "snap.toml"

    async def save_and_scroll(pilot):
        from anima_tui.editor import EditorScreen
        from anima_tui.profile_draft import ProfileDraft

        pilot.app.push_screen(EditorScreen(ProfileDraft.open(profile, start_from=template)))
        await validated(pilot)
        await pilot.press("ctrl+s", "end")

    assert snap_compare(AnimaApp(profile), terminal_size=size, run_before=save_and_scroll)


@pytest.mark.parametrize("size", SIZES)
def test_home_snapshot(snap_compare, tmp_path, size, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("anima_tui.home.REPO_PROFILES", tmp_path / "examples")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "anima-lora.toml").write_text(PROFILE)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "my-character-lora-with-a-long-name.toml").write_text(PROFILE)
    recorded_run(tmp_path / "output")

    async def listed(pilot):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(AnimaApp(None), terminal_size=size, run_before=listed)
