"""Previews in the TUI: the monitor's pane, the gallery and the large view, on a run directory holding real PNG
previews at several steps. Snapshots force the half-block renderer, the one every terminal can show."""

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

from anima_tui.app import WatchApp
from anima_tui.system_stats import SystemReading

PROMPTS = ["1girl, red hair, smile", "landscape, mountains at dusk", "cat on a windowsill"]
STEPS = [10, 20, 30]
COLOURS = [(220, 40, 40), (40, 160, 60), (50, 90, 220)]


def no_system():
    return SystemReading(ram_used=None, ram_total=None, gpus=[])


def preview_image(prompt: int, step: int) -> Image.Image:
    """Distinct per prompt (colour) and per step (a white bar that grows), so a wrong picture shows."""
    image = Image.new("RGB", (64, 96), COLOURS[prompt])
    bar = step * 64 // 40
    image.paste((255, 255, 255), (0, 80, bar, 96))
    return image


def sample_path(run: Path, prompt: int, step: int) -> Path:
    return run / "samples" / f"demo_{step:06d}_{prompt:02d}_42.png"


def make_run(tmp_path, steps=STEPS, *, ended=True):
    run = tmp_path / "runs" / "pv"
    (run / "samples").mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "time": 0.0, "run_id": "pv-run", "total_steps": 40, "total_epochs": 4}]
    for step in steps:
        events.append({"v": 1, "type": "step", "time": float(step), "step": step, "epoch": step // 10, "loss": 0.3})
        events += sample_events(run, step)
    if ended:
        events.append({"v": 1, "type": "run_end", "time": 99.0, "status": "finished", "step": steps[-1]})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def sample_events(run: Path, step: int) -> list[dict]:
    events = []
    for index, prompt in enumerate(PROMPTS):
        path = sample_path(run, index, step)
        preview_image(index, step).save(path)
        events.append({"v": 1, "type": "sample", "time": float(step), "path": str(path), "prompt": prompt,
                       "step": step, "epoch": step // 10})
    return events


@pytest.fixture(autouse=True)
def halfblock(monkeypatch):
    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "halfblock")


async def settle(pilot):
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause()
