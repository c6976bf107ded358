"""20 photos of 1200x1600 (portrait and landscape) for the end-to-end benchmarks:
python bench/e2e_photos.py DIR [--masks]; with --masks each photo gets its subject mask beside it
(photo_NN.mask.png: the ellipse white, the background black), for the masked loss."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write(folder: Path, count: int = 20, scale: int = 1, masks: bool = False) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = ((1600, 1200) if i % 2 else (1200, 1600))
        w, h = w // scale, h // scale
        im = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
        subject = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
        ImageDraw.Draw(im).ellipse(subject, fill=(150, 40, 200))
        im.save(folder / f"photo_{i:02d}.jpg", quality=92)
        if masks:
            mask = Image.new("L", (w, h))
            ImageDraw.Draw(mask).ellipse(subject, fill=255)
            mask.save(folder / f"photo_{i:02d}.mask.png")


if __name__ == "__main__":
    write(Path(sys.argv[1]), masks="--masks" in sys.argv[2:])
