"""Image transforms: resize the shorter side (PIL bicubic, antialiased), crop, optional flip,
to a uint8 tensor; :func:`to_model_range` makes it float in [-1, 1] after the transfer to the
device (4x less to move between processes and to the GPU than float32).

JPEGs are decoded at reduced scale where that still leaves at least the target size
(``Image.draft``: the decoder skips the detail the resize would throw away), which makes large
web images several times cheaper to load. Every mode becomes RGB through
:func:`~sd_lightning.data.images.to_rgb` (16-bit and float pixels scaled, transparency on white).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from sd_lightning.data.images import to_rgb


class ImageTransform:
    """PIL image (any mode) -> uint8 tensor (3, size, size)."""

    def __init__(self, size: int, crop: str = "center", hflip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {crop!r}")
        self.size, self.crop, self.hflip = size, crop, hflip

    def resized(self, image: Image.Image) -> Image.Image:
        """Decode (at reduced scale where possible) and resize the shorter side to ``size``."""
        w, h = image.size
        scale = self.size / min(w, h)
        target = (max(self.size, math.ceil(w * scale)), max(self.size, math.ceil(h * scale)))
        if image.format == "JPEG" and scale < 1:
            image.draft("RGB", target)
        image = to_rgb(image)  # any mode, at its true brightness, transparency on white
        if image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC)
        return image

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``rng`` draws the random crop and flip (the pipeline seeds one per worker stream, so
        a restarted run crops alike); without it, Python's global ``random``."""
        return self.sample(image, rng)["image"]

    def sample(self, image: Image.Image, rng: random.Random | None = None) -> dict:
        """The square crop (``image``, uint8 CHW) with its ``original_size`` and
        ``target_size`` (height, width) and ``crop_top_left`` (top, left) in the resized image,
        the fields SDXL's micro-conditioning takes."""
        rng = rng or random
        original = image.size
        image = self.resized(image)
        w, h, s = *image.size, self.size
        if self.crop == "center":
            left, top = (w - s) // 2, (h - s) // 2
        else:
            left, top = rng.randint(0, w - s), rng.randint(0, h - s)
        image = image.crop((left, top, left + s, top + s))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = w - s - left
        array = torch.from_numpy(np.array(image, dtype=np.uint8))
        return {
            "image": array.permute(2, 0, 1),  # a view: collate's stack makes the batch contiguous
            "original_size": torch.tensor([original[1], original[0]]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([s, s]),
        }


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]; float images pass through."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)
