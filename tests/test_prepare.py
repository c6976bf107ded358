"""Prepare: every photo a user throws at it becomes a clean training image, or one clear message.
Every input is generated here with Pillow or wand: no committed binaries."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageCms
from wand.color import Color
from wand.image import Image as WandImage

from dreampipe import prepare
from dreampipe.errors import DreampipeError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def run(src, out, **kw):
    args = {"resolution": 64, "mode": "pad", "background": "white", "instance_prompt": "a photo of sks dog"}
    return prepare.run(src, out, **{**args, **kw})


def folder(path, **files):
    """Writes name=PIL image or bytes; adds distinct plain photos z0.png, z1.png (sorted last) so
    that the set reaches the minimum count."""
    path.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (10 + 40 * i, 90, 90)).save(path / f"z{i}.png")
    for name, content in files.items():
        name = name.replace("__", ".")  # hidden files: __DS_Store -> .DS_Store
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            content.save(path / name)
    return path


def first(out):
    return np.asarray(Image.open(out / "0000.png")).astype(int)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def halves(width, height, left=RED, right=BLUE):
    im = Image.new("RGB", (width, height), left)
    im.paste(right, (width // 2, 0, width, height))
    return im


def test_output_is_square_at_the_resolution_padded_white_and_centred(tmp_path):
    src = folder(tmp_path / "in", a_wide__png=Image.new("RGB", (200, 100), RED))
    manifest = run(src, tmp_path / "out")
    arr = first(tmp_path / "out")
    assert arr.shape == (64, 64, 3)
    # red band of 64x32 in the middle, white above and below
    assert (arr[20:44, :, 0] > 240).all() and (arr[20:44, :, 1] < 15).all()
    assert (arr[:12] == 255).all() and (arr[-12:] == 255).all()
    assert manifest[0]["operations"] == ["pad to 64x64"]


def test_padding_colour_is_configurable(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (50, 100), BLUE))
    run(src, tmp_path / "out", background="black")
    arr = first(tmp_path / "out")
    assert (arr[:, :10] == 0).all() and (arr[:, -10:] == 0).all()
    assert (arr[:, 28:36, 2] > 240).all()


@pytest.mark.parametrize("gravity, colour", [("center", None), ("west", RED), ("east", BLUE)])
def test_crop_fills_the_square_and_gravity_chooses_the_part_kept(tmp_path, gravity, colour):
    src = folder(tmp_path / "in", a__png=halves(256, 64))
    manifest = run(src, tmp_path / "out", mode="crop", gravity=gravity)
    arr = first(tmp_path / "out")
    if colour:
        assert (np.abs(arr - colour) < 8).all()
        assert manifest[0]["operations"] == [f"crop to 64x64 ({gravity})"]
    else:
        assert (np.abs(arr[:, :28] - RED) < 8).all() and (np.abs(arr[:, 36:] - BLUE) < 8).all()


def test_stretch_fills_the_square_without_padding_or_cropping(tmp_path):
    src = folder(tmp_path / "in", a__png=halves(256, 64))
    run(src, tmp_path / "out", mode="stretch")
    arr = first(tmp_path / "out")
    assert (np.abs(arr[:, :28] - RED) < 8).all() and (np.abs(arr[:, 36:] - BLUE) < 8).all()


def test_exif_rotation_is_applied(tmp_path):
    # stored 40x80 with the top half red; orientation 6 means "rotate 90 CW to display",
    # so the displayed image is 80x40 with the red half on the right
    stored = Image.new("RGB", (40, 80), GREEN)
    stored.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    src = folder(tmp_path / "in")
    stored.save(src / "a.jpg", quality=95, exif=exif)
    manifest = run(src, tmp_path / "out")
    arr = first(tmp_path / "out")
    assert arr[32, 56, 0] > 200 and arr[32, 56, 1] < 60, "right half is red"
    assert arr[32, 8, 1] > 200 and arr[32, 8, 0] < 60, "left half is green"
    assert (arr[:8] > 245).all(), "landscape after rotation: padded above"
    assert manifest[0]["operations"] == ["auto-orient (right_top)", "pad to 64x64"]


def test_alpha_is_flattened_onto_the_background(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (16, 16, 48, 48))
    src = folder(tmp_path / "in", a__png=im)
    manifest = run(src, tmp_path / "out")
    out = Image.open(tmp_path / "out" / "0000.png")
    assert out.mode == "RGB"
    arr = np.asarray(out)
    assert (arr[2, 2] == 255).all(), "transparent corner became white"
    assert tuple(arr[32, 32]) == RED
    assert manifest[0]["operations"] == ["alpha flattened on white", "pad to 64x64"]


def test_palette_png_with_a_transparent_colour_is_flattened(tmp_path):
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (16, 16, 48, 48))
    src = folder(tmp_path / "in", a__png=im)
    im.save(src / "a.png", transparency=0)
    manifest = run(src, tmp_path / "out", background="yellow")
    arr = first(tmp_path / "out")
    assert tuple(arr[2, 2]) == (255, 255, 0) and tuple(arr[32, 32]) == BLUE
    assert "alpha flattened on yellow" in manifest[0]["operations"]


def test_an_alpha_channel_that_is_all_opaque_is_not_reported_as_flattened(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGBA", (64, 64), (0, 0, 255, 255)))
    manifest = run(src, tmp_path / "out")
    assert tuple(first(tmp_path / "out")[5, 5]) == BLUE
    assert manifest[0]["operations"] == ["pad to 64x64"]


def test_cmyk_jpeg_becomes_srgb(tmp_path):
    src = folder(tmp_path / "in", a__jpg=Image.new("CMYK", (64, 64), (0, 255, 255, 0)))  # red ink
    manifest = run(src, tmp_path / "out")
    assert (np.abs(first(tmp_path / "out") - RED) < 10).all()
    assert manifest[0]["operations"] == ["cmyk -> sRGB", "pad to 64x64"]


def test_embedded_icc_profile_is_converted_to_srgb_and_the_colours_kept(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = folder(tmp_path / "in")
    Image.new("RGB", (64, 64), (200, 30, 40)).save(src / "a.png", icc_profile=srgb)
    manifest = run(src, tmp_path / "out")
    assert (np.abs(first(tmp_path / "out") - (200, 30, 40)) <= 1).all()
    assert manifest[0]["operations"] == ["ICC profile 'sRGB built-in' -> sRGB", "pad to 64x64"]


def test_16_bit_png_becomes_8_bit_srgb(tmp_path):
    src = folder(tmp_path / "in")
    with WandImage(width=64, height=64, background=Color("#808040402020")) as im:
        im.depth = 16
        im.save(filename=str(src / "a.png"))
    Image.fromarray(np.full((64, 64), 0x8080, dtype=np.uint16)).save(src / "b.png")  # 16-bit grey
    manifest = run(src, tmp_path / "out")
    assert manifest[0]["format"] == "PNG"
    assert (first(tmp_path / "out") == (128, 64, 32)).all()
    assert (np.asarray(Image.open(tmp_path / "out" / "0001.png")) == 128).all()
    assert manifest[1]["operations"] == ["gray -> sRGB", "pad to 64x64"]


@pytest.mark.parametrize("suffix", ["gif", "webp"])
def test_animated_file_gives_its_first_frame_with_a_warning(tmp_path, caplog, suffix):
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)]
    src = folder(tmp_path / "in")
    frames[0].save(src / f"a.{suffix}", save_all=True, append_images=frames[1:], duration=100, loop=0,
                   lossless=True)
    manifest = run(src, tmp_path / "out")
    assert (np.abs(first(tmp_path / "out") - RED) < 4).all()
    assert warnings_of(caplog) == [f"a.{suffix}: 3 frames (animated or multi-page): the first is used"]
    assert manifest[0]["warnings"] == ["3 frames (animated or multi-page): the first is used"]


@pytest.mark.parametrize("suffix", ["webp", "tif", "bmp", "gif", "heic", "avif"])
def test_formats_imagemagick_reads_are_accepted(tmp_path, suffix):
    src = folder(tmp_path / "in")
    if suffix == "heic":  # Pillow cannot write HEIC; wand can
        with WandImage(width=64, height=64, background=Color("rgb(200,30,40)")) as im:
            im.save(filename=str(src / "a.heic"))
    else:
        Image.new("RGB", (64, 64), (200, 30, 40)).save(src / f"a.{suffix}", lossless=True)
    run(src, tmp_path / "out")
    assert (np.abs(first(tmp_path / "out") - (200, 30, 40)) <= 3).all()


def test_tiny_thumbnail_is_upscaled_with_a_warning(tmp_path, caplog):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (20, 16), RED))
    manifest = run(src, tmp_path / "out")
    assert first(tmp_path / "out").shape == (64, 64, 3)
    assert warnings_of(caplog) == ["a.png: 20x16 px is less than half of 64 px: upscaled 3.2x, it will look soft"]
    assert manifest[0]["size"] == [20, 16]


def test_large_photo_is_shrunk_to_the_resolution(tmp_path, caplog):
    src = folder(tmp_path / "in")
    halves(4000, 3000).save(src / "a.jpg", quality=90)
    manifest = run(src, tmp_path / "out")
    arr = first(tmp_path / "out")
    assert (arr[:6] == 255).all() and (arr[-6:] == 255).all(), "4:3 padded above and below"
    assert (np.abs(arr[16:48, :28] - RED) < 12).all() and (np.abs(arr[16:48, 36:] - BLUE) < 12).all()
    assert manifest[0]["size"] == [4000, 3000] and manifest[0]["format"] == "JPEG"
    assert warnings_of(caplog) == []


def test_exact_duplicates_are_dropped_with_a_warning(tmp_path, caplog):
    photo = halves(80, 60)
    src = folder(tmp_path / "in", a__png=photo, b__png=photo, c__tif=photo)
    manifest = run(src, tmp_path / "out")
    assert [m["source"].rsplit("/", 1)[1] for m in manifest] == ["a.png", "z0.png", "z1.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0001.png", "0002.png",
                                                                    "contact_sheet.png", "manifest.json"]
    assert warnings_of(caplog) == ["b.png: dropped: the same training image as a.png",
                                   "c.tif: dropped: the same training image as a.png"]


def truncated(format):
    """The first half of a file; a JPEG carries an EXIF thumbnail, a whole JPEG, as phone photos do."""
    thumb, buf = io.BytesIO(), io.BytesIO()
    halves(16, 16).save(thumb, format="JPEG")
    halves(200, 200).save(buf, format=format, **({"exif": b"Exif\0\0" + thumb.getvalue()} if format == "JPEG" else {}))
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_bad_files_are_all_listed_in_one_message(tmp_path):
    src = folder(tmp_path / "in", a__jpg=truncated("JPEG"), b__png=truncated("PNG"), c__png=b"not a png",
                 d__gif=b"GIF89a", e__jxl=b"\xff\x0a")
    with pytest.raises(DreampipeError) as e:
        run(src, tmp_path / "out")
    assert str(e.value) == (
        f"{src}: 5 photo(s) cannot be used; fix or remove them, or set prepare.on_bad_image: skip: "
        "a.jpg: truncated JPEG (no end marker); copy or export it again; "
        "b.png: cannot be decoded (truncated or corrupt); "
        "c.png: improper image header; "
        "d.gif: insufficient image data in file; "
        "e.jxl: the installed ImageMagick cannot read .jxl files; convert it to JPEG or PNG")
    assert not (tmp_path / "out").exists()


def test_on_bad_image_skip_leaves_them_out_with_a_warning_each(tmp_path, caplog):
    src = folder(tmp_path / "in", a__jpg=truncated("JPEG"), b__png=Image.new("RGB", (64, 64), RED),
                 c__png=b"not a png")
    manifest = run(src, tmp_path / "out", on_bad_image="skip")
    assert [m["source"].rsplit("/", 1)[1] for m in manifest] == ["b.png", "z0.png", "z1.png"]
    assert warnings_of(caplog) == ["a.jpg: skipped: truncated JPEG (no end marker); copy or export it again",
                                   "c.png: skipped: improper image header"]


def test_hidden_and_non_image_files_are_ignored_silently(tmp_path, caplog):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (64, 64), RED), __DS_Store=b"\0\1",
                 Thumbs__db=b"\0\1", notes__pdf=b"%PDF-1.4", README=b"hello", __a__png=b"\0\5\6")
    (src / "._a.jpg").write_bytes(b"\0\5\6")  # macOS AppleDouble file on a USB stick
    manifest = run(src, tmp_path / "out")
    assert len(manifest) == 3 and warnings_of(caplog) == []
    assert [p.name for p in prepare.input_files(src)] == ["a.png", "z0.png", "z1.png"]


def test_input_files_are_the_photos_and_their_caption_sidecars(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (64, 64), RED))
    (src / "a.txt").write_text("a photo of sks dog on a bike")
    (src / "notes.txt").write_text("not a caption")
    assert [p.name for p in prepare.input_files(src)] == ["a.png", "a.txt", "z0.png", "z1.png"]


def test_manifest_contact_sheet_and_sidecar_captions_in_file_name_order(tmp_path):
    src = folder(tmp_path / "in", a__jpg=Image.new("RGB", (80, 80), RED), b__png=Image.new("RGB", (80, 80), BLUE))
    (src / "b.txt").write_text("a photo of sks dog in the snow\n")
    manifest = run(src, tmp_path / "out")
    assert [(m["file"], m["source"], m["caption"]) for m in manifest] == [
        ("0000.png", str(src / "a.jpg"), "a photo of sks dog"),
        ("0001.png", str(src / "b.png"), "a photo of sks dog in the snow"),
        ("0002.png", str(src / "z0.png"), "a photo of sks dog"),
        ("0003.png", str(src / "z1.png"), "a photo of sks dog")]
    assert manifest[0]["sha256"] == hashlib.sha256((src / "a.jpg").read_bytes()).hexdigest()
    assert manifest[0]["format"] == "JPEG" and manifest[0]["size"] == [80, 80]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    assert sheet.size == (4 * prepare.SHEET_CELL, prepare.SHEET_CELL + 14)
    assert tuple(np.asarray(sheet)[64, prepare.SHEET_CELL + 64]) == BLUE


def test_parallel_workers_give_the_same_files_as_one(tmp_path):
    src = folder(tmp_path / "in", **{f"p{i}__png": halves(90 + i, 70, RED, (0, 0, 20 * i)) for i in range(5)})
    run(src, tmp_path / "one", workers=1)
    run(src, tmp_path / "four", workers=4)
    for f in sorted((tmp_path / "one").iterdir()):
        assert f.read_bytes() == (tmp_path / "four" / f.name).read_bytes(), f.name


def test_too_few_photos_is_an_error_that_explains_why(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (80, 80)).save(src / "a.png")
    with pytest.raises(DreampipeError, match="1 usable photo.*at least 3"):
        run(src, tmp_path / "out")


def test_resolution_must_be_a_multiple_of_64(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (80, 80)))
    with pytest.raises(DreampipeError, match="multiple of 64"):
        run(src, tmp_path / "out", resolution=100)


def test_of_duplicates_the_photo_with_a_caption_is_kept(tmp_path, caplog):
    photo = halves(80, 60)
    src = folder(tmp_path / "in", a__png=photo, b__png=photo)
    (src / "b.txt").write_text("a photo of sks dog, smiling")
    manifest = run(src, tmp_path / "out")
    assert [(m["source"].rsplit("/", 1)[1], m["caption"]) for m in manifest][0] == ("b.png", "a photo of sks dog, smiling")
    assert len(manifest) == 3
    assert warnings_of(caplog) == ["a.png: dropped: the same training image as b.png, which has a caption"]


def png_bomb(path, width, height):
    """A 1-bit PNG of width x height that is all zeros: a few hundred KB on disk, gigapixels decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, z = b"\0" * (1 + (width + 7) // 8) * 1000, zlib.compressobj(9)
    data = b"".join(z.compress(rows) for _ in range(height // 1000)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_as_too_large(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (64, 64), RED))
    png_bomb(src / "bomb.png", 60000, 60000)
    with pytest.raises(DreampipeError, match=r"bomb.png: 3600 megapixels is too large \(ImageMagick reads at most "):
        run(src, tmp_path / "out")


def test_a_photo_wider_than_imagemagicks_limit_is_refused_as_too_large(tmp_path):
    src = folder(tmp_path / "in", a__png=Image.new("RGB", (64, 64), RED))
    png_bomb(src / "wide.png", 40000, 1000)
    with pytest.raises(DreampipeError, match=r"wide.png: 40000x1000 px is too large.*shrink it"):
        run(src, tmp_path / "out")


def test_a_12000_px_photo_is_prepared_by_the_command(tmp_path):
    """ImageMagick's default policy (area 128 MP, disk 1 GiB) cannot hold it: the job raises them."""
    import subprocess

    src = folder(tmp_path / "in", a__png=Image.new("RGB", (64, 64), RED))
    Image.new("RGB", (12000, 12000), BLUE).save(src / "big.png", compress_level=1)
    r = subprocess.run(["dreampipe", "prepare", str(src), str(tmp_path / "out"), "--resolution", "64",
                        "--instance-prompt", "a photo of sks dog"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())[1]["size"] == [12000, 12000]


# ---- subject masks (train.masked_loss) ---------------------------------------------------------

def square_photo(size, box, colour=GREEN, background=(128, 128, 128)):
    im = Image.new("RGB", size, background)
    im.paste(colour, box)
    return im


def square_mask(size, box, value=255):
    im = Image.new("L", size, 0)
    im.paste(value, box)
    return im


def assert_mask_matches_green(out, name="0000"):
    """The prepared mask is the green square of the prepared photo: at every pixel its value is the
    share of green there (G - R: 255 on the square, 0 on the grey background and the white padding;
    in between on the square's edge), to a few levels of resampling and JPEG noise."""
    image = np.asarray(Image.open(out / f"{name}.png")).astype(int)
    mask = np.asarray(Image.open(out / f"{name}.mask.png")).astype(int)
    assert mask.shape == image.shape[:2]
    green = np.clip(image[..., 1] - image[..., 0], 0, 255)
    assert (green > 200).sum() > 20
    assert np.abs(mask - green).max() <= 24, np.abs(mask - green).max()


@pytest.mark.parametrize("mode, gravity", [("pad", "center"), ("pad", "north"), ("crop", "center"),
                                           ("crop", "east"), ("stretch", "center")])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_mask_file_is_resized_padded_and_cropped_exactly_as_its_photo(tmp_path, mode, gravity, suffix):
    """300x260 px: a JPEG that large is decoded at a reduced scale; the mask still lines up."""
    box = (190, 60, 260, 140)
    src = folder(tmp_path / "in")
    square_photo((300, 260), box).save(src / f"a{suffix}", quality=98, subsampling=0)
    square_mask((300, 260), box).save(src / "a.mask.png")
    manifest = run(src, tmp_path / "out", mode=mode, gravity=gravity, masks=True)
    assert manifest[0]["mask"] == "0000.mask.png" and manifest[0]["mask_source"] == str(src / "a.mask.png")
    assert manifest[0]["mask_sha256"] == hashlib.sha256((src / "a.mask.png").read_bytes()).hexdigest()
    assert_mask_matches_green(tmp_path / "out")
    assert [m.get("mask") for m in manifest[1:]] == [None, None], "photos without a mask have none"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mask.png")) == ["0000.mask.png"]


def test_the_mask_of_an_exif_rotated_photo_is_drawn_on_the_photo_as_displayed(tmp_path):
    # stored 60x100 with the green square at the top; orientation 6 displays it 100x60, square on the right
    stored = square_photo((60, 100), (10, 10, 50, 50))
    exif = Image.Exif()
    exif[0x0112] = 6
    src = folder(tmp_path / "in")
    stored.save(src / "a.jpg", quality=98, subsampling=0, exif=exif)
    square_mask((100, 60), (50, 10, 90, 50)).save(src / "a.mask.png")
    run(src, tmp_path / "out", masks=True)
    assert_mask_matches_green(tmp_path / "out")


def test_a_grey_mask_keeps_its_grey(tmp_path):
    src = folder(tmp_path / "in", a__png=square_photo((64, 64), (16, 16, 48, 48)))
    square_mask((64, 64), (16, 16, 48, 48), value=128).save(src / "a.mask.png")
    run(src, tmp_path / "out", masks=True)
    mask = np.asarray(Image.open(tmp_path / "out" / "0000.mask.png")).astype(int)
    assert abs(mask[32, 32] - 128) <= 1 and mask[2, 2] == 0


def test_the_alpha_channel_is_the_mask_of_a_photo_without_a_mask_file(tmp_path):
    im = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    im.paste((0, 255, 0, 255), (70, 20, 110, 60))
    src = folder(tmp_path / "in", a__png=im)
    manifest = run(src, tmp_path / "out", masks=True, mode="crop", gravity="east")
    assert manifest[0]["mask"] == "0000.mask.png" and manifest[0]["mask_source"] == "alpha channel"
    assert "alpha flattened on white" in manifest[0]["operations"]
    assert_mask_matches_green(tmp_path / "out")


def test_a_mask_file_wins_over_the_alpha_channel(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 255, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 64, 8))  # transparent top rows
    src = folder(tmp_path / "in", a__png=im)
    square_mask((64, 64), (0, 0, 32, 64)).save(src / "a.mask.png")
    manifest = run(src, tmp_path / "out", masks=True)
    assert manifest[0]["mask_source"] == str(src / "a.mask.png")
    mask = np.asarray(Image.open(tmp_path / "out" / "0000.mask.png"))
    assert mask[2, 10] == 255 and mask[40, 50] == 0


def test_without_masks_nothing_of_masks_is_prepared_and_mask_files_are_never_photos(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((0, 255, 0, 255), (16, 16, 48, 48))
    src = folder(tmp_path / "in", a__png=im, b__jpg=square_photo((64, 64), (0, 0, 8, 8)))
    square_mask((64, 64), (0, 0, 8, 8)).save(src / "b.mask.png")
    square_mask((64, 64), (0, 0, 8, 8)).save(src / "c.MASK.jpg")
    manifest = run(src, tmp_path / "out")
    assert [m["source"] for m in manifest] == [str(src / n) for n in ("a.png", "b.jpg", "z0.png", "z1.png")]
    assert not any("mask" in m for m in manifest) and not list((tmp_path / "out").glob("*.mask.png"))
    assert [p.name for p in prepare.input_files(src)] == ["a.png", "b.jpg", "z0.png", "z1.png"]
    assert [p.name for p in prepare.input_files(src, masks=True)] == [
        "a.png", "b.jpg", "b.mask.png", "c.MASK.jpg", "z0.png", "z1.png"]


def test_a_mask_without_its_photo_is_ignored_with_a_warning(tmp_path, caplog):
    src = folder(tmp_path / "in", a__png=square_photo((64, 64), (0, 0, 8, 8)))
    square_mask((64, 64), (0, 0, 8, 8)).save(src / "typo.mask.png")
    manifest = run(src, tmp_path / "out", masks=True)
    assert len(manifest) == 3 and not any("mask" in m for m in manifest)
    assert warnings_of(caplog) == ["typo.mask.png: a mask without a photo named typo.<ext>: ignored"]


def test_a_mask_of_another_size_than_its_photo_is_an_error_naming_both(tmp_path):
    src = folder(tmp_path / "in", a__jpg=square_photo((120, 80), (0, 0, 8, 8)))
    square_mask((80, 120), (0, 0, 8, 8)).save(src / "a.mask.png")
    with pytest.raises(DreampipeError, match=r"a\.mask\.png: the mask is 80x120 px but its photo .*a\.jpg is "
                                             r"120x80 px .*must have the size of its photo"):
        run(src, tmp_path / "out", masks=True)
    assert not (tmp_path / "out").exists()


def test_two_mask_files_for_one_photo_is_an_error_naming_both(tmp_path):
    src = folder(tmp_path / "in", a__jpg=square_photo((64, 64), (0, 0, 8, 8)))
    square_mask((64, 64), (0, 0, 8, 8)).save(src / "a.mask.png")
    square_mask((64, 64), (0, 0, 8, 8)).save(src / "a.mask.webp")
    with pytest.raises(DreampipeError, match=r"a\.jpg: 2 mask files \(a\.mask\.png, a\.mask\.webp\); keep one"):
        run(src, tmp_path / "out", masks=True)


def test_changing_a_mask_reruns_prepare_only_under_masked_loss(workflow):
    photos = workflow.path / "example" / "photos"
    first_photo = prepare.photo_files(photos)[0]
    with Image.open(first_photo) as im:
        square_mask(im.size, (0, 0, im.width // 2, im.height)).save(first_photo.with_suffix(".mask.png"))
    workflow.character("alice", train={"masked_loss": True})
    workflow.character("bob")
    workflow.snakemake("--until", "prepare")
    manifest = json.loads((workflow.path / "results/alice/instance/0/manifest.json").read_text())
    assert manifest[0]["mask"] == "0000.mask.png"
    assert workflow.snakemake("-n", "--until", "prepare").stdout.count("rule prepare:") == 0
    square_mask(im.size, (0, 0, 4, 4)).save(first_photo.with_suffix(".mask.png"))
    out = workflow.snakemake("-n", "--until", "prepare").stdout
    assert out.count("rule prepare:") == 1 and "character=alice" in out and "character=bob" not in out, out
