"""A contact sheet: every preview of one render side by side, for a quick look at a save."""

from __future__ import annotations

from PIL import Image

SHEET_HEIGHT = 256
GAP = 4


def contact_sheet(images: list[Image.Image], height: int = SHEET_HEIGHT) -> Image.Image:
    """The images scaled to one height (aspect kept) in a row, on a dark background."""
    scaled = [img.resize((max(1, round(img.width * height / img.height)), height), Image.LANCZOS) for img in images]
    width = sum(img.width for img in scaled) + GAP * (len(scaled) - 1)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    x = 0
    for img in scaled:
        sheet.paste(img.convert("RGB"), (x, 0))
        x += img.width + GAP
    return sheet
