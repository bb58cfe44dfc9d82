"""The monitor's previews pane: the newest readable preview of each prompt, with its step, epoch and prompt."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.containers import HorizontalScroll

from anima_tui.preview_index import PreviewIndex
from anima_tui.widgets import css_beside
from anima_tui.widgets.preview_image import Loaded, PreviewTile, first_readable, skipped_note

MIN_TILE_WIDTH = 16


class PreviewPane(HorizontalScroll):
    """Hidden until the run has a preview; one tile per prompt, scrolling sideways when they do not fit."""

    DEFAULT_CSS = css_beside(__file__)
    SCOPED_CSS = False  # the stylesheet folds the pane on a narrow screen, a selector above the pane

    def __init__(self, run_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)
        self._revision = -1
        self.add_class("-empty")

    def on_mount(self) -> None:
        self.border_title = "previews · g gallery"

    def show(self, index: PreviewIndex) -> None:
        if index.revision == self._revision:
            return
        self._revision = index.revision
        self.set_class(len(index) == 0, "-empty")
        tiles = list(self.query(PreviewTile))
        if len(tiles) < len(index.prompts):
            new = [PreviewTile() for _ in range(len(index.prompts) - len(tiles))]
            self.mount_all(new)
            tiles += new
        self._fit(tiles)
        for tile, key in zip(tiles, index.prompts):
            newest_first = index.history(key)[::-1]
            prompt = index.prompt_text(key)
            tile.load(
                tuple(newest_first),
                lambda box, previews=newest_first: first_readable(previews, self.run_dir, box),
                lambda loaded, prompt=prompt: _caption(loaded, prompt),
            )

    def on_resize(self) -> None:
        self._fit(list(self.query(PreviewTile)))

    def _fit(self, tiles: list[PreviewTile]) -> None:
        """Share the width among the prompts, down to a readable tile; more prompts scroll sideways."""
        if tiles and self.content_size.width:
            width = max(MIN_TILE_WIDTH, self.content_size.width // len(tiles))
            for tile in tiles:
                tile.styles.width = width


def _caption(loaded: Loaded, prompt: str) -> Text:
    caption = Text()
    if loaded.preview is not None:
        caption.append(loaded.preview.caption(), "bold")
    else:
        caption.append("no readable image", "yellow")
    caption.append("\n" + prompt)
    if loaded.skipped:
        caption.append("\n" + skipped_note(loaded.skipped), "yellow")
    return caption
