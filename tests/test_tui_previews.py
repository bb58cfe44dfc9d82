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
    """Until the decode workers are done and their images are on screen."""
    from textual.worker import WorkerCancelled

    for _ in range(3):
        await pilot.pause()
        try:
            await pilot.app.workers.wait_for_complete()
        except WorkerCancelled:  # a newer poll replaced a decode while we waited: wait for its successor
            await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def open_gallery(pilot):
    await settle(pilot)
    await pilot.press("g")
    await settle(pilot)


def tiles(app):
    from anima_tui.widgets.preview_pane import PreviewPane
    from anima_tui.widgets.preview_image import PreviewTile

    return list(app.screen.query_one(PreviewPane).query(PreviewTile))


def caption(tile) -> str:
    return str(tile._caption.render())


def colour(loaded) -> tuple[int, int, int]:
    return loaded.image.getpixel((loaded.image.width // 2, 2))


def run_async(test):
    return asyncio.run(test)


def test_pane_shows_the_newest_preview_of_each_prompt_on_attach_to_a_finished_run(tmp_path):
    async def check():
        app = WatchApp(make_run(tmp_path), probe=no_system)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            shown = tiles(app)
            assert len(shown) == len(PROMPTS)
            for index, tile in enumerate(shown):
                assert tile.loaded.preview.step == 30 and tile.loaded.preview.prompt == PROMPTS[index]
                assert colour(tile.loaded) == COLOURS[index]  # the image itself, decoded, not just its name
                assert "step 30 · epoch 3" in caption(tile) and PROMPTS[index][:10] in caption(tile)
                assert tile.loaded.skipped == ()

    run_async(check())


def test_pane_folds_away_on_a_narrow_screen_and_is_hidden_without_previews(tmp_path):
    from anima_tui.widgets.preview_pane import PreviewPane

    async def check(run, size, shown):
        app = WatchApp(run, probe=no_system)
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            assert app.screen.query_one(PreviewPane).display is shown

    run_async(check(make_run(tmp_path / "a"), (80, 24), False))
    run_async(check(make_run(tmp_path / "b"), (120, 40), True))
    empty = make_run(tmp_path / "c")
    (empty / "events.jsonl").write_text(json.dumps({"v": 1, "type": "run_start", "time": 0.0}) + "\n")
    run_async(check(empty, (120, 40), False))


def test_truncated_or_missing_images_are_skipped_with_a_note(tmp_path):
    from anima_tui.gallery import PreviewGrid

    run = make_run(tmp_path)
    truncated = sample_path(run, 1, 30)
    truncated.write_bytes(truncated.read_bytes()[:60])  # a half-written PNG
    sample_path(run, 2, 30).unlink()

    async def check():
        app = WatchApp(run, probe=no_system)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            first, second, third = tiles(app)
            assert first.loaded.preview.step == 30 and not first.loaded.skipped
            # The newest readable image is shown instead, with a note naming what was passed over and why.
            assert second.loaded.preview.step == 20 and colour(second.loaded) == COLOURS[1]
            assert "skipped demo_000030_01_42.png: unreadable" in caption(second)
            assert third.loaded.preview.step == 20 and "demo_000030_02_42.png: missing" in caption(third)
            await pilot.press("g")
            await settle(pilot)
            cells = list(app.screen.query_one(PreviewGrid).query(".cell"))
            columns = app.screen.query_one(PreviewGrid).shape[1]
            broken = cells[1 * columns + 2]  # prompt 2, step 30
            assert broken.loaded.image is None and "unreadable" in caption(broken)
            assert cells[1 * columns + 1].loaded.image is not None

    run_async(check())


def test_gallery_grid_and_navigation(tmp_path):
    from anima_tui.gallery import GalleryScreen, PreviewGrid, ViewerScreen

    steps = list(range(10, 101, 10))
    run = make_run(tmp_path, steps)

    async def check():
        app = WatchApp(run, probe=no_system)
        async with app.run_test(size=(80, 24)) as pilot:
            await open_gallery(pilot)
            assert isinstance(app.screen, GalleryScreen)
            grid = app.screen.query_one(PreviewGrid)
            rows, columns = grid.shape
            assert (rows, columns) == (3, 6)  # 80×24: three prompts by six steps of 10×6 tiles

            def labels():
                return [str(label.render()) for label in grid.query(".step-label")]

            # Opens on the newest step of the first prompt, the window scrolled to show it.
            assert grid.selected().step == 100 and labels() == [f"step {s}" for s in steps[4:]]
            cells = list(grid.query(".cell"))
            assert [cell.loaded.preview.step for cell in cells[:columns]] == steps[4:]
            assert [cells[r * columns].loaded.preview.prompt for r in range(rows)] == PROMPTS
            assert cells[columns - 1].has_class("-cursor")
            assert "prompt 1/3 · step 100 · epoch 10" in str(app.screen.query_one("#gallery-status").render())

            await pilot.press("down", "left")
            assert (grid.selected().prompt, grid.selected().step) == (PROMPTS[1], 90)
            await pilot.press("home")
            await settle(pilot)
            assert grid.selected().step == 10 and labels() == [f"step {s}" for s in steps[:6]]
            await pilot.press("left", "up", "up")  # stops at the edges
            assert (grid.selected().prompt, grid.selected().step) == (PROMPTS[0], 10)
            await pilot.press("end", "j", "h")
            assert (grid.selected().prompt, grid.selected().step) == (PROMPTS[1], 90)

            # Large view of the selection; left and right step through that prompt's history.
            await pilot.press("enter")
            await settle(pilot)
            viewer = app.screen
            assert isinstance(viewer, ViewerScreen)
            large = viewer.query_one("#large")
            assert large.loaded.preview.step == 90 and colour(large.loaded) == COLOURS[1]
            assert "9/10" in str(viewer.query_one("#viewer-title").render())
            for expected in (80, 70):
                await pilot.press("left")
                await settle(pilot)
                assert large.loaded.preview.step == expected and large.loaded.preview.prompt == PROMPTS[1]
            await pilot.press("escape")
            assert app.screen is not viewer and grid.selected().step == 90

            # A wider terminal shows more of the grid around the same selection, never past the last step.
            await pilot.resize_terminal(200, 40)
            await settle(pilot)
            assert grid.shape == (3, 9) and grid.selected().step == 90
            assert labels() == [f"step {s}" for s in steps[1:]]
            cells = list(grid.query(".cell"))
            assert [cells[r * 9 + 8].loaded.preview.step for r in range(3)] == [100, 100, 100]
            assert cells[1 * 9 + 7].has_class("-cursor")

    run_async(check())


def test_contact_sheet_is_one_key_away(tmp_path):
    from anima_core.sampling.sheet import contact_sheet
    from anima_tui.gallery import ViewerScreen

    run = make_run(tmp_path)
    # The trainer's sheet of step 20 (yellow here, so it cannot be mistaken for one made from the previews).
    contact_sheet([Image.new("RGB", (64, 96), (230, 220, 30))] * 3).save(run / "samples" / "demo_000020_sheet.png")

    async def check():
        app = WatchApp(run, probe=no_system)
        async with app.run_test(size=(80, 24)) as pilot:
            await open_gallery(pilot)
            await pilot.press("c")
            await settle(pilot)
            assert isinstance(app.screen, ViewerScreen)
            large = app.screen.query_one("#large")
            assert "contact sheet · step 30" in str(app.screen.query_one("#viewer-title").render())
            # No sheet file for step 30: one is made from the step's previews, prompts left to right.
            sheet = large.loaded.image
            assert sheet.width > 2 * sheet.height
            assert sheet.getpixel((2, 2)) == COLOURS[0] and sheet.getpixel((sheet.width - 3, 2)) == COLOURS[2]
            await pilot.press("left")
            await settle(pilot)
            assert large.loaded.image.getpixel((2, 2)) == (230, 220, 30)

    run_async(check())


def test_new_previews_appear_live_in_the_pane_and_the_gallery(tmp_path):
    from anima_tui.gallery import PreviewGrid

    run = make_run(tmp_path, [10], ended=False)

    def append(step):
        with open(run / "events.jsonl", "a") as events:
            events.writelines(json.dumps(e) + "\n" for e in sample_events(run, step))

    async def check():
        app = WatchApp(run, probe=no_system)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            assert [tile.loaded.preview.step for tile in tiles(app)] == [10, 10, 10]
            append(20)
            await pilot.pause(1.2)  # the monitor's own polling, not a call from the test
            await settle(pilot)
            assert [tile.loaded.preview.step for tile in tiles(app)] == [20, 20, 20]
            await pilot.press("g")
            await settle(pilot)
            grid = app.screen.query_one(PreviewGrid)
            append(30)
            await pilot.pause(1.2)  # the monitor underneath still reads events while the gallery is shown
            await settle(pilot)
            assert grid.index.steps == [10, 20, 30]
            assert [str(label.render()) for label in grid.query(".step-label")][:3] == ["step 10", "step 20", "step 30"]
            assert grid.query(".cell").first().loaded.preview.step == 10

    run_async(check())


def test_renderer_setting(monkeypatch):
    from textual_image.widget import HalfcellImage, TGPImage

    from anima_tui.widgets.preview_image import RendererSettingError, image_widget_class

    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "kitty")
    assert image_widget_class() is TGPImage
    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "HalfBlock")
    assert image_widget_class() is HalfcellImage
    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "ascii")
    with pytest.raises(RendererSettingError, match="ANIMA_TRAIN_IMAGES='ascii'.*halfblock"):
        image_widget_class()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_gallery_snapshot(snap_compare, tmp_path, size):
    assert snap_compare(WatchApp(make_run(tmp_path), probe=no_system), terminal_size=size, run_before=open_gallery)


def test_monitor_with_previews_snapshot(snap_compare, tmp_path):
    assert snap_compare(WatchApp(make_run(tmp_path), probe=no_system), terminal_size=(120, 40), run_before=settle)
