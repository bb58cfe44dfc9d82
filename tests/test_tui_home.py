"""The start screen lists profiles and runs found on disk and opens the editor and the monitor."""

import asyncio
import json

import pytest

from anima_core.runctl import RunDirError
from anima_tui.app import AnimaApp, run_watch
from anima_tui.editor import EditorScreen
from anima_tui.home import HomeScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft
from anima_tui.widgets.runs_table import RunsTable


def test_home_lists_runs_and_opens_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "base.toml").write_text('# template\n[saving]\noutput_name = "x"\n')
    run = tmp_path / "output" / "runs" / "r1"
    run.mkdir(parents=True)
    events = [{"v": 1, "type": "run_start", "run_id": "r1", "total_steps": 9, "time": 1.0},
              {"v": 1, "type": "step", "step": 4, "loss": 0.1}, {"v": 1, "type": "run_end", "status": "failed"}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    asyncio.run(_home(tmp_path))


async def _home(tmp_path):
    app = AnimaApp(None)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, HomeScreen)
        runs = app.screen.query_one(RunsTable)
        assert runs.row_count == 1
        assert [str(c) for c in runs.get_row_at(0)] == ["failed", "4/9", "r1"]
        await pilot.press("w")
        await pilot.pause()
        assert isinstance(app.screen, MonitorScreen) and app.screen.run_dir == tmp_path / "output" / "runs" / "r1"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, EditorScreen) and app.screen.draft.path.name == "base.toml"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
        await pilot.press("enter")  # accept the proposed name, my-base.toml
        await pilot.pause()
        assert isinstance(app.screen, EditorScreen) and app.screen.draft.path == tmp_path / "my-base.toml"
        assert app.screen.draft.modified
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
    assert (tmp_path / "my-base.toml").read_text() == '# template\n[saving]\noutput_name = "x"\n'


def test_watch_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        run_watch(tmp_path)


def test_the_palette_on_home_and_editor_lists_their_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def go():
        app = AnimaApp(None)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            home = {c.title for c in app.get_system_commands(app.screen)}
            app.push_screen(EditorScreen(ProfileDraft.open(tmp_path / "p.toml")))
            await pilot.pause()
            editor = {c.title for c in app.get_system_commands(app.screen)}
        return home, editor

    home, editor = asyncio.run(go())
    assert {"Edit profile", "Open profile…", "New profile…", "Watch run"} <= home and "Stop run" not in home
    assert {"Save profile", "Launch run", "Use the default"} <= editor and "Watch run" not in editor
