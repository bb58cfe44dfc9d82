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


LABEL_BAND = 18


def strength_sheet(rows: list[list[Image.Image]], labels: list[str], height: int | None = None) -> Image.Image:
    """A grid: one row per prompt, one column per LoRA strength (a slider's previews), under a band naming the
    columns. Every image is scaled to ``height`` (default: the first image's), aspect kept; each column is as
    wide as its widest image."""
    from PIL import ImageDraw

    height = height or rows[0][0].height
    scaled = [[img.resize((max(1, round(img.width * height / img.height)), height), Image.LANCZOS)
               if img.height != height else img for img in row] for row in rows]
    columns = max(len(row) for row in scaled)
    widths = [max(row[c].width for row in scaled if c < len(row)) for c in range(columns)]
    width = sum(widths) + GAP * (columns - 1)
    sheet = Image.new("RGB", (width, LABEL_BAND + len(scaled) * height + GAP * (len(scaled) - 1)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    x = 0
    for c, w in enumerate(widths):
        if c < len(labels):
            draw.text((x + 4, 3), labels[c], fill=(220, 220, 220))
        for r, row in enumerate(scaled):
            if c < len(row):
                sheet.paste(row[c].convert("RGB"), (x, LABEL_BAND + r * (height + GAP)))
        x += w + GAP
    return sheet
