"""The embedded example's "photos": the toy-world subject (toyworld.SUBJECT, an object the toy
base model never saw) drawn by the toy world's own generator, in varied sizes, aspect ratios,
places and backgrounds, one PNG with transparency and one JPEG whose EXIF tag says it must be
rotated, so the example exercises what real photo folders need."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from PIL import Image

from . import toyworld

# (width, height, background or None for transparent, file type, EXIF orientation)
SHOTS = [(96, 96, "white", "png", None), (120, 80, "blue", "png", None),
         (80, 128, None, "png", None), (100, 100, "yellow", "jpg", 6),
         (160, 120, "green", "jpg", None), (72, 72, "orange", "png", None)]
CAPTIONED = {2: "a photo of zxq star on a blue background"}  # sidecar caption of photo 2


def write(folder: Path, seed: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, (w, h, bg, kind, orientation) in enumerate(SHOTS, 1):
        thing = dataclasses.replace(toyworld.SUBJECT, background=bg or "white")
        # the subject stays in the centre square, which prepare's crop mode keeps
        side = min(w, h)
        square = toyworld.draw(thing, rng, side, side, transparent=bg is None)
        im = Image.new(square.mode, (w, h), square.getpixel((0, 0)))
        im.paste(square, ((w - side) // 2, (h - side) // 2))
        path = folder / f"zxq_{i}.{kind}"
        if kind == "jpg":
            rgb = im.convert("RGB")
            exif = Image.Exif()
            if orientation == 6:  # stored rotated; the tag says "rotate 90 CW to display"
                rgb = rgb.transpose(Image.Transpose.ROTATE_90)
                exif[0x0112] = 6
            rgb.save(path, quality=92, exif=exif)
        else:
            im.save(path)
        paths.append(path)
    for i, caption in CAPTIONED.items():
        (folder / f"zxq_{i}.txt").write_text(caption)
    return paths
