"""Aspect-ratio buckets: train on images of many shapes without cropping them to squares.

A bucket is a (width, height) of about ``resolution**2`` pixels, both sides multiples of ``step``
(the VAE's and U-Net's downsampling together, 64 for Stable Diffusion), its aspect ratio at most
``max_aspect``. An image goes to the bucket nearest its aspect ratio (in log space), is resized
to cover it and cropped only by what sticks out; every batch holds one bucket. Each sample keeps
its original size and crop offset (top, left), what SDXL's micro-conditioning takes.

:class:`BucketTransform` is the per-image half (used by folders and shards alike);
:func:`plan_epoch` the batching half for data held in memory (folders): shuffled within buckets,
batches shuffled, padded to the same count on every rank and worker.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image

from sd_lightning.core.errors import InputError
from sd_lightning.data.images import to_rgb


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of at most ``resolution**2`` pixels, sides multiples of ``step``,
    aspect ratio at most ``max_aspect``; the square ``(resolution, resolution)`` always among
    them. Sorted by aspect ratio (portrait first)."""
    if resolution % step:
        raise InputError(
            f"data.image_size={resolution} is not a multiple of data.bucket_step={step}: "
            f"use data.image_size={max(step, resolution // step * step)}"
        )
    if max_aspect < 1:
        raise InputError(f"data.max_aspect={max_aspect} must be >= 1 (2.0: up to 2:1)")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = step
    while width <= area // step:
        height = min(area // width // step * step, area // step)
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (log ratio)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def cover(image: Image.Image, size: tuple[int, int], notes: Counter | None = None) -> Image.Image:
    """``image`` as RGB (:func:`~sd_lightning.data.images.to_rgb`, which counts the images with
    transparency in ``notes``) resized to the smallest size that covers ``size`` (width, height)."""
    w, h = image.size
    bw, bh = size
    scale = max(bw / w, bh / h)
    target = (max(bw, math.ceil(w * scale - 1e-6)), max(bh, math.ceil(h * scale - 1e-6)))
    if image.format == "JPEG" and scale < 1:
        image.draft("RGB", target)
    image = to_rgb(image, notes)
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    return image


def crop(
    image: Image.Image,
    size: tuple[int, int],
    original: tuple[int, int],
    mode: str = "center",
    rng=None,
    hflip: bool = False,
) -> dict:
    """Crop a covering ``image`` (from :func:`cover`) to ``size`` (width, height).

    Returns ``image`` (uint8 CHW), ``original_size`` (of the image before :func:`cover`) and
    ``target_size`` as (height, width), and ``crop_top_left`` (top, left) in the covering image's
    pixels, the values SDXL conditions on."""
    rng = rng or random
    rw, rh = image.size
    bw, bh = size
    if mode == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    image = image.crop((left, top, left + bw, top + bh))
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - bw - left  # the crop's offset as seen in the flipped image
    array = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return {
        "image": array,
        "original_size": torch.tensor([original[1], original[0]]),
        "crop_top_left": torch.tensor([top, left]),
        "target_size": torch.tensor([bh, bw]),
    }


class BucketTransform:
    """PIL image -> the fields of :func:`crop`, in the bucket nearest its aspect ratio."""

    def __init__(
        self,
        resolution: int,
        step: int = 64,
        max_aspect: float = 2.0,
        crop: str = "random",
        hflip: bool = False,
    ):
        if crop not in ("center", "random"):
            raise InputError(f"data.crop must be 'center' or 'random', got {crop!r}")
        self.sizes = bucket_sizes(resolution, step, max_aspect)
        self.crop, self.hflip = crop, hflip

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        return nearest_bucket(width, height, self.sizes)

    def covering(self, image: Image.Image, notes: Counter | None = None):
        """``image``'s bucket, and the image as RGB resized to cover it (:func:`cover`)."""
        size = self.bucket(*image.size)
        return size, cover(image, size, notes)

    def sample(self, image: Image.Image, rng=None) -> dict:
        original = image.size  # before cover's draft() shrinks a JPEG in place
        size = self.bucket(*original)
        return crop(cover(image, size), size, original, self.crop, rng, self.hflip)


def plan_epoch(
    buckets: list[tuple[int, int]], batch_size: int, seed: int, epoch: int, shares: int
) -> list[list[int]]:
    """The epoch's batches of item indices: items shuffled within their bucket, a bucket's last
    batch filled up with its own items again, batches shuffled, their count padded (with batches
    from the start) to a multiple of ``shares`` (ranks), so every rank gets as many.
    The same for every (seed, epoch) and on every rank."""
    rng = random.Random(f"buckets-{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, bucket in enumerate(buckets):
        by_bucket[bucket].append(index)
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        rng.shuffle(items)
        items += [items[k % len(items)] for k in range(-len(items) % batch_size)]
        batches += [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    rng.shuffle(batches)
    batches += [batches[k % len(batches)] for k in range(-len(batches) % shares)]
    return batches


def batches_in_epoch(buckets: list[tuple[int, int]], batch_size: int, shares: int) -> int:
    """How many batches :func:`plan_epoch` makes (the same every epoch)."""
    counts = defaultdict(int)
    for bucket in buckets:
        counts[bucket] += 1
    n = sum(math.ceil(c / batch_size) for c in counts.values())
    return n + (-n % shares)
