"""Prepare: a folder of photos -> square training images, a manifest and a contact sheet.

The ImageMagick work is the guide's `mogrify -resize 512x512 -background white -extent 512x512
-gravity center`, done through wand, plus what real photo folders need: EXIF orientation, the
first frame of animated files, colour profiles and any colourspace or bit depth to 8-bit sRGB,
alpha flattened onto the background, truncated files caught, duplicates dropped.

A photo is a file whose name has an image extension (IMAGE_SUFFIXES) and is not hidden; anything
else (notes, .DS_Store, Thumbs.db, macOS "._" files) is ignored silently and is not an input of
the Snakemake rule. A photo that the installed ImageMagick cannot decode is a bad image.

Subject masks (train.masked_loss): name.mask.png (any image suffix) beside name.jpg is the mask of
that photo, white = subject; a photo with transparency and no mask file is masked by its alpha.
A mask goes through exactly the resize, pad and crop of its photo (padding is background, black)
and is written as NNNN.mask.png beside NNNN.png. Mask files are never photos themselves.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
from functools import cache, partial
from pathlib import Path

from .errors import DreampipeError
from .files import write_json

log = logging.getLogger(__name__)
# Read when wand first loads ImageMagick: resource limits that hold a 12000 px photo (magick/policy.xml).
# A MAGICK_CONFIGURE_PATH of the user's own is left as it is.
os.environ.setdefault("MAGICK_CONFIGURE_PATH", str(Path(__file__).resolve().parent / "magick"))

MODES = ("pad", "crop", "stretch")
GRAVITIES = ("center", "north", "south", "east", "west", "north_west", "north_east", "south_west",
             "south_east")
ON_BAD_IMAGE = ("error", "skip")
MIN_IMAGES = 3
# Formats people keep photos in. Raw camera files are listed so that, where ImageMagick has no
# delegate for them, the user hears so instead of losing them silently.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .webp .tif .tiff .bmp .heic .heif .avif .jxl .jp2 .psd "
    ".tga .ppm .pgm .pbm .pnm .ico .dng .cr2 .cr3 .nef .arw .orf .rw2 .raf".split())
UPSCALE_WARNING = 2.0  # warn when a photo is blown up more than this
SHEET_CELL = 128  # pixels per image on the contact sheet


class BadImage(Exception):
    """A photo that cannot become a training image; the message says why."""


def input_files(instance_dir: Path, masks: bool = False) -> list[Path]:
    """Photos and their caption sidecars (name.txt beside name.jpg), and with `masks` their mask
    files (name.mask.png), sorted by name. Imports nothing heavy: the Snakefile calls it to know
    what prepare depends on."""
    photos = photo_files(instance_dir)
    sidecars = {p.with_suffix(".txt") for p in photos}
    found = [m for ms in mask_files(instance_dir).values() for m in ms] if masks else []
    return sorted(photos + [p for p in sidecars if p.is_file()] + found)


def _images(instance_dir: Path) -> list[Path]:
    return sorted(p for p in Path(instance_dir).iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def is_mask(path: Path) -> bool:
    return Path(path).stem.lower().endswith(".mask")


def photo_files(instance_dir: Path) -> list[Path]:
    return [p for p in _images(instance_dir) if not is_mask(p)]


def mask_files(instance_dir: Path) -> dict[str, list[Path]]:
    """The mask files of a folder by the stem of the photo they belong to (name.mask.png -> name)."""
    out: dict[str, list[Path]] = {}
    for p in _images(instance_dir):
        if is_mask(p):
            out.setdefault(p.stem[:-len(".mask")], []).append(p)
    return out


def mask_of(photo: Path, masks: dict[str, list[Path]]) -> Path | None:
    """The mask file of `photo` (from mask_files), None if it has none; two is a user error."""
    found = masks.get(Path(photo).stem, [])
    if len(found) > 1:
        raise DreampipeError(f"{photo}: {len(found)} mask files ({', '.join(p.name for p in found)}); "
                             "keep one of them")
    return found[0] if found else None


def prepare_one(source: Path, resolution: int, mode: str = "pad", background: str = "white",
                gravity: str = "center", masks: bool = False, mask: Path | None = None):
    """One photo -> (RGB image of resolution x resolution, info: the source's sha256, format and
    size, the operations applied and warnings). Raises BadImage. With `masks`, also its subject
    mask, from the mask file `mask` or else the photo's transparency: (image, info, mask), mask
    an 8-bit greyscale image aligned with the image, or None for a photo with neither."""
    from PIL import Image
    from wand.exceptions import WandException

    data = Path(source).read_bytes()
    _check_complete(data)
    _check_size(source)
    info = {"sha256": hashlib.sha256(data).hexdigest(), "operations": [], "warnings": []}
    try:
        pixels, mask_pixels = _convert(source, resolution, mode, background, gravity, info, masks, mask)
    except WandException as e:
        raise BadImage(_reason(e, Path(source))) from None
    image = Image.frombytes("RGB", (resolution, resolution), pixels)
    if not masks:
        return image, info
    mask = Image.frombytes("RGB", image.size, mask_pixels).convert("L") if mask_pixels else None
    return image, info, mask


TRANSPOSING = ("left_top", "right_top", "right_bottom", "left_bottom")  # EXIF orientations turning by 90 degrees


def _convert(source: Path, resolution: int, mode: str, background: str, gravity: str, info: dict,
             masks: bool = False, mask_file: Path | None = None) -> tuple[bytes, bytes | None]:
    from wand.color import Color
    from wand.image import Image as WandImage

    ops, warnings = info["operations"], info["warnings"]
    with WandImage.ping(filename=str(source)) as probe:
        info.update(format=probe.format, size=list(probe.size))
    width, height = info["size"]
    # pad fits the long side; crop fills with the short one; stretch is as soft as its short one
    scale = resolution / (max(width, height) if mode == "pad" else min(width, height))
    if scale > UPSCALE_WARNING:
        warnings.append(f"{width}x{height} px is less than half of {resolution} px: upscaled "
                        f"{scale:.1f}x, it will look soft")
    with WandImage() as img, contextlib.ExitStack() as closing:
        if min(width, height) >= 4 * resolution:
            # libjpeg decodes at 1/2..1/8 scale, still at least twice the target size, so the
            # Lanczos resize below decides the quality: 4x faster on 4000x3000 photos
            img.options["jpeg:size"] = f"{2 * resolution}x{2 * resolution}"
        img.read(filename=str(source))
        if len(img.sequence) > 1:
            warnings.append(f"{len(img.sequence)} frames (animated or multi-page): the first is used")
            ops.append("first frame")
            del img.sequence[1:]
        img.reset_coords()  # a GIF frame may sit at an offset on its canvas
        upright = (height, width) if img.orientation in TRANSPOSING else (width, height)
        if img.orientation not in ("top_left", "undefined"):
            ops.append(f"auto-orient ({img.orientation})")
            img.auto_orient()
        filter_ = "lanczos" if scale < 1 else "mitchell"
        if mode == "pad":
            fit = resolution / max(img.width, img.height)
            resized = max(1, round(img.width * fit)), max(1, round(img.height * fit))
        elif mode == "crop":
            fill = resolution / min(img.width, img.height)
            resized = max(resolution, round(img.width * fill)), max(resolution, round(img.height * fill))
        else:
            resized = resolution, resolution
        mask = closing.enter_context(_read_mask(mask_file, source, upright)) if masks and mask_file else None
        img.resize(*resized, filter=filter_)
        if masks and mask is None and img.alpha_channel and _has_transparency(img):
            mask = closing.enter_context(img.clone())  # the transparency, resized with the photo
            mask.alpha_channel = "extract"  # opaque = white
            info["mask_source"] = "alpha channel"
        elif mask is not None:
            mask.resize(*resized, filter=filter_)  # the same size as the photo: the same geometry
        # colour after the resize: the same result to the eye, on 20x fewer pixels
        embedded = img.profiles["icc"]
        if embedded:
            ops.append(f"ICC profile '{_profile_name(embedded)}' -> sRGB")
            img.profiles["icc"] = _srgb_profile()  # lcms converts the pixels from the embedded profile
        elif img.colorspace != "srgb":
            ops.append(f"{img.colorspace} -> sRGB")
            img.transform_colorspace("srgb")
        if img.alpha_channel:
            if _has_transparency(img):
                ops.append(f"alpha flattened on {background}")
            img.background_color = Color(background)
            img.alpha_channel = "remove"
        _place(img, mode, resolution, gravity, background)
        ops.append(f"{mode} to {resolution}x{resolution}" + (f" ({gravity})" if gravity != "center" else ""))
        img.depth = 8
        if mask is None:
            return img.make_blob("rgb"), None
        _place(mask, mode, resolution, gravity, "black")  # padding is background
        mask.depth = 8
        return img.make_blob("rgb"), mask.make_blob("rgb")


def _place(img, mode: str, resolution: int, gravity: str, background: str) -> None:
    """The resized picture onto the square: pad extends it with `background`, crop cuts it."""
    from wand.color import Color

    if mode == "pad":
        img.background_color = Color(background)
        img.extent(resolution, resolution, gravity=gravity)
    elif mode == "crop":
        img.crop(width=resolution, height=resolution, gravity=gravity)


def _read_mask(path: Path, photo: Path, upright: tuple[int, int]):
    """The mask file, upright and opaque (transparent = background), as a wand image of the
    photo's upright size; a mask of another size or one that cannot be read is a user error."""
    from wand.color import Color
    from wand.exceptions import WandException
    from wand.image import Image as WandImage

    try:
        mask = WandImage(filename=str(path))
        del mask.sequence[1:]
        mask.reset_coords()
        mask.auto_orient()
        if mask.alpha_channel:
            mask.background_color = Color("black")
            mask.alpha_channel = "remove"
        if mask.colorspace not in ("gray", "srgb"):
            mask.transform_colorspace("srgb")
    except WandException as e:
        raise DreampipeError(f"{path}: the mask of {photo.name} cannot be read ({_reason(e, path)}); "
                             "save it again as a PNG") from None
    if mask.size != upright:
        size = mask.size
        mask.close()
        raise DreampipeError(f"{path}: the mask is {size[0]}x{size[1]} px but its photo {photo} is "
                             f"{upright[0]}x{upright[1]} px (as displayed, EXIF rotation applied); a mask "
                             "must have the size of its photo: draw it on the photo, or resize it")
    return mask


def _check_complete(data: bytes) -> None:
    """ImageMagick 6 decodes a truncated JPEG without a word, filling the rest with grey. A
    complete one has the end marker FFD9 after its first scan; the segments before the scan are
    skipped by their lengths because the EXIF thumbnail of phone photos holds an FFD9 of its own."""
    if data[:2] != b"\xff\xd8":
        return
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:  # DA: start of scan
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if data.find(b"\xff\xd9", pos) < 0:
        raise BadImage("truncated JPEG (no end marker); copy or export it again")


def _check_size(source: Path) -> None:
    """Refuse, from the header alone, a photo larger than ImageMagick will decode (a decompression
    bomb, or a huge scan): ImageMagick itself fails on it without saying why."""
    import warnings

    from PIL import Image, UnidentifiedImageError
    from wand.resource import limits

    most = f"ImageMagick reads at most {limits['width']}x{limits['height']} px"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as im:
                width, height = im.size
        except Image.DecompressionBombError as e:  # Pillow's own limit says only the pixel count
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(found.group(1)) if found else 0
            if pixels > limits["width"] * limits["height"]:
                raise BadImage(f"{pixels / 1e6:.0f} megapixels is too large ({most}); shrink it, e.g. to "
                               "4000 px on its long side") from None
            return
        except (UnidentifiedImageError, OSError, ValueError):
            return  # a format Pillow does not read: ImageMagick decides
    if width > limits["width"] or height > limits["height"]:
        raise BadImage(f"{width}x{height} px is too large ({most}); shrink it, e.g. to 4000 px on its "
                       "long side")


def _has_transparency(img) -> bool:
    with img.clone() as alpha:
        alpha.alpha_channel = "extract"  # opaque = white
        return alpha.minima < alpha.quantum_range


@cache
def _srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _profile_name(icc: bytes) -> str:
    from PIL import ImageCms

    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except (OSError, ImageCms.PyCMSError):
        return "unnamed"


def _reason(e: Exception, source: Path) -> str:
    from wand.exceptions import MissingDelegateError, WandRuntimeError

    text = str(e).split(" @ ")[0].strip()
    if isinstance(e, MissingDelegateError) or "/magick-" in text:  # no delegate, or it failed
        return f"the installed ImageMagick cannot read {source.suffix} files; convert it to JPEG or PNG"
    if isinstance(e, WandRuntimeError):
        return "cannot be decoded (truncated or corrupt)"
    return re.sub(r" `[^`]*'$", "", text)  # ImageMagick ends with the file name, already said


def _prepare_file(job: tuple[int, Path], out_dir: Path, settings: dict, masks: dict | None = None) -> dict:
    """Worker: one photo (and its mask, when `masks` holds mask_files) to hidden PNGs in out_dir,
    renamed once the whole set is known."""
    from PIL import Image

    index, source = job
    mask = None
    try:
        if masks is None:
            image, info = prepare_one(source, **settings)
        else:
            file = mask_of(source, masks)
            image, info, mask = prepare_one(source, **settings, masks=True, mask=file)
            if file:
                info.update(mask_source=str(file), mask_sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    except BadImage as e:
        return {"source": source, "error": str(e)}
    tmp = out_dir / f".{index:05d}.png"
    image.save(tmp, format="PNG")
    thumb = image.copy()
    if mask is not None:
        mask.save(tmp.with_suffix(".mask.png"), format="PNG")
        thumb = Image.composite(image, Image.blend(image, Image.new("RGB", image.size), 0.75), mask)  # background dimmed
    thumb.thumbnail((SHEET_CELL, SHEET_CELL))
    return {"source": source, "tmp": tmp, "pixels": hashlib.sha256(image.tobytes()).hexdigest(),
            "thumb": thumb, "info": info, "masked": mask is not None}


def _prepare_all(sources: list[Path], out_dir: Path, settings: dict, workers: int,
                 masks: dict | None = None) -> list[dict]:
    from tqdm import tqdm
    from wand.resource import limits

    work = partial(_prepare_file, out_dir=out_dir, settings=settings, masks=masks)
    bar = {"total": len(sources), "desc": "prepare", "unit": "photo", "disable": None}
    if workers < 2 or len(sources) < 2:
        return [work(job) for job in tqdm(enumerate(sources), **bar)]
    # Threads, not processes: wand calls ImageMagick through ctypes, which releases the GIL, so
    # threads decode and resize in parallel without the start-up and pickling of processes.
    magick_threads = limits["thread"]
    limits["thread"] = 1  # one OpenMP thread per worker, not workers x cores
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(work, enumerate(sources)), **bar))
    finally:
        limits["thread"] = magick_threads


def run(instance_dir: Path, out_dir: Path, resolution: int, mode: str, background: str,
        instance_prompt: str, gravity: str = "center", on_bad_image: str = "error",
        workers: int = 1, masks: bool = False) -> list[dict]:
    """Prepare every photo of instance_dir into out_dir; returns the manifest. With `masks`, each
    photo's subject mask too (see the module's doc): NNNN.mask.png, named in the manifest's "mask"."""
    from .images import grid, save_atomic

    instance_dir, out_dir = Path(instance_dir), Path(out_dir)
    if resolution % 64:
        raise DreampipeError(f"prepare.resolution is {resolution}; it must be a multiple of 64 "
                             "(e.g. 512)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    settings = {"resolution": resolution, "mode": mode, "background": background, "gravity": gravity}
    try:
        photos, found = photo_files(instance_dir), mask_files(instance_dir) if masks else None
        if found:
            stems = {p.stem for p in photos}
            for stem, files in sorted(found.items()):
                if stem not in stems:
                    log.warning("%s: a mask without a photo named %s.<ext>: ignored", files[0].name, stem)
        results = _prepare_all(photos, out_dir, settings, workers, found)
        kept = _keep(results, instance_dir, on_bad_image)
        manifest = []
        for i, r in enumerate(kept):
            name = f"{i:04d}.png"
            os.replace(r["tmp"], out_dir / name)
            sidecar = r["source"].with_suffix(".txt")
            caption = sidecar.read_text().strip() if sidecar.exists() else instance_prompt
            masked = {"mask": f"{i:04d}.mask.png"} if r.get("masked") else {}
            if masked:
                os.replace(r["tmp"].with_suffix(".mask.png"), out_dir / masked["mask"])
            manifest.append({"file": name, **masked, "source": str(r["source"]), "caption": caption, **r["info"]})
        if masks:
            log.info("%d of %d images have a subject mask", sum("mask" in m for m in manifest), len(manifest))
        for dropped in out_dir.glob(".*.png"):
            dropped.unlink()
        save_atomic(grid([r["thumb"] for r in kept], [r["source"].name for r in kept], cell=SHEET_CELL),
                    out_dir / "contact_sheet.png")
        write_json(manifest, out_dir / "manifest.json")
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-prepared set for a later run to trust
        raise
    return manifest


def _keep(results: list[dict], instance_dir: Path, on_bad_image: str) -> list[dict]:
    """The usable photos, in file-name order (a copy kept for its caption takes the place of the
    first); says what was wrong with the others."""
    bad = [f"{r['source'].name}: {r['error']}" for r in results if "error" in r]
    if bad and on_bad_image == "error":
        raise DreampipeError(f"{instance_dir}: {len(bad)} photo(s) cannot be used; fix or remove them, "
                             f"or set prepare.on_bad_image: skip: " + "; ".join(bad))
    kept, seen = [], {}  # seen: pixels -> index in kept
    captioned = lambda r: r["source"].with_suffix(".txt").is_file()  # noqa: E731
    for r in results:
        name = r["source"].name
        if "error" in r:
            log.warning("%s: skipped: %s", name, r["error"])
        elif r["pixels"] in seen and captioned(r) and not captioned(kept[seen[r["pixels"]]]):
            # of duplicates, the one with a caption is kept: the caption is the user's work
            first = kept[seen[r["pixels"]]]
            log.warning("%s: dropped: the same training image as %s, which has a caption",
                        first["source"].name, name)
            kept[seen[r["pixels"]]] = r
        elif r["pixels"] in seen:
            log.warning("%s: dropped: the same training image as %s", name, kept[seen[r["pixels"]]]["source"].name)
        else:
            seen[r["pixels"]] = len(kept)
            kept.append(r)
    for r in kept:
        for w in r["info"]["warnings"]:
            log.warning("%s: %s", r["source"].name, w)
    if len(kept) < MIN_IMAGES:
        raise DreampipeError(f"{instance_dir}: {len(kept)} usable photo(s); DreamBooth needs at least "
                             f"{MIN_IMAGES} (5-20 is typical) to learn a subject; add photos")
    return kept
