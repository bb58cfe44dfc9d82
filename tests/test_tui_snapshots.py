"""Snapshots of the monitor and the editor at 80×24 and 120×40 (regenerate with --snapshot-update)."""

import json
from pathlib import Path

import pytest

from anima_tui.app import AnimaApp, WatchApp
from anima_tui.system_stats import GpuReading, SystemReading

GIB = 1024**3


def fixed_system():
    return SystemReading(ram_used=12 * GIB, ram_total=64 * GIB, gpus=[GpuReading("GPU", 20 * GIB, 80 * GIB, 87)])


def recorded_run(folder: Path) -> Path:
    run = folder / "runs" / "snap"
    run.mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "time": 0.0, "run_id": "snap-run", "total_steps": 200, "total_epochs": 4,
               "device": "cuda:0"}]
    for n in range(1, 151):
        loss = 0.3 + 0.2 * (0.97 ** n) + 0.05 * ((n * 37) % 11 - 5) / 5
        events.append({"v": 1, "type": "step", "time": float(n), "step": n, "epoch": 1 + n // 50, "loss": loss,
                       "loss_avg": 0.35, "lr": 1e-4 * min(1, n / 20), "it_per_s": 1.7, "eta_s": 88,
                       "vram_allocated": 9 * GIB, "vram_reserved": 10 * GIB, "vram_peak": 11 * GIB})
    events += [
        {"v": 1, "type": "save", "time": 100.0, "kind": "lora", "path": "out/snap-000100.safetensors", "step": 100},
        {"v": 1, "type": "warning", "time": 101.0, "message": "bucket 512x768 has one image", "step": 101},
        {"v": 1, "type": "run_end", "time": 151.0, "status": "stopped", "reason": "asked", "step": 150},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "broken line\n")
    (run / "train.log").write_text("".join(f"step {n} loss 0.3{n % 10}\n" for n in range(140, 151)))
    return run


PROFILE = """\
# snapshot profile
[training]
max_train_steps = "many"
"""


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_monitor_snapshot(snap_compare, tmp_path, size):
    assert snap_compare(WatchApp(recorded_run(tmp_path), probe=fixed_system), terminal_size=size)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_editor_snapshot(snap_compare, tmp_path, size, monkeypatch):
    # The plugin and file checks depend on what is installed; the schema's own problems are enough to show.
    monkeypatch.setattr("anima_core.config.load.cross_field_problems", lambda profile: ["model.dit: required; set the path of the dit file"])
    profile = tmp_path / "snap.toml"
    profile.write_text(PROFILE)

    async def show_training(pilot):
        pilot.app.screen.show_table("training")
        await pilot.pause()

    assert snap_compare(AnimaApp(profile), terminal_size=size, run_before=show_training)
