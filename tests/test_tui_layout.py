"""Every screen usable at 80×24: what must be on screen there, read from the rendered terminal text."""

import asyncio

from test_tui_snapshots import PROFILE, fixed_system, recorded_run, validated
from tui_helpers import screen_text

from anima_tui.app import AnimaApp, WatchApp
from anima_tui.widgets.log_tail import LogTail

SMALL = (80, 24)


async def settled(pilot) -> None:
    """Workers done and shown, twice: a poll asked for during a running read starts when that read ends."""
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def test_home_at_80x24_shows_quit_and_each_runs_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded_run(tmp_path / "output")

    async def go():
        async with AnimaApp(None).run_test(size=SMALL) as pilot:
            await settled(pilot)
            return screen_text(pilot.app)

    text = asyncio.run(go())
    print(text)
    assert "q Quit" in text.splitlines()[-1]
    assert "stopped  5000/10000  20261201-090000-snap" in text


def test_monitor_at_80x24_shows_whole_log_lines_and_keeps_following(tmp_path):
    run = recorded_run(tmp_path, ended=False)

    async def go():
        async with WatchApp(run, probe=fixed_system).run_test(size=SMALL) as pilot:
            await settled(pilot)
            text = screen_text(pilot.app)
            log = pilot.app.screen.query_one(LogTail)
            # A log line wraps instead of being cut: its last field is on screen, and nothing scrolls sideways.
            assert "step=5000 epoch=11" in text.replace("│\n│", "") and "vram_peak=1.181e+10" in text
            assert log.max_scroll_x == 0
            with open(run / "train.log", "a") as handle:
                handle.write("2026-12-01 10:00:00 warning   message=new line one\n")
            pilot.app.screen.poll()
            await settled(pilot)
            assert "message=new line one" in screen_text(pilot.app), "the log follows the run"
            log.scroll_home(animate=False)  # scrolled up to read: new lines must not yank the view away
            await pilot.pause()
            with open(run / "train.log", "a") as handle:
                handle.write("2026-12-01 10:00:01 warning   message=new line two\n")
            pilot.app.screen.poll()
            await settled(pilot)
            assert log.scroll_y == 0 and "message=new line two" not in screen_text(pilot.app)
            log.scroll_end(animate=False)
            await pilot.pause()
            with open(run / "train.log", "a") as handle:
                handle.write("2026-12-01 10:00:02 warning   message=new line three\n")
            pilot.app.screen.poll()
            await settled(pilot)
            assert "message=new line three" in screen_text(pilot.app), "back at the bottom, it follows again"
            return text

    print(asyncio.run(go()))


def test_editor_at_80x24_never_breaks_a_field_name(tmp_path, monkeypatch):
    monkeypatch.setattr("anima_core.config.load.cross_field_problems", lambda profile, plugins=None: [])
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)

    async def go():
        async with AnimaApp(profile).run_test(size=SMALL) as pilot:
            pilot.app.screen.show_table("training")
            await validated(pilot)
            field = pilot.app.screen.query_one("#field-training-gradient_accumulation_steps")
            pilot.app.screen.query_one("#table-training").scroll_to_widget(field, animate=False)
            await pilot.pause()
            return screen_text(pilot.app)

    text = asyncio.run(go())
    print(text)
    assert "gradient_accumulation_steps 2" in text.replace("  ", " ")
    assert "q Quit" not in text and "^s Save" in text.splitlines()[-1]


def test_diff_dialog_at_80x24_shows_its_buttons_and_scrolls_to_the_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("anima_core.config.load.cross_field_problems", lambda profile, plugins=None: [])
    template = tmp_path / "template.toml"
    template.write_text(PROFILE + "".join(f"# line {i} of a long template\n" for i in range(60)))

    async def go():
        from anima_tui.editor import EditorScreen
        from anima_tui.profile_draft import ProfileDraft

        async with AnimaApp(None).run_test(size=SMALL) as pilot:
            pilot.app.push_screen(EditorScreen(ProfileDraft.open(tmp_path / "new.toml", start_from=template)))
            await validated(pilot)
            await pilot.press("ctrl+s")
            await pilot.pause()
            first = screen_text(pilot.app)
            await pilot.press("end")
            await pilot.pause()
            return first, screen_text(pilot.app)

    first, scrolled = asyncio.run(go())
    print(first, scrolled)
    assert "Write new.toml?" in first and "Yes (y)" in first and "No (n)" in first
    assert "line 59 of a long template" not in first and "line 59 of a long template" in scrolled
    assert "Yes (y)" in scrolled
