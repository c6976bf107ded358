"""Pictures for people: labelled grids and contact sheets, and atomic image writes."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from .files import temp_beside


def save_atomic(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically like save_atomic, then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None,
         cell: int = 128, row_titles: list[str] | None = None) -> Image.Image:
    """Images on a white sheet, `columns` wide, each with its label underneath, and each row with
    its title (wrapped) in a left margin."""
    columns = columns or min(len(images), 8) or 1
    rows = math.ceil(len(images) / columns) or 1
    label_h = 14 if labels else 0
    margin = 180 if row_titles else 0
    sheet = Image.new("RGB", (margin + columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, title in enumerate(row_titles or []):
        draw.multiline_text((4, r * (cell + label_h) + 4), textwrap.fill(title, 28), fill="black")
    for i, im in enumerate(images):
        x, y = margin + (i % columns) * cell, (i // columns) * (cell + label_h)
        thumb = ImageOps.contain(im.convert("RGB"), (cell, cell))  # small images are scaled up too
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if labels:
            draw.text((x + 2, y + cell + 1), labels[i][: cell // 6], fill="black")
    return sheet


def stack(sheets: list[Image.Image], gap: int = 8) -> Image.Image:
    """Sheets one above the other, separated by a grey band."""
    out = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets) + gap * (len(sheets) - 1)), "gray")
    y = 0
    for s in sheets:
        out.paste(s, (0, y))
        y += s.height + gap
    return out
