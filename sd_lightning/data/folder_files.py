"""A folder of images and captions (``data=folder``): every image under it, symlinked subfolders
followed (each real folder and file once: a link back to a parent neither loops nor adds an image
twice), each image with a same-named ``.txt`` caption or one for all, read into memory in the
bucket nearest its aspect ratio."""

from __future__ import annotations

import logging
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps

from sd_lightning.core import stopping
from sd_lightning.core.errors import InputError
from sd_lightning.data.buckets import BucketTransform
from sd_lightning.data.images import TRANSPARENCY_NOTE, TRANSPARENT, TextEncodingError, decode_text

log = logging.getLogger(__name__)

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
