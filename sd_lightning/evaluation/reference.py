"""The reference set of an evaluation: real images from shards or a folder, centre-cropped and
resized to the evaluated size, and their Inception features, cached on disk.

The cache file is named by a hash of what determines the features: the reference files (paths,
sizes, modification times), how many images are used, the size, the resize protocol, the feature
width and the Inception weights' sha256. A later run (or another rank) with the same key reads it
instead of reading the images again."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sd_lightning.core import stopping
from sd_lightning.core.atomic import beside, share
from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)
OPTION = "eval.reference"
SHARD_STRIDE = 10**8  # an image's key: shard index x stride + position in the shard


@dataclass
class ReferenceSet:
    """What ``eval.reference`` names: shard URLs, or the image files of a folder."""

    source: str
    units: list[str]
    shards: bool

    @classmethod
    def of(cls, source: str | None) -> ReferenceSet:
        from sd_lightning.data.folder_files import EXTENSIONS, image_files
        from sd_lightning.data.shards import expand_urls

        if not source:
            raise InputError(
                f"{OPTION} is not set: give the real images to compare with (shards, "
                "/data/coco/{00000..00059}.tar, or a folder of images)"
            )
        source = str(source)
        if os.path.isdir(source):
            files = image_files(source)
            if not files:
                raise InputError(
                    f"{OPTION}={source!r} holds no image ({', '.join(EXTENSIONS)}): give a folder "
                    "of real images or shards"
                )
            return cls(source, files, shards=False)
        try:
            return cls(source, expand_urls(source, OPTION), shards=True)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"{e} (give shards or a folder of real images)") from None

    def key(self, **settings: object) -> str:
        """A hash of the files (path, size, modification time) and ``settings``."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for unit in self.units:
            stat = os.stat(unit) if os.path.exists(unit) else None
            where = (unit, stat.st_size, stat.st_mtime_ns) if stat else (unit,)
            digest.update(repr(where).encode())
        return digest.hexdigest()[:20]

    def images(
        self,
        size: int,
        rank: int,
        world: int,
        skipped: Counter,
        crop: bool = True,
        lanczos: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor, str]]:
        """(key, uint8 3 x size x size image, caption or "") of this rank's share: every
        ``world``-th shard, or file, from ``rank``; unreadable images counted in ``skipped``.
        ``crop``: the centred square (else the whole image squashed, as MLPerf's COCO set);
        ``lanczos``: resized with Lanczos (GigaGAN's protocol) instead of bicubic."""
        from PIL import Image

        if not self.shards:
            for i in range(rank, len(self.units), world):
                stopping.check(f"reading {OPTION}")
                try:
                    with Image.open(self.units[i]) as image:
                        yield i, square(image, size, crop, lanczos), ""
                except Exception as e:  # noqa: BLE001 - any unreadable image is counted
                    _skip(skipped, self.units[i], e)
            return
        from sd_lightning.data.pipeline import IMAGE_KEYS, caption_of
        from sd_lightning.data.tar import shard_samples

        for s in range(rank, len(self.units), world):
            stopping.check(f"reading {OPTION}")
            for pos, sample in enumerate(shard_samples([self.units[s]], skipped)):
                name = next((k for k in IMAGE_KEYS if k in sample), None)
                try:
                    caption = caption_of(sample) if name else ""
                    with Image.open(io.BytesIO(sample[name])) as image:
                        yield s * SHARD_STRIDE + pos, square(image, size, crop, lanczos), caption
                except Exception as e:  # noqa: BLE001 - no image, or an unreadable one
                    _skip(skipped, f"{sample.get('__key__')} in {self.units[s]}", e)


def _skip(skipped: Counter, what: str, error: BaseException) -> None:
    skipped["image"] += 1
    if skipped["image"] <= 3:
        log.warning("skipping unreadable reference image %s: %r", what, error)


def square(image, size: int, crop: bool = True, lanczos: bool = False) -> torch.Tensor:
    """The image as RGB, centre-cropped to a square (``crop``; torchvision's centre), resized (PIL
    bicubic, or Lanczos) to ``size`` x ``size``: uint8 CHW. No EXIF rotation: the FID libraries
    and the protocols' scripts read pixels as stored."""
    from PIL import Image

    from sd_lightning.data.images import to_rgb

    image = to_rgb(image)
    if crop:
        side = min(image.size)
        left = int(round((image.width - side) / 2.0))
        top = int(round((image.height - side) / 2.0))
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.LANCZOS if lanczos else Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def batches(
    items: Iterator[tuple[int, torch.Tensor, str]], size: int
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """(keys, uint8 images N x 3 x H x W, captions) of at most ``size`` items."""
    keys, images, captions = [], [], []
    for key, image, caption in items:
        keys.append(key)
        images.append(image)
        captions.append(caption)
        if len(keys) == size:
            yield keys, torch.stack(images), captions
            keys, images, captions = [], [], []
    if keys:
        yield keys, torch.stack(images), captions


def reference_features(
    reference: ReferenceSet,
    features: Callable[[torch.Tensor], torch.Tensor],
    gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    world: int,
    size: int,
    limit: int | None,
    batch_size: int,
    cache: str,
    crop: bool = True,
    lanczos: bool = False,
    agree: Callable[[bool], bool] = bool,
) -> np.ndarray:
    """The features (float32, N x dims) of the first ``limit`` reference images (all: None),
    read from ``cache`` if there, else computed over the ranks and written there by rank 0.
    ``agree``: rank 0's answer on every rank (whether the cache is there: one answer, or some
    ranks would wait in a gather the others skip)."""
    if agree(os.path.isfile(cache)):
        with np.load(cache) as stored:
            log.info("reference features: %d from the cache %s", len(stored["features"]), cache)
            return stored["features"]
    skipped: Counter = Counter()
    keys, rows = [], []
    for batch_keys, images, _ in batches(
        reference.images(size, rank, world, skipped, crop, lanczos), batch_size
    ):
        rows.append(features(images).cpu())
        keys.extend(batch_keys)
    local = torch.cat(rows) if rows else torch.zeros((0, _width(features)))
    width = local.shape[1]
    all_rows, _ = gather(local, torch.tensor(keys, dtype=torch.long))
    found = all_rows.numpy().astype(np.float32)
    if limit is not None:
        found = found[:limit]
    if skipped and rank == 0:
        log.warning(
            "%s: %d unreadable reference images skipped", reference.source, sum(skipped.values())
        )
    if rank == 0 and len(found):
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        part = beside(cache, "part") + ".npz"
        np.savez(part, features=found, width=width)
        os.replace(part, cache)
        share(cache)
        log.info(
            "reference features: %d images of %s, cached in %s", len(found), reference.source, cache
        )
    return found


def _width(features: Callable[[torch.Tensor], torch.Tensor]) -> int:
    return int(getattr(features, "dims", 0))
