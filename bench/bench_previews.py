"""How long previews take to reach the terminal, and how much of it lands on the TUI's event loop.

Worker side: decoding a 1024² PNG and scaling it to a gallery tile, a pane tile and the large view.
Event-loop side: drawing a tile with the half-block renderer from the scaled image (what the TUI does) and
from the full-size image (what it would cost without scaling in the worker).
End to end: a headless monitor on a run with 3 prompts × 8 steps of 1024² previews, until every gallery tile
is drawn.

    python bench/bench_previews.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

os.environ.setdefault("ANIMA_TRAIN_IMAGES", "halfblock")

from anima_tui.widgets import preview_image  # noqa: E402 - after the renderer is chosen

SIDE = 1024
REPEATS = 7


def noisy_png(path: Path, seed: int) -> Path:
    """Noise compresses badly, like a detailed render: a worst case for decoding."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def median_ms(run, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def draw_ms(image: Image.Image, cells: tuple[int, int]) -> float:
    console = Console(file=open(os.devnull, "w"), width=cells[0], height=cells[1], color_system="truecolor")
    return median_ms(lambda: console.print(preview_image.image_renderable(image, "auto", "auto")))


def uncached_decode(path: Path, box: tuple[int, int]) -> None:
    preview_image._cache.clear()
    preview_image.decode(path, box)


async def gallery_ms(folder: Path) -> float:
    from anima_tui.app import WatchApp
    from anima_tui.gallery import PreviewGrid
    from anima_tui.system_stats import SystemReading

    run = folder / "runs" / "bench"
    (run / "samples").mkdir(parents=True)
    events = []
    for step in range(100, 900, 100):
        for prompt in range(3):
            path = noisy_png(run / "samples" / f"b_{step:06d}_{prompt:02d}_1.png", step + prompt)
            events.append({"v": 1, "type": "sample", "time": 0.0, "path": str(path), "prompt": f"prompt {prompt}",
                           "step": step, "epoch": 1})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    preview_image._cache.clear()
    app = WatchApp(run, probe=lambda: SystemReading(ram_used=None, ram_total=None, gpus=[]))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        start = time.perf_counter()
        await pilot.press("g")
        while True:
            await pilot.pause()
            await app.workers.wait_for_complete()
            cells = list(app.screen.query_one(PreviewGrid).query(".cell"))
            if cells and not any(cell.pending for cell in cells):
                return 1000 * (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        png = noisy_png(folder / "one.png", 0)
        boxes = {"thumbnail 12×4": (12, 4), "pane tile 15×11": (15, 11), "large view 118×36": (118, 36)}
        print(f"{SIDE}² PNG, {os.environ['ANIMA_TRAIN_IMAGES']} renderer, median of {REPEATS}")
        print(f"{'region':<20} {'decode+scale (worker)':>22} {'draw scaled (loop)':>19} {'draw full-size (loop)':>22}")
        full = Image.open(png).convert("RGB")
        for name, cells in boxes.items():
            box = preview_image.pixel_box(*cells)
            worker = median_ms(lambda: uncached_decode(png, box))
            scaled = preview_image.decode(png, box)
            print(f"{name:<20} {worker:>19.1f} ms {draw_ms(scaled, cells):>16.1f} ms {draw_ms(full, cells):>19.1f} ms")
        print(f"gallery at 120×40, 3 prompts × 8 steps: all tiles drawn {asyncio.run(gallery_ms(folder)):.0f} ms after 'g'")


if __name__ == "__main__":
    sys.exit(main())
