"""The monitor: attaches to a run directory, shows its whole history, then follows it by polling files.

Files are read in a worker thread (a long run's events.jsonl is megabytes), so keys and redraws never wait on
them. Below 100 columns (Textual's -narrow breakpoint class) the log and the notes stack under the plots at
full width and the previews pane folds away.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from anima_core import runctl
from anima_tui.dialogs import ConfirmScreen
from anima_tui.gallery import GalleryScreen
from anima_tui.run_state import RunState
from anima_tui.system_stats import SystemReading, probe_system
from anima_tui.widgets.line_plot import LinePlot, Series
from anima_tui.widgets.log_tail import LogTail
from anima_tui.widgets.notes_list import NotesList
from anima_tui.widgets.preview_pane import PreviewPane
from anima_tui.widgets.run_stats import RunStats, of_total

POLL_SECONDS = 0.5


class MonitorScreen(Screen):
    CSS_PATH = "monitor.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # monitor.tcss: the narrow layout
    BINDINGS = [
        Binding("s", "save_now", "Save now"),
        Binding("x", "stop", "Stop"),
        Binding("g", "gallery", "Previews"),
        Binding("escape", "back", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, run_dir: Path, *, probe: Callable[[], SystemReading] = probe_system, poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.state = RunState(run_id=self.run_dir.name)
        self._probe = probe
        self._poll_seconds = poll_seconds
        self._offset = 0
        self._polling = False
        self._poll_again = False  # a poll asked for while a read was running: read again when it ends

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal(id="top"):
            with Vertical(id="plots"):
                yield LinePlot("loss (raw, EMA)", id="loss")
                yield LinePlot("learning rate", id="lr")
            yield RunStats(id="stats")
        with Horizontal(id="bottom"):
            yield LogTail(self.run_dir / "train.log", self.run_dir / runctl.LAUNCH_LOG, id="log")
            yield NotesList(id="notes")
            yield PreviewPane(self.run_dir, id="previews")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#stats").border_title = "run"
        self.query_one("#log").border_title = self.query_one(LogTail).path.name
        self.query_one("#notes").border_title = "saves · samples · warnings"
        self.call_after_refresh(self.poll)  # the first frame first, then the (long) history
        self.set_interval(self._poll_seconds, self.poll)

    def poll(self) -> None:
        """Read what the run wrote since the last poll, in a worker thread; one read at a time."""
        if self._polling:
            self._poll_again = True
            return
        self._polling = True
        self._read()

    @work(thread=True, group="poll")
    def _read(self) -> tuple:
        read = runctl.read_events(self.run_dir / "events.jsonl", self._offset)
        return read, self.query_one(LogTail).read_new(), self._probe()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "poll" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        self._polling = False
        if self._poll_again:
            self._poll_again = False
            self.poll()
        if event.state == WorkerState.ERROR:
            return
        read, lines, system = event.worker.result
        self._offset = read.offset
        self.state.add(read.events, read.bad_lines)
        self.query_one(LogTail).show(lines)
        self._show(system)

    def run_status(self) -> str:
        if self.state.status is not None:
            return self.state.status
        pid = self.state.pid or runctl.run_info(self.run_dir).pid
        if runctl.pid_alive(pid):
            return "running" if self.state.events_seen else "starting"
        return "no trainer process" if self.state.events_seen else "waiting for events"

    def _show(self, system: SystemReading) -> None:
        state = self.state
        step = state.last_step
        progress = f"step {of_total(step.get('step'), state.total_steps)} · epoch {of_total(step.get('epoch'), state.total_epochs)}"
        progress = state.cache_progress or progress  # before the first step: the data phase and its ETA
        device = f" · {state.device}" if state.device else ""
        self.query_one("#title", Static).update(f"[b]{state.run_id}[/b] · {self.run_status()} · {progress}{device}")
        loss_plot = self.query_one("#loss", LinePlot)
        series = [Series(state.losses, "grey50", band=True), Series(state.smoothed, "bold cyan")]
        extra = []
        if state.validation_losses:  # only runs with a validation split have it; the title says so then
            series.append(Series(state.validation_curve(), "bold yellow"))
            extra.append("validation in yellow")
        if any(v is not None for v in state.prior_losses):  # only runs with prior-preservation samples
            series.append(Series(state.prior_losses, "bold green"))
            extra.append("prior in green")
        if extra:
            loss_plot.title = f"loss (raw, EMA, {', '.join(extra)})"
        loss_plot.plot(series)
        self.query_one("#lr", LinePlot).plot([Series(state.lrs, "magenta")])
        self.query_one(RunStats).show(state, system)
        self.query_one(NotesList).show(state.notes)
        self.query_one(PreviewPane).show(state.previews)

    def action_save_now(self) -> None:
        self._request("save", "save requested; the trainer saves at the end of the current step")

    def action_stop(self) -> None:
        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self._request("stop", "stop requested; the trainer saves, then exits")

        self.app.push_screen(ConfirmScreen("Stop this run? It saves a LoRA and its state, then exits."), answered)

    def _request(self, action: str, message: str) -> None:
        if self.state.status is not None:
            # A control file left in an ended run would act on the next resume in this directory.
            self.notify(f"the run has ended ({self.state.status}); nothing to {action}", severity="warning")
            return
        try:
            runctl.request(self.run_dir, action)
        except (OSError, runctl.RunDirError) as exc:
            self.notify(str(exc), severity="error")
        else:
            self.notify(message)

    def action_gallery(self) -> None:
        self.app.push_screen(GalleryScreen(self.run_dir, self.state.previews))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:
            self.app.exit()
