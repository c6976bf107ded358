"""Pictures for people: labelled grids and contact sheets, and atomic image writes."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps


def save_atomic(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None,
         cell: int = 128) -> Image.Image:
    """Images on a white sheet, `columns` wide, each with its label underneath."""
    columns = columns or min(len(images), 8) or 1
    rows = math.ceil(len(images) / columns) or 1
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        thumb = ImageOps.contain(im.convert("RGB"), (cell, cell))  # small images are scaled up too
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if labels:
            draw.text((x + 2, y + cell + 1), labels[i][: cell // 6], fill="black")
    return sheet
