"""Inputs as people have them: images of every PIL mode (16-bit grey, palettes, transparency,
CMYK, 1-bit) come out RGB at their true brightness, transparency on white, said once, through
``data=folder`` and the shard decoder alike; captions in UTF-8 with a BOM or UTF-16 are read, and
other bytes stop a folder run naming the file (shards skip and count them); symlinked subfolders
are followed, each real folder once."""

from __future__ import annotations

import codecs
import io
import logging
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sd_lightning.core.errors import InputError
from sd_lightning.data.buckets import BucketTransform
from sd_lightning.data.folder_files import image_files, read_folder
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.transforms import ImageTransform

WHITE, RED = (255, 255, 255), (200, 10, 10)
MID = 32896  # 16-bit mid-grey: 128 * 257


def _halves(left, right, dtype=np.uint8, channels=None):
    """An 8x8 array whose left half is ``left`` and right half ``right``."""
    shape = (8, 8) if channels is None else (8, 8, channels)
    a = np.empty(shape, dtype)
    a[:, :4], a[:, 4:] = left, right
    return a


def _palette(transparent: bool) -> Image.Image:
    image = Image.fromarray(_halves(0, 1), "L").convert("P")
    image.putpalette([*RED, 0, 0, 0])
    if transparent:
        image.info["transparency"] = 1  # palette entry 1 (the right half) is transparent
    return image


def _rgb_with_key() -> Image.Image:  # an RGB PNG whose tRNS colour is black
    image = Image.fromarray(_halves(RED, 0, channels=3))
    image.info["transparency"] = (0, 0, 0)
    return image


# name: (the image, the expected RGB of its left half, of its right half); every one is written
# to disk and read back as it would be from a user's folder or a shard
MODES = {
    "L.png": (lambda: Image.fromarray(_halves(128, 30)), (128,) * 3, (30,) * 3),
    "I16.png": (lambda: Image.fromarray(_halves(MID, 257 * 30, np.uint16)), (128,) * 3, (30,) * 3),
    "I16B.png": (
        lambda: Image.frombytes("I;16B", (8, 8), _halves(MID, 0, ">u2").tobytes()),
        (128,) * 3,
        (0,) * 3,
    ),
    "LA.png": (lambda: Image.fromarray(_halves((90, 255), 0, channels=2), "LA"), (90,) * 3, WHITE),
    "RGBA.png": (lambda: Image.fromarray(_halves((*RED, 255), 0, channels=4)), RED, WHITE),
    "P.png": (lambda: _palette(False), RED, (0, 0, 0)),
    "P_transparent.png": (lambda: _palette(True), RED, WHITE),
    "RGB_key.png": (_rgb_with_key, RED, WHITE),
    "1.png": (lambda: Image.fromarray(_halves(False, True, bool)), (0,) * 3, WHITE),
    "CMYK.jpg": (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0), (255, 0, 0)),
}
TRANSPARENT = ["LA.png", "RGBA.png", "P_transparent.png", "RGB_key.png"]


def _assert_halves(rgb: np.ndarray, left, right, name: str, atol: int = 0) -> None:
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8, name
    tol = 12 if name.endswith(".jpg") else atol  # JPEG is lossy
    for half, want in ((rgb[:, :4], left), (rgb[:, 4:], right)):
        assert np.abs(half.astype(int) - np.array(want)).max() <= tol, (name, half[0, 0], want)


@pytest.fixture
def modes(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    for name, (make, *_) in MODES.items():
        make().save(folder / name)
    assert Image.open(folder / "I16.png").mode == "I;16"  # what Pillow reads a 16-bit PNG as
    return folder


def test_every_mode_becomes_rgb_at_its_true_brightness_in_a_folder(modes, caplog):
    caplog.set_level(logging.INFO)
    items = read_folder(str(modes), "x", BucketTransform(8, 8, 1.0, "center"), "data.path")
    by_name = dict(zip(sorted(MODES), items))
    for name, (_, left, right) in MODES.items():
        _assert_halves(np.array(by_name[name].image), left, right, name)
    notes = [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
    assert notes == [
        f"{modes}: {len(TRANSPARENT)} image(s) with transparency composited on "
        "white (transparent pixels train as white)"
    ]  # once, with the count


def test_the_shard_decoder_converts_alike_and_says_so_once(modes, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for name in sorted(MODES):
            ext = "jpg" if name.endswith(".jpg") else "png"
            data = (modes / name).read_bytes()
            sink.write({"__key__": name.split(".")[0], ext: data, "txt": name.encode()})
    for transform in (ImageTransform(8), BucketTransform(8, 8, 1.0, "center")):
        caplog.clear()
        pipeline = ShardPipeline(
            [str(tmp_path / "0.tar")], transform, 1, resampled=False, shuffle_buffer=0
        )
        batches = list(pipeline)
        assert len(batches) == len(MODES)
        for batch in batches:
            name = batch["caption"][0]
            rgb = batch["image"][0].permute(1, 2, 0).numpy()
            _assert_halves(rgb, MODES[name][1], MODES[name][2], name)
        notes = [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
        assert len(notes) == 1 and "composited on white" in notes[0], notes


def test_modes_pillow_cannot_write_to_png_convert_by_their_range():
    from sd_lightning.data.images import to_rgb

    cases = [  # (image, expected grey)
        (Image.fromarray(np.full((4, 4), MID, np.int32)), 128),  # I holding 16-bit data
        (Image.fromarray(np.full((4, 4), 1 << 30, np.int32)), 128),  # I holding 32-bit data
        (Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),  # F in [0, 1]
        (Image.fromarray(np.full((4, 4), 77.0, np.float32)), 77),  # F in [0, 255]
        (Image.frombytes("I;16L", (4, 4), np.full(16, MID, "<u2").tobytes()), 128),
        (Image.frombytes("I;16B", (4, 4), np.full(16, MID, ">u2").tobytes()), 128),
    ]
    for image, grey in cases:
        out = to_rgb(image)
        assert out.mode == "RGB" and np.array(out).tolist() == np.full((4, 4, 3), grey).tolist()
    pa = _palette(False).convert("PA")
    pa.putalpha(Image.fromarray(_halves(255, 0)))
    _assert_halves(np.array(to_rgb(pa)), RED, WHITE, "PA")
    opaque = Image.new("RGB", (4, 4), RED)
    assert to_rgb(opaque) is opaque  # RGB as it is: no copy


def _caption_folder(tmp_path, captions: dict[str, bytes]):
    folder = tmp_path / "captions"
    folder.mkdir()
    for i, (name, data) in enumerate(captions.items()):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(data)
    return folder


def test_captions_in_utf8_with_a_bom_and_utf16_are_read(tmp_path):
    cafe = "un café"
    folder = _caption_folder(
        tmp_path,
        {
            "a_plain": cafe.encode(),
            "b_bom": codecs.BOM_UTF8 + cafe.encode(),
            "c_utf16le": codecs.BOM_UTF16_LE + cafe.encode("utf-16-le"),
            "d_utf16be": codecs.BOM_UTF16_BE + cafe.encode("utf-16-be"),
        },
    )
    items = read_folder(str(folder), None, BucketTransform(8, 8, 1.0), "data.path")
    assert [i.caption for i in items] == [cafe] * 4


def test_a_latin1_caption_stops_a_folder_naming_the_file_before_any_image(tmp_path, caplog):
    folder = _caption_folder(tmp_path, {"a": b"fine", "b": b"caf\xe9 au lait"})
    (folder / "0_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # read first, if images were
    (folder / "0_broken.txt").write_text("x")
    with pytest.raises(InputError) as error:
        read_folder(str(folder), None, BucketTransform(8, 8, 1.0), "data.path")
    message = str(error.value)
    assert str(folder / "b.txt") in message and "byte 3" in message
    assert "iconv -f latin1 -t utf-8" in message
    assert "skipping unreadable image" not in caplog.text  # no image was decoded


def test_shards_skip_and_count_an_undecodable_caption(tmp_path, caplog):
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    captions = {  # the bad one first: a skip is reported with the next batch
        "latin1": "café".encode("latin-1"),
        "plain": "café".encode(),
        "bom": codecs.BOM_UTF8 + "café".encode(),
        "utf16": codecs.BOM_UTF16_LE + "café".encode("utf-16-le"),
    }
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for key, text in captions.items():
            sink.write({"__key__": key, "png": image.getvalue(), "txt": text})
    batches = list(
        ShardPipeline(
            [str(tmp_path / "0.tar")], ImageTransform(8), 1, resampled=False, shuffle_buffer=0
        )
    )
    assert sorted(k for b in batches for k in b["key"]) == ["bom", "plain", "utf16"]
    assert {c for b in batches for c in b["caption"]} == {"café"}
    assert sum(b["skipped"]["decode"] for b in batches) == 1
    assert "latin1.txt is not UTF-8: byte 3" in caplog.text


def test_symlinked_subfolders_are_followed_each_real_folder_once(tmp_path):
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a" / "1.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "2.png")
    os.symlink(elsewhere, root / "linked")  # a folder kept somewhere else
    os.symlink(root, root / "a" / "loop")  # back to a parent: must not loop
    os.symlink(root / "a", root / "b_again")  # a folder walked already: no duplicates
    os.symlink(root / "a" / "1.png", root / "same.png")  # one image, two names
    found = image_files(str(root))
    assert [os.path.relpath(f, root) for f in found] == ["same.png", "linked/2.png"]
    items = read_folder(str(root), "x", BucketTransform(8, 8, 1.0), "data.path")
    assert len(items) == 2
