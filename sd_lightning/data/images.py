"""Reading what training samples' files hold: pixels as 8-bit RGB, captions as text, and a folder
of them (``data=folder``: :func:`read_folder`, each image with a same-named ``.txt``).

:func:`to_rgb` is the one conversion every reader uses (folders, shards, both transforms).
PIL's own ``convert("RGB")`` clips 16-bit (``I;16``), 32-bit (``I``) and float (``F``) pixels to
8 bits, which turns most of such an image white, and drops alpha, which turns transparent pixels
black (or whatever colour they hide). Here high-bit-depth pixels are scaled to 8 bits (their
true brightness), and images with transparency are composited on white, as kohya's sd-scripts
and diffusers' training scripts do.

:func:`decode_text` reads a caption that can be read unambiguously: UTF-8 (a BOM stripped) or
UTF-16 with a BOM; anything else raises :class:`TextEncodingError` with the byte offset.

:func:`image_files` follows symlinked subfolders, each real folder and file once (a link back to
a parent neither loops nor adds an image twice).
"""

from __future__ import annotations

import codecs
import logging
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sd_lightning import stopping
from sd_lightning.errors import InputError

if TYPE_CHECKING:
    import torch

    from sd_lightning.data.buckets import BucketTransform

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # what transparent pixels become
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
TRANSPARENT = "transparent"  # the key :func:`to_rgb` counts composited images under
TRANSPARENCY_NOTE = "composited on white (transparent pixels train as white)"


def has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` may have transparent pixels (an alpha band or a transparent colour);
    from its header, without decoding it."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as ``L`` (or ``LA`` with its transparent value)."""
    values = np.asarray(image)
    if image.mode == "F":  # [0, 1] if it fits, else [0, 255]
        values = np.nan_to_num(values.astype(np.float64))
        scaled = values * 255 if values.max(initial=0) <= 1 else values
    elif image.mode == "I" and values.max(initial=0) > 65535:  # really 32-bit data
        scaled = values.astype(np.float64) * (255 / 2147483647)
    else:  # I;16 (any byte order), and I holding 16-bit data (PNGs in some Pillow versions)
        scaled = values.astype(np.float64) / 257
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":  # a 16-bit PNG's tRNS grey value
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        grey = Image.merge("LA", (grey, Image.fromarray(alpha, "L")))
    return grey


def to_rgb(image: Image.Image, notes: Counter | None = None, background=BACKGROUND) -> Image.Image:
    """``image`` in any PIL mode as 8-bit RGB at its true brightness, transparency composited
    on ``background``. Counts an image with transparent pixels in ``notes[TRANSPARENT]``, so
    that the caller can say so once for all of them. An RGB image is returned as it is."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in HIGH_BIT_MODES:
        image = _to_8bit(image)
    if not has_transparency(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")  # uses the alpha band, or the transparent colour
    if rgba.getchannel("A").getextrema()[0] == 255:  # nothing is transparent after all
        return rgba.convert("RGB")
    if notes is not None:
        notes[TRANSPARENT] += 1
    ground = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(ground, rgba).convert("RGB")


class TextEncodingError(ValueError):
    """Text that is neither UTF-8 nor UTF-16 with a BOM; ``offset``: the first bad byte."""

    def __init__(self, name: str, offset: int, data: bytes, codec: str = "utf-8"):
        self.offset = offset
        bad = data[offset : offset + 4]
        if codec == "utf-8":
            what = f"not UTF-8: byte {offset} ({bad!r}) is no UTF-8 character (Latin-1 text?)"
        else:
            what = f"not {codec.upper()} after its BOM: bytes {offset}.. ({bad!r}) are invalid"
        super().__init__(f"{name} is {what}")


BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode_text(data: bytes, name: str = "text") -> str:
    """``data`` as text: UTF-8 (a leading BOM stripped), or UTF-16 with its BOM (LE or BE);
    else :class:`TextEncodingError` naming ``name`` and the first bad byte."""
    bom, codec = next(((b, c) for b, c in BOMS if data.startswith(b)), (b"", "utf-8"))
    try:
        return data[len(bom) :].decode(codec)
    except UnicodeDecodeError as e:
        raise TextEncodingError(name, len(bom) + e.start, data, codec) from None


EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LOGGED_BAD = 3


@dataclass(eq=False)
class Item:
    """One image in memory: covering its bucket, with its caption and loss weight."""

    image: Image.Image
    bucket: tuple[int, int]
    original: tuple[int, int]  # (width, height) as found
    caption: str
    weight: float = 1.0
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


def image_files(path: str) -> list[str]:
    """The images under ``path``, sorted, through symlinked folders too: each real folder and
    file once (a link back to a parent or to a folder already walked adds nothing)."""
    found, seen_dirs, seen_files = [], {os.path.realpath(path)}, set()
    for root, dirs, names in os.walk(path, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if real not in seen_dirs:
                seen_dirs.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            real = os.path.realpath(os.path.join(root, name))
            if name.lower().endswith(EXTENSIONS) and real not in seen_files:
                seen_files.add(real)
                found.append(os.path.join(root, name))
    return found


def read_caption(text: str) -> str | None:
    """The caption in ``text`` (UTF-8, a BOM stripped, or UTF-16 with a BOM); ``None`` for an
    empty one. Other bytes: an :class:`InputError` naming the file, the byte and the fix."""
    with open(text, "rb") as f:
        data = f.read()
    try:
        return decode_text(data, f"caption {text}").strip() or None  # empty: as if none
    except TextEncodingError as e:
        raise InputError(
            f"{e}: save it as UTF-8, e.g. iconv -f latin1 -t utf-8 "
            f"{shlex.quote(text)} > fixed.txt && mv fixed.txt {shlex.quote(text)}"
        ) from None


def read_folder(
    path: str, caption: str | None, transform: BucketTransform, option: str, weight: float = 1.0
) -> list[Item]:
    """The images of ``path`` as :class:`Item` (unreadable ones skipped, counted, logged).
    Captions are all read first: a missing or unreadable one stops the run before any image."""
    if not os.path.isdir(path):
        raise InputError(
            f"{option}={path!r} is not a folder: give a folder of images "
            f"({', '.join(EXTENSIONS)}), each with an optional same-named .txt caption"
        )
    files = image_files(path)
    captions, uncaptioned = {}, []
    for name in files:
        text = os.path.splitext(name)[0] + ".txt"
        captions[name] = (read_caption(text) if os.path.isfile(text) else None) or caption
        if captions[name] is None:
            uncaptioned.append(name)
    if uncaptioned:
        caption_option = option.replace("path", "caption")  # data.caption, data.prior_caption
        raise InputError(
            f"{len(uncaptioned)} image(s) in {path} have no caption ({uncaptioned[0]}...): put a "
            f"same-named .txt beside each, or set one caption for all with {caption_option}='...'"
        )
    items, bad, small, notes = [], [], 0, Counter()
    for name in files:
        stopping.check(f"reading {option}")
        try:
            with Image.open(name) as image:
                image = ImageOps.exif_transpose(image)  # phone photos: their stored rotation
                size = image.size
                bucket, covered = transform.covering(image, notes)
        except Exception as e:  # noqa: BLE001 - any unreadable image is skipped and counted
            bad.append(name)
            if len(bad) <= LOGGED_BAD:
                log.warning("skipping unreadable image %s: %r", name, e)
            continue
        small += size[0] < bucket[0] or size[1] < bucket[1]
        items.append(Item(covered, bucket, size, captions[name], weight))
    if bad:
        log.warning(
            "%s: skipped %d of %d images that could not be read", path, len(bad), len(files)
        )
    if not items:
        raise InputError(
            f"{option}={path!r} holds no readable image ({', '.join(EXTENSIONS)}): "
            f"{len(files)} found, {len(bad)} unreadable"
        )
    if notes[TRANSPARENT]:
        log.info(
            "%s: %d image(s) with transparency %s", path, notes[TRANSPARENT], TRANSPARENCY_NOTE
        )
    if small:
        log.warning(
            "%s: %d image(s) smaller than their bucket were upscaled (they train blurry; "
            "remove them or lower data.image_size)",
            path,
            small,
        )
    return items
