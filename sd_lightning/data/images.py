"""Pixels and text as training samples' files hold them: any image as 8-bit RGB, captions as text,
and generated images back to PNG.

:func:`to_rgb` is the one conversion every reader uses (folders, shards, both transforms).
PIL's own ``convert("RGB")`` clips 16-bit (``I;16``), 32-bit (``I``) and float (``F``) pixels to
8 bits, which turns most of such an image white, and drops alpha, which turns transparent pixels
black (or whatever colour they hide). Here high-bit-depth pixels are scaled to 8 bits (their
true brightness), and images with transparency are composited on white, as kohya's sd-scripts
and diffusers' training scripts do.

:func:`decode_text` reads a caption that can be read unambiguously: UTF-8 (a BOM stripped) or
UTF-16 with a BOM; anything else raises :class:`TextEncodingError` with the byte offset.

"""

from __future__ import annotations

import codecs
import logging
from collections import Counter

import numpy as np
import torch
from PIL import Image

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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> [0, 255] uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_png(image: torch.Tensor, path: str) -> None:
    """uint8 CHW -> PNG (PIL; torchvision's image I/O is deprecated)."""
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
