"""Time `prepare` on a folder of phone-sized JPEGs, beside the guide's manual step.

    python bench/prepare_speed.py --photos 100 --workers 1 2

The photos (4000x3000 JPEGs, quality 90, with an sRGB ICC profile like most phone photos, each
different so none is dropped as a duplicate) are generated in a temp dir first; only the
preparation is timed, in wall-clock seconds and in CPU seconds of this process (all threads),
the figure that holds on a machine shared with other work. Baseline: the guide's `mogrify -resize 512x512 -background white -extent
512x512 -gravity center`, one photo after the other, done through wand (the same ImageMagick).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))
from dreampipe import prepare  # noqa: E402


def make_photos(folder: Path, count: int, width: int, height: int) -> None:
    """Smooth colour fields with fine grain: about the size on disk of real phone photos."""
    rng = np.random.default_rng(0)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                          Image.BICUBIC)
        pixels = np.clip(np.asarray(field, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"IMG_{i:04d}.jpg", quality=90, icc_profile=icc)


def guide_mogrify(folder: Path, out: Path, resolution: int) -> None:
    from wand.color import Color
    from wand.image import Image as WandImage

    out.mkdir()
    for src in sorted(folder.glob("*.jpg")):
        with WandImage(filename=str(src)) as img:
            img.transform(resize=f"{resolution}x{resolution}")
            img.background_color = Color("white")
            img.extent(resolution, resolution, gravity="center")
            img.save(filename=str(out / f"{src.stem}.png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=100)
    p.add_argument("--size", default="4000x3000")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-baseline", action="store_true")
    a = p.parse_args()
    width, height = map(int, a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        t = time.perf_counter()
        make_photos(photos, a.photos, width, height)
        mb = sum(f.stat().st_size for f in photos.iterdir()) / 2**20
        print(f"{a.photos} photos {a.size}, {mb:.0f} MiB, generated in {time.perf_counter() - t:.0f} s "
              f"on {platform.processor() or platform.machine()}", flush=True)
        runs = [] if a.no_baseline else [("guide mogrify (wand), sequential",
                                         lambda out: guide_mogrify(photos, out, a.resolution))]
        runs += [(f"dreampipe prepare, workers={w}",
                  lambda out, w=w: prepare.run(photos, out, a.resolution, "pad", "white", "a photo of sks dog",
                                               workers=w))
                 for w in a.workers]
        print("| what | wall s | photos/s | CPU s |\n|---|---|---|---|")
        for i, (name, func) in enumerate(runs):
            t, cpu = time.perf_counter(), time.process_time()
            func(Path(tmp) / f"out{i}")
            s = time.perf_counter() - t
            print(f"| {name} | {s:.1f} | {a.photos / s:.1f} | {time.process_time() - cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
