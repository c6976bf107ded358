"""Prepare: photos become square, padded, upright, opaque training images."""

import json

import numpy as np
import pytest
from PIL import Image

from dreampipe import prepare
from dreampipe.errors import DreampipeError


def run(src, out, **kw):
    args = {"resolution": 64, "mode": "pad", "background": "white", "instance_prompt": "a photo of sks dog"}
    return prepare.run(src, out, **{**args, **kw})


def photos(folder, *images):
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"p{i}.png")
    return folder


def test_output_is_square_at_the_resolution_padded_white_and_centred(tmp_path):
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    src = photos(tmp_path / "in", wide, wide, wide)
    run(src, tmp_path / "out")
    arr = np.asarray(Image.open(tmp_path / "out" / "0000.png"))
    assert arr.shape == (64, 64, 3)
    # red band of 64x32 in the middle, white above and below
    assert (arr[20:44, :, 0] > 240).all() and (arr[20:44, :, 1] < 15).all()
    assert (arr[:12] == 255).all() and (arr[-12:] == 255).all()


def test_padding_colour_is_configurable(tmp_path):
    tall = Image.new("RGB", (50, 100), (0, 0, 255))
    src = photos(tmp_path / "in", tall, tall, tall)
    run(src, tmp_path / "out", background="black")
    arr = np.asarray(Image.open(tmp_path / "out" / "0000.png"))
    assert (arr[:, :10] == 0).all() and (arr[:, -10:] == 0).all()
    assert (arr[:, 28:36, 2] > 240).all()


def test_exif_rotation_is_applied(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # stored 40x80 with the top half red; orientation 6 means "rotate 90 CW to display",
    # so the displayed image is 80x40 with the red half on the right
    stored = Image.new("RGB", (40, 80), (0, 255, 0))
    stored.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(3):
        stored.save(src / f"p{i}.jpg", quality=95, exif=exif)
    manifest = run(src, tmp_path / "out")
    arr = np.asarray(Image.open(tmp_path / "out" / "0000.png")).astype(int)
    assert arr[32, 56, 0] > 200 and arr[32, 56, 1] < 60, "right half is red"
    assert arr[32, 8, 1] > 200 and arr[32, 8, 0] < 60, "left half is green"
    assert (arr[:8] > 245).all(), "landscape after rotation: padded above"
    assert any("auto-orient" in op for op in manifest[0]["operations"])


def test_alpha_is_flattened_onto_the_background(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (16, 16, 48, 48))
    src = photos(tmp_path / "in", im, im, im)
    run(src, tmp_path / "out")
    out = Image.open(tmp_path / "out" / "0000.png")
    assert out.mode == "RGB"
    arr = np.asarray(out)
    assert (arr[2, 2] == 255).all(), "transparent corner became white"
    assert tuple(arr[32, 32]) == (255, 0, 0)


def test_manifest_contact_sheet_and_sidecar_captions(tmp_path):
    src = photos(tmp_path / "in", *[Image.new("RGB", (80, 80), c) for c in ("red", "green", "blue")])
    (src / "p1.txt").write_text("a photo of sks dog in the snow\n")
    (src / ".DS_Store").write_bytes(b"\0\1")
    manifest = run(src, tmp_path / "out")
    assert [m["caption"] for m in manifest] == ["a photo of sks dog", "a photo of sks dog in the snow",
                                                "a photo of sks dog"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert Image.open(tmp_path / "out" / "contact_sheet.png").width > 64


def test_bad_files_are_all_listed_in_one_message(tmp_path):
    src = photos(tmp_path / "in", *[Image.new("RGB", (80, 80))] * 3)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4 nope")
    with pytest.raises(DreampipeError, match=r"2 file\(s\) are not usable images.*broken\.jpg.*notes\.pdf"):
        run(src, tmp_path / "out")


def test_too_few_photos_is_an_error_that_explains_why(tmp_path):
    src = photos(tmp_path / "in", Image.new("RGB", (80, 80)))
    with pytest.raises(DreampipeError, match="1 usable photo.*at least 3"):
        run(src, tmp_path / "out")


def test_resolution_must_be_a_multiple_of_64(tmp_path):
    src = photos(tmp_path / "in", *[Image.new("RGB", (80, 80))] * 3)
    with pytest.raises(DreampipeError, match="multiple of 64"):
        run(src, tmp_path / "out", resolution=100)
