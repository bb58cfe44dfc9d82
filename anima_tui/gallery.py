"""The previews gallery: a prompt × step grid of a run's previews, one image large, and the contact sheets.

The grid holds only the tiles the screen can show and moves a window over the index as the cursor moves,
so a run with hundreds of renders costs no more than a screenful of thumbnails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from anima_tui.preview_index import Preview, PreviewIndex
from anima_tui.widgets.preview_image import (
    Loaded,
    PreviewTile,
    UnreadableImage,
    decode,
    first_readable,
    skipped_note,
)

LABEL_WIDTH = 16  # the prompt column
MIN_TILE_HEIGHT = 6  # a bordered tile: 4 rows of image
MAX_TILE_HEIGHT = 16
POLL_SECONDS = 0.5


def _step_label(step: int | None) -> str:
    return "?" if step is None else str(step)


class PreviewGrid(Container):
    """Prompts down, steps across; `cursor` is (prompt row, step column) in the whole index."""

    class Moved(Message):
        """The cursor or what is under it changed."""

    def __init__(self, run_dir: Path, index: PreviewIndex, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)
        self.index = index
        self.cursor = (0, len(index.steps) - 1)  # the newest step of the first prompt
        self.top = self.left = 0
        self.shape = (0, 0)  # (rows, columns) of tiles on screen
        self._tile = (0, 0)  # (width, height) of a tile in cells

    def tile_size(self) -> tuple[int, int]:
        """Tiles as tall as the prompts allow, within bounds, and wide enough for a square image (a terminal
        cell is about twice as tall as it is wide)."""
        prompts = max(len(self.index.prompts), 1)
        height = min(max((self.size.height - 1) // prompts, MIN_TILE_HEIGHT), MAX_TILE_HEIGHT)
        return 2 * (height - 2) + 2, height

    def on_resize(self) -> None:
        self._lay_out()

    def _lay_out(self) -> bool:
        """Rebuild the tiles when the shape the screen allows changed; True when it did."""
        tile_width, tile_height = self.tile_size()
        rows = max(1, (self.size.height - 1) // tile_height)
        columns = max(1, (self.size.width - LABEL_WIDTH) // tile_width)
        if (rows, columns, tile_width, tile_height) == self.shape + self._tile or not self.size.area:
            return False
        self.shape, self._tile = (rows, columns), (tile_width, tile_height)
        self.styles.grid_size_columns = columns + 1
        self.styles.grid_size_rows = rows + 1
        self.styles.grid_columns = f"{LABEL_WIDTH} " + " ".join([str(tile_width)] * columns)
        self.styles.grid_rows = "1 " + " ".join([str(tile_height)] * rows)
        self.remove_children()
        cells = [Static(classes="corner")]
        cells += [Static(classes="step-label") for _ in range(columns)]
        for _ in range(rows):
            cells.append(Static(classes="prompt-label"))
            cells += [PreviewTile(classes="cell") for _ in range(columns)]
        self.mount_all(cells)
        self.call_after_refresh(self.show)
        return True

    def move(self, rows: int = 0, columns: int = 0, *, to_column: int | None = None) -> None:
        prompts, steps = len(self.index.prompts), len(self.index.steps)
        row = min(max(self.cursor[0] + rows, 0), max(prompts - 1, 0))
        column = self.cursor[1] + columns if to_column is None else to_column
        self.cursor = (row, min(max(column, 0), max(steps - 1, 0)))
        self.show()

    def selected(self) -> Preview | None:
        prompts, steps = self.index.prompts, self.index.steps
        row, column = self.cursor
        if row >= len(prompts) or column >= len(steps):
            return None
        return self.index.at(prompts[row], steps[column])

    def show(self) -> None:
        if self._lay_out():
            return  # shown once the new tiles are mounted
        rows, columns = self.shape
        if not rows:
            return
        prompts, steps = self.index.prompts, self.index.steps
        row, column = self.cursor
        if column < 0:  # the grid opened before the first preview arrived
            self.cursor = (row, column := max(len(steps) - 1, 0))
        # Keep the cursor inside the window, and the window no further right or down than the index needs;
        # otherwise leave it where the user put it.
        self.top = min(max(self.top, row - rows + 1), row, max(len(prompts) - rows, 0))
        self.left = min(max(self.left, column - columns + 1), column, max(len(steps) - columns, 0))
        for c, label in enumerate(self.query(".step-label").results(Static)):
            at = self.left + c
            label.update(Text(f"step {_step_label(steps[at])}", style="bold" if at == column else "") if at < len(steps) else "")
        self.query_one(".corner", Static).update(Text("prompt \\ step", style="dim"))
        labels = list(self.query(".prompt-label").results(Static))
        tiles = list(self.query(".cell").results(PreviewTile))
        for r in range(rows):
            at_row = self.top + r
            key = prompts[at_row] if at_row < len(prompts) else None
            labels[r].update(Text(self.index.prompt_text(key), style="bold" if at_row == row else "") if key else "")
            for c in range(columns):
                tile = tiles[r * columns + c]
                at_column = self.left + c
                tile.set_class(at_row == row and at_column == column, "-cursor")
                preview = self.index.at(key, steps[at_column]) if key and at_column < len(steps) else None
                if preview is None:
                    tile.clear(Text("·", style="dim") if key and at_column < len(steps) else "")
                else:
                    tile.load((preview,), lambda box, p=preview: first_readable([p], self.run_dir, box), _grid_caption)
        self.post_message(self.Moved())


def _grid_caption(loaded: Loaded) -> Text:
    return Text("unreadable", style="yellow") if loaded.skipped else Text("")


@dataclass(frozen=True)
class Frame:
    """One picture of the large view: a title and how to load it."""

    title: str
    load: Callable[[tuple[int, int]], Loaded]


class GalleryScreen(Screen):
    CSS_PATH = "gallery.tcss"
    BINDINGS = [
        Binding("left,h", "move(0, -1)", "Step", show=False),
        Binding("right,l", "move(0, 1)", "Step", show=False),
        Binding("up,k", "move(-1, 0)", "Prompt", show=False),
        Binding("down,j", "move(1, 0)", "Prompt", show=False),
        Binding("home", "first", "First step", show=False),
        Binding("end", "last", "Last step", show=False),
        Binding("enter", "open", "Open large"),
        Binding("c", "sheet", "Contact sheet"),
        Binding("escape", "app.pop_screen", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, run_dir: Path, index: PreviewIndex) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.index = index
        self._revision = index.revision

    def compose(self) -> ComposeResult:
        yield Static(id="gallery-title")
        yield PreviewGrid(self.run_dir, self.index, id="grid")
        yield Static(id="gallery-status")
        yield Footer()

    def on_mount(self) -> None:
        self._title()
        self.set_interval(POLL_SECONDS, self._follow)

    def _follow(self) -> None:
        """New previews (read by the monitor underneath) appear in the grid as they arrive."""
        if self.index.revision != self._revision:
            self._revision = self.index.revision
            self._title()
            self.query_one(PreviewGrid).show()

    def _title(self) -> None:
        index = self.index
        text = f"[b]{self.run_dir.name}[/b] · previews · {len(index.prompts)} prompt(s) × {len(index.steps)} step(s)"
        if not len(index):
            text += " · none yet; they appear here as the run renders them"
        self.query_one("#gallery-title", Static).update(text)

    @property
    def grid(self) -> PreviewGrid:
        return self.query_one(PreviewGrid)

    def on_preview_grid_moved(self) -> None:
        grid = self.grid
        preview = grid.selected()
        status = Text()
        if preview is not None:
            row = grid.cursor[0]
            status.append(f"prompt {row + 1}/{len(self.index.prompts)} · {preview.caption()} · ", "bold")
            status.append(preview.prompt)
        self.query_one("#gallery-status", Static).update(status)

    def action_move(self, rows: int, columns: int) -> None:
        self.grid.move(rows, columns)

    def action_first(self) -> None:
        self.grid.move(to_column=0)

    def action_last(self) -> None:
        self.grid.move(to_column=len(self.index.steps) - 1)

    def action_open(self) -> None:
        """The selected preview large; left and right step through its prompt's history."""
        grid = self.grid
        preview = grid.selected()
        if preview is None:
            self.notify("no preview of this prompt at this step", severity="warning")
            return
        history = self.index.history(preview.prompt_key)
        frames = [
            Frame(f"{p.caption()} · {p.prompt}", lambda box, p=p: first_readable([p], self.run_dir, box)) for p in history
        ]
        self.app.push_screen(ViewerScreen(frames, history.index(preview)))

    def action_sheet(self) -> None:
        """The contact sheet of the selected step; left and right go to the other steps' sheets."""
        steps = self.index.steps
        if not steps:
            self.notify("no previews yet", severity="warning")
            return
        frames = [
            Frame(f"contact sheet · step {_step_label(step)}",
                  lambda box, column=self.index.column(step): sheet_of(column, self.run_dir, box))
            for step in steps
        ]
        self.app.push_screen(ViewerScreen(frames, min(max(self.grid.cursor[1], 0), len(steps) - 1)))


def sheet_of(column: list[Preview], run_dir: Path, box: tuple[int, int]) -> Loaded:
    """The contact sheet the trainer wrote for this step; when there is none (a single prompt, or a failed
    write) one made the same way from the step's readable previews."""
    first = column[0]
    if first.sheet_name is not None:
        sheet = first.located(run_dir).parent / first.sheet_name
        try:
            return Loaded(decode(sheet, box), first)
        except UnreadableImage:
            pass
    images, skipped = [], []
    for preview in column:
        try:
            images.append(decode(preview.located(run_dir), box))
        except UnreadableImage as exc:
            skipped.append(str(exc))
    if not images:
        return Loaded(None, None, tuple(skipped))
    from anima_core.sampling.sheet import contact_sheet  # the sampling package imports torch: not at start-up

    sheet = contact_sheet(images, height=min(image.height for image in images))
    sheet.thumbnail(box)
    return Loaded(sheet, first, tuple(skipped))


class ViewerScreen(Screen):
    """One picture as large as the terminal allows; left and right move through its frames."""

    CSS_PATH = "gallery.tcss"
    BINDINGS = [
        Binding("left,h", "step(-1)", "Previous"),
        Binding("right,l", "step(1)", "Next"),
        Binding("escape,enter", "app.pop_screen", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, frames: list[Frame], at: int) -> None:
        super().__init__()
        self.frames = frames
        self.at = at

    def compose(self) -> ComposeResult:
        yield Static(id="viewer-title")
        yield PreviewTile(id="large")
        yield Footer()

    def on_mount(self) -> None:
        self._show()

    def action_step(self, delta: int) -> None:
        self.at = min(max(self.at + delta, 0), len(self.frames) - 1)
        self._show()

    def _show(self) -> None:
        frame = self.frames[self.at]
        self.query_one("#viewer-title", Static).update(
            Text.assemble((f"{self.at + 1}/{len(self.frames)} ", "bold"), frame.title)
        )
        self.query_one(PreviewTile).load((self.at,), frame.load, _viewer_caption)


def _viewer_caption(loaded: Loaded) -> Text:
    if loaded.image is None:
        return Text("nothing to show: " + "; ".join(loaded.skipped), style="yellow")
    return Text(skipped_note(loaded.skipped), style="yellow")
