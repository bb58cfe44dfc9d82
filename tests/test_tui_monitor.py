"""The monitor on a hand-written events file: the numbers shown are the events' numbers; bad lines are survived."""

import asyncio
import json

from rich.console import Console

from textual.widgets import Static

from anima_tui.app import WatchApp
from anima_tui.system_stats import GpuReading, SystemReading
from anima_tui.widgets.line_plot import LinePlot, _columns
from anima_tui.widgets.notes_list import NotesList
from anima_tui.widgets.run_stats import RunStats

GIB = 1024**3


def fixed_system():
    return SystemReading(ram_used=12 * GIB, ram_total=64 * GIB, gpus=[GpuReading("Test GPU", 20 * GIB, 80 * GIB, 87)])


def step(n, loss):
    return {
        "v": 1, "type": "step", "time": 1000.0 + n, "step": n, "epoch": 1 + n // 5, "loss": loss, "loss_avg": 0.25,
        "lr": 1e-4 * n, "it_per_s": 0.5, "s_per_it": 2.0, "eta_s": 3725, "vram_allocated": 5 * GIB,
        "vram_reserved": 6 * GIB, "vram_peak": 7.5 * GIB, "ram_used": 3 * GIB,
    }


def make_run(tmp_path, *, ended=True, extra_lines=""):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "time": 1000.0, "run_id": "demo-run", "versions": {}, "total_steps": 40,
               "total_epochs": 8, "profile": {}, "device": "cuda:0"}]
    events += [step(n, 0.5 - 0.01 * n) for n in range(1, 13)]
    events += [
        {"v": 1, "type": "save", "time": 1013.0, "kind": "lora", "path": "/x/out/demo-000010.safetensors", "step": 10, "epoch": 3},
        {"v": 1, "type": "sample", "time": 1014.0, "path": "/x/samples/s10.png", "prompt": "1girl, solo", "step": 10, "epoch": 3},
        {"v": 1, "type": "warning", "time": 1015.0, "message": "loss is nan at step 11", "step": 11},
    ]
    if ended:
        events.append({"v": 1, "type": "run_end", "time": 1016.0, "status": "finished", "reason": "done", "step": 12, "epoch": 3})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + extra_lines)
    (run / "train.log").write_text("".join(f"line {i}: step {i}\n" for i in range(1, 13)))
    return run


async def polled(pilot) -> None:
    """Let the monitor's file-reading worker (and the read asked for while it ran) finish and show."""
    for _ in range(3):  # the first read starts after the first frame; a poll asked for mid-read follows it
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def plain(widget) -> str:
    renderable = widget.render()
    return str(getattr(renderable, "plain", renderable))


def stats_text(app) -> str:
    console = Console(width=60, record=True, color_system=None)
    console.print(app.screen.query_one(RunStats).content)
    return console.export_text()


def test_monitor_shows_the_numbers_of_the_events(tmp_path):
    asyncio.run(_test_monitor_shows_the_numbers_of_the_events(tmp_path))


async def _test_monitor_shows_the_numbers_of_the_events(tmp_path):
    run = make_run(tmp_path)
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        title = plain(app.screen.query_one("#title", Static))
        assert "demo-run" in title and "finished" in title and "step 12/40" in title and "epoch 3/8" in title
        stats = stats_text(app)
        # An ended run shows what it did (mean speed, time taken, how it ended), not a live speed and ETA.
        for shown in ("0.3800", "avg 0.2500", "1.20e-03", "2.00 s/it mean", "took  0m16s", "ended finished: done",
                      "5.00G alloc", "6.00G res", "7.50G", "20.00G/80.00G 87%", "12.00G/64.00G"):
            assert shown in stats, shown
        assert "ETA" not in stats
        state = app.screen.state
        assert state.losses == [0.5 - 0.01 * n for n in range(1, 13)]
        assert len(state.smoothed) == 12 and state.smoothed[0] == state.losses[0]
        notes = app.screen.query_one(NotesList)
        assert notes.row_count == 3
        assert "demo-000010.safetensors" in str(notes.get_row_at(0)[2])
        assert "nan at step 11" in str(notes.get_row_at(2)[2])
        assert "line 12: step 12" in app.screen.query_one("#log").texts


def test_monitor_follows_new_lines_and_survives_bad_ones(tmp_path):
    asyncio.run(_test_monitor_follows_new_lines_and_survives_bad_ones(tmp_path))


async def _test_monitor_follows_new_lines_and_survives_bad_ones(tmp_path):
    run = make_run(tmp_path, ended=False, extra_lines='{"v": 1, "type": "step", "step": "twelve", "loss": "nan"}\nthis is not json\n')
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        assert app.screen.state.bad_lines == 1
        with open(run / "events.jsonl", "a") as handle:
            handle.write(json.dumps(step(13, 0.2)) + "\n" + '{"v": 1, "type": "step", "step": 14, "loss": Infinity}\n' + "\xff garbage\n" + '{"v": 1, "ty')
        app.screen.poll()
        await polled(pilot)
        state = app.screen.state
        assert state.bad_lines == 2
        assert state.losses[-1] == 0.2 and state.last_step["step"] == 14
        assert "14/40" in plain(app.screen.query_one("#title", Static))
        with open(run / "events.jsonl", "a") as handle:
            handle.write('\n' + json.dumps({**step(15, 0.1), "lr": [3e-4, 1e-4], "vram_peak": None}) + "\n")
        app.screen.poll()
        await polled(pilot)
        assert state.lrs[-1] == 3e-4
        assert "3.00e-04 (groups differ)" in stats_text(app) and "peak    –" in stats_text(app)


def test_ended_run_gets_no_control_files_and_launch_log_is_shown_without_train_log(tmp_path):
    asyncio.run(_ended(tmp_path))


async def _ended(tmp_path):
    run = make_run(tmp_path, ended=True)
    (run / "train.log").unlink()
    (run / "launch.log").write_text("anima-train: 1 problem(s) in the profile\n")
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        await pilot.press("s")
        await pilot.pause()
        assert not (run / "control" / "save").exists()
        log = app.screen.query_one("#log")
        assert log.border_title == "launch.log" and "1 problem(s) in the profile" in log.texts[0]


def test_plot_downsamples_and_ignores_non_finite_values():
    values = [float(i % 7) for i in range(5000)] + [float("nan"), float("inf"), None, "x"]
    columns = _columns(values, 40, band=True)
    assert len(columns) == 40 and all(c == (0.0, 6.0) for c in columns)
    assert _columns(values, 40, band=False)[0] == (sum(i % 7 for i in range(125)) / 125,) * 2
    assert _columns([float("nan")], 10, band=False) == [None] * 10
    assert [c[0] for c in _columns([0.0, 3.0], 4, band=False)] == [0.0, 1.0, 2.0, 3.0]


def test_controls_create_control_files_and_stop_asks_first(tmp_path):
    asyncio.run(_test_controls_create_control_files_and_stop_asks_first(tmp_path))


async def _test_controls_create_control_files_and_stop_asks_first(tmp_path):
    run = make_run(tmp_path, ended=False)
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        assert "ETA   1h02m" in stats_text(app) and "speed 2.00 s/it  " in stats_text(app)  # a live run: live figures
        await pilot.press("s")
        await pilot.pause()
        assert (run / "control" / "save").exists()
        await pilot.press("x")
        await pilot.pause()
        assert not (run / "control" / "stop").exists()
        await pilot.press("n")
        await pilot.pause()
        assert not (run / "control" / "stop").exists()
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert (run / "control" / "stop").exists()


def test_the_command_palette_offers_the_apps_commands(tmp_path):
    asyncio.run(_palette(tmp_path))


async def _palette(tmp_path):
    from textual.command import CommandPalette

    from anima_tui.dialogs import ConfirmScreen

    run = make_run(tmp_path, ended=False)
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(80, 24)) as pilot:
        await polled(pilot)
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert {"Save now", "Stop run", "Previews", "Quit"} <= set(titles) and "Launch run" not in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"stop run")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, ConfirmScreen) and "Stop this run?" in app.screen.question
        await pilot.press("y")
        await pilot.pause()
        assert (run / "control" / "stop").exists()


def test_monitor_shows_one_vram_line_per_process(tmp_path):
    asyncio.run(_test_monitor_shows_one_vram_line_per_process(tmp_path))


async def _test_monitor_shows_one_vram_line_per_process(tmp_path):
    processes = [{"device": f"cuda:{i}", "vram_allocated": (5 + i) * GIB, "vram_peak": (8 + i) * GIB} for i in range(2)]
    run = make_run(tmp_path, extra_lines=json.dumps({**step(13, 0.3), "processes": processes}) + "\n")
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        stats = stats_text(app)
        for shown in ("VRAM 0", "5.00G alloc 8.00G peak", "VRAM 1", "6.00G alloc 9.00G peak"):
            assert shown in stats, shown


def test_a_nearly_flat_learning_rate_is_labelled_and_said_to_be_zoomed(tmp_path):
    from anima_tui.widgets.line_plot import tick_labels

    assert tick_labels(0.002, 0.00195) == ("0.002", "0.00195")
    assert tick_labels(2e-3, 1.9999e-3) == ("0.002", "0.0019999")
    assert tick_labels(1e-4, 7.5e-6) == ("0.0001", "7.5e-6")
    asyncio.run(_flat_lr(tmp_path))


async def _flat_lr(tmp_path):
    run = tmp_path / "runs" / "flat"
    run.mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "time": 0.0, "run_id": "flat", "total_steps": 1000}]
    # A cosine schedule's first steps: the rate barely moves, yet the line would fill the plot's height.
    events += [{**step(n, 0.3), "lr": 2e-3 * (1 - 1e-5 * n)} for n in range(1, 60)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    app = WatchApp(run, probe=fixed_system)
    async with app.run_test(size=(120, 40)) as pilot:
        await polled(pilot)
        lines = plain(app.screen.query_one("#lr", LinePlot)).splitlines()
        assert lines[0].startswith("learning rate · zoomed: range")
        labels = [line.split("┤")[0].strip() for line in lines[1:] if line.split("┤")[0].strip()]
        assert len(labels) == 2 and labels[0] != labels[1] and float(labels[0]) > float(labels[1])
