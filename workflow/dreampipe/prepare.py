"""Prepare: a folder of photos -> square training images, a manifest and a contact sheet.

The ImageMagick work is the guide's `mogrify -resize 512x512 -background white -extent 512x512
-gravity center`, done through wand, plus what real photo folders need: EXIF orientation, alpha
flattened onto the background, any colourspace and bit depth to 8-bit sRGB.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from .errors import DreampipeError

MODES = ("pad", "crop", "stretch")
IGNORED = {"thumbs.db", "desktop.ini"}


def input_files(instance_dir: Path) -> list[Path]:
    """Photos and caption sidecars in a stable order; hidden files and OS clutter are skipped.
    Imports nothing heavy: the Snakefile calls it to know what prepare depends on."""
    return sorted(p for p in Path(instance_dir).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower() not in IGNORED)


def photo_files(instance_dir: Path) -> list[Path]:
    return [p for p in input_files(instance_dir) if p.suffix.lower() != ".txt"]


def prepare_one(source: Path, resolution: int, mode: str = "pad", background: str = "white"):
    """One photo -> (RGB image of resolution x resolution, description of what was done)."""
    from PIL import Image
    from wand.color import Color
    from wand.image import Image as WandImage

    ops = []
    with WandImage(filename=str(source)) as img:
        info = {"format": img.format, "size": [img.width, img.height]}
        if img.orientation not in ("top_left", "undefined"):
            ops.append(f"auto-orient ({img.orientation})")
        img.auto_orient()
        if img.alpha_channel:
            img.background_color = Color(background)
            img.alpha_channel = "remove"
            ops.append(f"alpha flattened on {background}")
        if img.colorspace != "srgb":
            ops.append(f"{img.colorspace} -> sRGB")
            img.transform_colorspace("srgb")
        img.depth = 8
        shrink = max(img.width, img.height) > resolution
        filter_ = "lanczos" if shrink else "mitchell"
        if mode == "pad":
            img.resize(*_fit(img.width, img.height, resolution), filter=filter_)
            img.background_color = Color(background)
            img.extent(resolution, resolution, gravity="center")
        elif mode == "crop":
            scale = resolution / min(img.width, img.height)
            img.resize(max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)),
                       filter=filter_)
            img.crop(width=resolution, height=resolution, gravity="center")
        else:
            img.resize(resolution, resolution, filter=filter_)
        ops.append(f"{mode} to {resolution}x{resolution}")
        img.strip()
        png = img.make_blob("png")
    return Image.open(io.BytesIO(png)).convert("RGB"), {**info, "operations": ops}


def _fit(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def run(instance_dir: Path, out_dir: Path, resolution: int, mode: str, background: str,
        instance_prompt: str, min_images: int = 3) -> list[dict]:
    from .images import grid, save_atomic

    instance_dir, out_dir = Path(instance_dir), Path(out_dir)
    if resolution % 64:
        raise DreampipeError(f"prepare.resolution is {resolution}; it must be a multiple of 64 "
                             "(e.g. 512)")
    sources = photo_files(instance_dir)
    prepared, bad = [], []
    for src in sources:
        try:
            prepared.append((src, *prepare_one(src, resolution, mode, background)))
        except Exception as e:  # wand raises many types; all mean "this file is not a usable image"
            bad.append(f"{src.name}: {str(e).splitlines()[0][:120]}")
    if bad:
        raise DreampipeError(f"{instance_dir}: {len(bad)} file(s) are not usable images; fix or "
                             f"remove them: " + "; ".join(bad))
    if len(prepared) < min_images:
        raise DreampipeError(f"{instance_dir}: {len(prepared)} usable photo(s); DreamBooth needs at "
                             f"least {min_images} (5-20 is typical) to learn a subject")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    manifest = []
    for i, (src, image, info) in enumerate(prepared):
        name = f"{i:04d}.png"
        save_atomic(image, out_dir / name)
        sidecar = src.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.exists() else instance_prompt
        manifest.append({"file": name, "source": str(src), "sha256": _sha256(src),
                         "caption": caption, **info})
    labels = [Path(m["source"]).name for m in manifest]
    save_atomic(grid([p[1] for p in prepared], labels), out_dir / "contact_sheet.png")
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / "manifest.json")
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
