"""Preview images in the terminal: which textual-image renderer draws them, decoding off the event loop, and
the tile (image + caption) that the previews pane and the gallery are built from.

Importing this module lets textual-image ask the terminal what it supports (Kitty graphics, Sixel), which it
can only do before Textual takes over the terminal; the TUI imports it with the monitor, before it starts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static
from textual.worker import Worker, WorkerState
from textual_image import _terminal

# textual-image logs a traceback when the terminal does not answer its cell-size query, then uses a default;
# without a handler Python would print it over the terminal the TUI is about to draw on.
logging.getLogger("textual_image").addHandler(logging.NullHandler())
if _terminal.sys.__stdout__ is not None and _terminal.sys.__stdout__.isatty():
    try:
        _terminal.get_cell_size()
    except ZeroDivisionError:
        # textual-image 0.12 divides by the column count the terminal reports; a pseudo-terminal whose size was
        # never set (some containers, `script`) reports 0. Seed its cache with its own fallback cell size.
        _terminal.get_cell_size._result = _terminal.CellSize(10, 20)

from textual_image import renderable as image_renderables  # noqa: E402 - after the guard above
from textual_image import widget as image_widgets  # noqa: E402
from textual_image._terminal import get_cell_size  # noqa: E402

from anima_core.errors import AnimaError
from anima_tui.preview_index import Preview
from anima_tui.widgets import css_beside

RENDERER_ENV = "ANIMA_TRAIN_IMAGES"
# auto: Kitty graphics or Sixel when the terminal answers that it has them, coloured half blocks otherwise.
WIDGETS = {
    "auto": image_widgets.Image,
    "kitty": image_widgets.TGPImage,
    "sixel": image_widgets.SixelImage,
    "halfblock": image_widgets.HalfcellImage,
    "unicode": image_widgets.UnicodeImage,
}
RENDERABLES = {
    "auto": image_renderables.Image,
    "kitty": image_renderables.TGPImage,
    "sixel": image_renderables.SixelImage,
    "halfblock": image_renderables.HalfcellImage,
    "unicode": image_renderables.UnicodeImage,
}
# What an unreadable image file raises in PIL: missing, truncated or half-written, not an image at all.
UNREADABLE = (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError)
CACHE_SIZE = 256  # decoded, scaled images; thumbnails are a few kB each


class RendererSettingError(AnimaError):
    """ANIMA_TRAIN_IMAGES names no renderer."""


def renderer_name() -> str:
    name = os.environ.get(RENDERER_ENV, "auto").strip().lower() or "auto"
    if name not in WIDGETS:
        raise RendererSettingError(
            f"{RENDERER_ENV}={os.environ[RENDERER_ENV]!r} names no image renderer; use one of {', '.join(WIDGETS)} "
            "(halfblock works in every terminal, tmux included)."
        )
    return name


def image_widget_class() -> type[Widget]:
    return WIDGETS[renderer_name()]


def image_renderable(image: PILImage.Image, width: int | str | None = None, height: int | str | None = None):
    """A Rich renderable of the image with the chosen renderer, for printing outside the TUI."""
    return RENDERABLES[renderer_name()](image, width, height)


def pixel_box(cells_wide: int, cells_high: int) -> tuple[int, int]:
    """The pixels a region of terminal cells shows; images are scaled to it before they reach the renderer."""
    cell = get_cell_size()
    return max(1, cells_wide) * cell.width, max(1, cells_high) * cell.height


def print_images(paths: Sequence[Path], console) -> None:
    """Each image under its file name, as large as the console allows (`anima-train sample --show`)."""
    for path in paths:
        console.print(Text(str(path), style="bold"), soft_wrap=True)
        try:
            image = decode(Path(path), pixel_box(console.width, max(1, console.height - 2)))
        except UnreadableImage as exc:
            console.print(f"[yellow]skipped:[/yellow] {exc}")
            continue
        console.print(image_renderable(image, "auto", "auto"))


class UnreadableImage(Exception):
    """An image file that cannot be shown; the message says which and why."""


_cache: OrderedDict[tuple, PILImage.Image] = OrderedDict()
_cache_lock = threading.Lock()


def decode(path: Path, box: tuple[int, int]) -> PILImage.Image:
    """The image at ``path`` as RGB, scaled down to fit ``box`` pixels (aspect kept). Blocking: run it in a
    worker. Raises UnreadableImage for a missing, truncated or otherwise undecodable file."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, box)
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        with PILImage.open(path) as opened:
            opened.load()  # a truncated file fails here, not at open
            image = opened.convert("RGB")
    except UNREADABLE as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        raise UnreadableImage(f"{path.name}: {reason}") from exc
    image.thumbnail(box, PILImage.LANCZOS)
    with _cache_lock:
        _cache[key] = image
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return image


@dataclass(frozen=True)
class Loaded:
    """What a tile shows: the image (None when nothing was readable), which preview it is, and a note naming
    every file passed over."""

    image: PILImage.Image | None
    preview: Preview | None
    skipped: tuple[str, ...] = ()


def first_readable(previews: Sequence[Preview], run_dir: Path, box: tuple[int, int]) -> Loaded:
    """The first preview whose file decodes, in the order given (newest first for "latest of a prompt")."""
    skipped = []
    for preview in previews:
        try:
            return Loaded(decode(preview.located(run_dir), box), preview, tuple(skipped))
        except UnreadableImage as exc:
            skipped.append(str(exc))
    return Loaded(None, None, tuple(skipped))


def skipped_note(skipped: Sequence[str]) -> str:
    return "skipped " + "; ".join(skipped) if skipped else ""


class PreviewTile(Vertical):
    """One image with its caption lines. `load` hands the tile a blocking loader (run in a thread worker,
    results of superseded loads dropped) and a function that writes the caption from what was loaded."""

    DEFAULT_CSS = css_beside(__file__)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._request: tuple | None = None
        self._loader: Callable[[tuple[int, int]], Loaded] | None = None
        self._captioner: Callable[[Loaded], Text | str] = lambda loaded: ""
        self.loaded: Loaded | None = None
        self._image = image_widget_class()(classes="image")
        self._frame = Vertical(self._image, classes="frame")
        self._caption = Static(classes="caption")

    def compose(self) -> ComposeResult:
        yield self._frame
        yield self._caption

    def load(self, key: tuple, loader: Callable[[tuple[int, int]], Loaded], captioner: Callable[[Loaded], Text | str]) -> None:
        """Show what ``loader`` returns; a call with the same ``key`` as the one shown does nothing."""
        if key == self._request:
            return
        self._request, self._loader, self._captioner = key, loader, captioner
        self.loaded = None
        self._start()

    @property
    def pending(self) -> bool:
        """An image was asked for and has not arrived yet."""
        return self._request is not None and self.loaded is None

    def clear(self, caption: Text | str = "") -> None:
        self._request = self._loader = None
        self.loaded = None
        self.workers.cancel_group(self, "decode")
        self._set(None, caption)

    def on_resize(self) -> None:
        self._start()

    def _start(self) -> None:
        frame = self._frame
        if self._loader is None or frame.size.area == 0:
            return  # loaded once laid out, on the first resize
        box = pixel_box(frame.size.width, frame.size.height)
        loader, request = self._loader, self._request
        self.run_worker(lambda: (request, loader(box)), thread=True, exclusive=True, group="decode",
                        name=f"decode {request}")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.SUCCESS or event.worker.group != "decode":
            return
        request, loaded = event.worker.result
        if request != self._request:
            return  # a newer image was asked for meanwhile
        self.loaded = loaded
        self._set(loaded.image, self._captioner(loaded))

    def _set(self, image: PILImage.Image | None, caption: Text | str) -> None:
        self._image.image = image
        self._caption.update(caption)
