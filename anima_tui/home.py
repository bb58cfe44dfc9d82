"""The start screen: profiles to edit (yours and the examples in profiles/) and the runs found on disk.

The runs are read in a worker thread (each run's events file is opened), so the screen never waits on disk.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import Worker, WorkerState

from anima_core import runctl
from anima_tui.dialogs import PathPrompt
from anima_tui.editor import EditorScreen
from anima_tui.monitor import MonitorScreen
from anima_tui.profile_draft import ProfileDraft
from anima_tui.widgets.runs_table import RunsTable

REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"
REFRESH_SECONDS = 2.0


def profile_files(folders: list[Path]) -> list[Path]:
    found: dict[Path, None] = {}
    for folder in folders:
        if folder.is_dir():
            found.update(dict.fromkeys(sorted(p.resolve() for p in folder.glob("*.toml"))))
    return list(found)


def output_dir_of(profile: Path) -> Path:
    """Where a profile's runs go, read leniently: a broken profile still has a place to look."""
    try:
        saving = tomllib.loads(profile.read_text(encoding="utf-8")).get("saving", {})
        output = Path(saving.get("output_dir", "output"))
    except (OSError, tomllib.TOMLDecodeError, AttributeError, TypeError):
        output = Path("output")
    return output if output.is_absolute() else profile.parent / output


class HomeScreen(Screen):
    CSS_PATH = "home.tcss"
    BINDINGS = [
        Binding("e", "edit", "Edit"),
        Binding("n", "new", "New"),
        Binding("o", "open", "Open"),
        Binding("w", "watch", "Watch"),
        Binding("r", "refresh", "Refresh", show=False),  # the runs refresh themselves every 2 s
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, roots: list[Path] | None = None) -> None:
        super().__init__()
        self.profile_folders = [Path.cwd() / "profiles", REPO_PROFILES]
        self.extra_roots = list(roots or [])

    def compose(self) -> ComposeResult:
        yield Static("[b]anima-train[/b] · profiles and runs", id="title")
        with Horizontal():
            yield OptionList(id="profiles")
            yield RunsTable(id="runs")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#profiles").border_title = "profiles"
        self.query_one("#runs").border_title = "runs"
        self.action_refresh()
        self.set_interval(REFRESH_SECONDS, self.refresh_runs)

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def profiles(self) -> list[Path]:
        return profile_files(self.profile_folders)

    def run_roots(self) -> list[Path]:
        roots = [Path.cwd() / "output", *self.extra_roots, *(output_dir_of(p) for p in self.profiles())]
        return list(dict.fromkeys(r.resolve() for r in roots))

    def action_refresh(self) -> None:
        options = self.query_one("#profiles", OptionList)
        kept = options.highlighted or 0
        options.clear_options()
        profiles = self.profiles()
        options.add_options(self.profile_options(profiles))
        if profiles:
            options.highlighted = min(kept, options.option_count - 1)
        else:
            options.add_option(Option("(no profiles yet: press o to open or create one)", disabled=True))
        self.refresh_runs()

    @staticmethod
    def profile_options(profiles: list[Path]) -> list[Option]:
        """Yours first; the repository's examples under a heading, as their names may repeat yours."""
        options = [Option(p.name, id=str(p)) for p in profiles if p.parent != REPO_PROFILES]
        examples = [Option(p.name, id=str(p)) for p in profiles if p.parent == REPO_PROFILES]
        if options and examples:
            options.append(Option("── examples ──", disabled=True))
        return options + examples

    def refresh_runs(self) -> None:
        self._read_runs()

    @work(thread=True, exclusive=True, group="runs")
    def _read_runs(self) -> list[runctl.RunInfo]:
        return [run for root in self.run_roots() for run in runctl.list_runs(root)]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "runs" and event.state == WorkerState.SUCCESS:
            self.query_one(RunsTable).show(event.worker.result)

    def highlighted_profile(self) -> Path | None:
        options = self.query_one("#profiles", OptionList)
        if options.highlighted is None:
            return None
        option = options.get_option_at_index(options.highlighted)
        return Path(option.id) if option.id else None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_edit()

    def on_data_table_row_selected(self, event: RunsTable.RowSelected) -> None:
        self.action_watch()

    def action_edit(self) -> None:
        profile = self.highlighted_profile()
        if profile is not None:
            self.app.push_screen(EditorScreen(ProfileDraft.open(profile)))

    def action_new(self) -> None:
        template = self.highlighted_profile()
        if template is None:
            self.notify("highlight a profile to start from", severity="warning")
            return

        def chosen(path: str | None) -> None:
            if path:
                self._edit(Path(path).expanduser(), start_from=template)

        self.app.push_screen(PathPrompt(f"New profile starting from {template.name}; save it as:", f"my-{template.name}"), chosen)

    def action_open(self) -> None:
        def chosen(path: str | None) -> None:
            if path:
                self._edit(Path(path).expanduser())

        self.app.push_screen(PathPrompt("Profile to open or create (.toml):", "profile.toml"), chosen)

    def _edit(self, path: Path, *, start_from: Path | None = None) -> None:
        path = path if path.is_absolute() else Path.cwd() / path
        self.extra_roots.append(output_dir_of(start_from or path))
        self.app.push_screen(EditorScreen(ProfileDraft.open(path, start_from=start_from)))

    def action_watch(self) -> None:
        run = self.query_one(RunsTable).selected()
        if run is not None:
            self.app.push_screen(MonitorScreen(run.run_dir))
