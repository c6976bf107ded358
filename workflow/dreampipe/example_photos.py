"""The embedded example's "photos": a distinctive toy robot drawn deterministically, in varied
sizes, aspect ratios and backgrounds, one PNG with transparency and one JPEG whose EXIF tag says
it must be rotated, so the example exercises what real photo folders need."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

# (width, height, background or None for transparent, file type, EXIF orientation)
SHOTS = [(96, 96, (250, 250, 250), "png", None), (120, 80, (190, 220, 255), "png", None),
         (80, 128, None, "png", None), (100, 100, (255, 240, 200), "jpg", 6),
         (160, 120, (220, 255, 220), "jpg", None), (72, 72, (235, 235, 235), "png", None)]


def draw_robot(w: int, h: int, background, rng: random.Random) -> Image.Image:
    im = Image.new("RGBA", (w, h), background + (255,) if background else (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    s = min(w, h) * rng.uniform(0.55, 0.75)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    body = [cx - s * 0.3, cy - s * 0.1, cx + s * 0.3, cy + s * 0.45]
    d.rectangle(body, fill=(30, 90, 200))                                     # blue body
    d.ellipse([cx - s * 0.22, cy - s * 0.5, cx + s * 0.22, cy - s * 0.08], fill=(255, 140, 0))  # orange head
    for ex in (-0.09, 0.09):                                                  # green eyes
        d.ellipse([cx + s * (ex - 0.04), cy - s * 0.33, cx + s * (ex + 0.04), cy - s * 0.25], fill=(0, 220, 90))
    for y in (0.05, 0.2, 0.35):                                               # yellow stripes
        d.line([body[0], cy + s * y, body[2], cy + s * y], fill=(255, 220, 0), width=max(1, int(s * 0.04)))
    return im


def write(folder: Path, seed: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, (w, h, bg, kind, orientation) in enumerate(SHOTS):
        im = draw_robot(w, h, bg, rng)
        path = folder / f"robot_{i + 1}.{kind}"
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
    (folder / "robot_2.txt").write_text("a photo of zxq robot on a blue background")
    return paths
