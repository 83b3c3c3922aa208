"""``WebDataModule``: WebDataset shards (or the generated demo set) for training and validation."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from sd_lightning.core.errors import InputError
from sd_lightning.data.buckets import BucketTransform
from sd_lightning.data.demo import make_demo_shards
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.position import PositionedDataModule
from sd_lightning.data.shards import expand_sources, expand_urls
from sd_lightning.data.transforms import ImageTransform

log = logging.getLogger(__name__)


def _sizes_from_json(urls: list[str]) -> int | None:
    """Total samples of ``urls`` from a ``sizes.json`` (shard name -> count) beside them."""
    total = 0
    cache: dict[str, dict] = {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in cache:
            path = os.path.join(folder, "sizes.json")
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                cache[folder] = json.load(f)
        if name not in cache[folder]:
            return None
        total += int(cache[folder][name])
    return total


class WebDataModule(PositionedDataModule):
    """Images and captions from WebDataset shards.

    Args:
        urls: training shards (brace patterns, globs, ``::``-joined sources). ``None``: the demo set.
        val_urls: validation shards. ``None``: hold out the last ``val_shards`` of ``urls``.
        val_shards: shards held out of ``urls`` for validation when ``val_urls`` is not given.
        image_size: side of the square training crop (pixels).
        batch_size: per-device batch size.
        num_workers: DataLoader workers per device.
        samples_per_epoch: epoch length over all ranks; ``None`` reads ``sizes.json`` beside the
            shards. Every rank gets the same number of batches.
        mode: ``resampled`` (shards drawn with replacement, seeded by seed, epoch, rank and worker)
            or ``exact`` (each shard once per pass, split by rank and worker; needs at least
            workers x ranks shards).
        url_weights: sampling weights of the ``::``-joined sources of ``urls`` (resampled mode);
            ``None``: every shard equally likely.
        demo: arguments of :func:`make_demo_shards` (used when ``urls`` is ``None``).
        max_bad_shards: shards in a row without a usable sample (not a tar file, empty, a failing
            ``pipe:`` command, every sample skipped) before the run stops with an error naming
            them; ``None``: no limit.
        shard_retries: more tries for a remote shard (``pipe:``, ``http:``) that fails before its
            first sample.
        buckets: aspect-ratio buckets of about ``image_size**2`` pixels (sides multiples of
            ``bucket_step``, ratios up to ``max_aspect``) instead of square crops; every batch
            one bucket (:mod:`sd_lightning.data.buckets`). Validation stays square.
    """

    def __init__(
        self,
        urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        val_shards: int = 1,
        image_size: int = 64,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        crop: str = "random",
        hflip: bool = False,
        min_size: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        demo: dict[str, Any] | None = None,
        mode: str = "resampled",
        url_weights: list[float] | None = None,
        max_bad_shards: int | None = 8,
        shard_retries: int = 2,
        buckets: bool = False,
        bucket_step: int = 64,
        max_aspect: float = 2.0,
    ):
        super().__init__()
        self.stream_checks = {"max_bad_shards": max_bad_shards, "shard_retries": shard_retries}
        if image_size <= 0:
            raise InputError(f"data.image_size must be positive, got {image_size}")
        if batch_size <= 0:
            raise InputError(f"data.batch_size must be positive, got {batch_size}")
        if mode not in ("resampled", "exact"):
            raise InputError(f"data.mode must be 'resampled' or 'exact', got {mode!r}")
        self.mode = mode
        self.url_weights = [float(w) for w in url_weights] if url_weights is not None else None
        if self.url_weights is not None and (
            any(w < 0 for w in self.url_weights) or sum(self.url_weights) <= 0
        ):
            raise InputError(
                f"data.url_weights must be >= 0 with a positive sum, got {url_weights}"
            )
        self.train_sources: list[list[str]] = []
        self.urls, self.val_urls, self.val_shards = urls, val_urls, val_shards
        self.image_size, self.batch_size = image_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.samples_per_epoch = num_workers, samples_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.buckets, self.bucket_step = buckets, bucket_step
        self.train_transform = (
            BucketTransform(image_size, bucket_step, max_aspect, crop=crop, hflip=hflip)
            if buckets
            else ImageTransform(image_size, crop=crop, hflip=hflip)
        )
        self.val_transform = ImageTransform(image_size, crop="center")
        self.min_size = min_size
        self.demo = dict(demo or {})
        self.train_shard_urls: list[str] = []
        self.val_shard_urls: list[str] = []

    # -- data on disk ----------------------------------------------------------------------------
    @property
    def uses_demo(self) -> bool:
        return self.urls is None

    def prepare_data(self) -> None:
        """Generate the demo shards once (local rank 0 only, per Lightning's contract)."""
        if self.uses_demo:
            make_demo_shards(**self.demo)

    def setup(self, stage: str | None = None) -> None:
        if self.uses_demo:
            demo_urls = make_demo_shards(**self.demo)  # already written: only returns the URLs
            urls, val_urls = demo_urls["train"], self.val_urls or demo_urls["val"]
        else:
            urls, val_urls = self.urls, self.val_urls
        sources = expand_sources(urls, "data.urls")
        if self.url_weights is not None and len(self.url_weights) != len(sources):
            raise InputError(
                f"data.url_weights has {len(self.url_weights)} weights for {len(sources)} "
                f"'::'-joined sources in data.urls; give one weight per source"
            )
        train = [u for source in sources for u in source]
        if val_urls is not None:
            val = expand_urls(val_urls, "data.val_urls")
        elif self.val_shards > 0 and len(train) > self.val_shards:
            train, val = train[: -self.val_shards], train[-self.val_shards :]
            log.info(
                "holding out the last %d shard(s) of data.urls for validation", self.val_shards
            )
        else:
            val = []
            log.warning("no validation shards (data.val_urls unset and too few shards to hold out)")
        held_out = set(val) if val_urls is None else set()
        self.train_sources = [[u for u in source if u not in held_out] for source in sources]
        if self.url_weights is not None and not all(self.train_sources):
            raise InputError(
                "holding out validation shards emptied a source of data.urls: "
                "set data.val_urls or data.val_shards=0"
            )
        self.train_shard_urls, self.val_shard_urls = train, val
        if self.samples_per_epoch is None:
            self.samples_per_epoch = _sizes_from_json(train)
            if self.samples_per_epoch is None:
                raise InputError(
                    "data.samples_per_epoch is unset and no sizes.json lists every training shard; "
                    "set data.samples_per_epoch=N (samples in one epoch over all ranks)"
                )

    # -- loaders ---------------------------------------------------------------------------------
    def sample_decoder(self, train: bool):
        """Raw sample -> batch fields; ``None``: images and captions (subclasses read others)."""
        return None

    def batches_per_epoch(self) -> int:
        """Training batches per rank in one epoch (the same on every rank)."""
        per_rank = self.samples_per_epoch / (self.batch_size * self._world_size())
        return max(1, math.ceil(per_rank / max(1, self.num_workers))) * max(1, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        workers = max(1, self.num_workers)
        needed = workers * self._world_size()
        if self.mode == "exact" and len(self.train_shard_urls) < needed:
            raise InputError(
                f"data.mode=exact splits shards over {workers} worker(s) x "
                f"{self._world_size()} rank(s) = {needed}, but data.urls has only "
                f"{len(self.train_shard_urls)} training shard(s): use fewer data.num_workers, "
                f"more (smaller) shards, or data.mode=resampled"
            )
        dataset = ShardPipeline(
            self.train_shard_urls,
            self.train_transform,
            self.batch_size,
            resampled=self.mode == "resampled",
            sources=self.train_sources,
            weights=self.url_weights,
            decoder=self.sample_decoder(train=True),
            batches_per_worker=self.batches_per_epoch() // workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            min_size=self.min_size,
            **self.stream_checks,
        )
        return self.train_loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shard_urls:
            return []
        world = self._world_size()
        split = len(self.val_shard_urls) >= world  # too few shards: every rank evaluates all
        per_rank = len(self.val_shard_urls) // world if split else len(self.val_shard_urls)
        dataset = ShardPipeline(
            self.val_shard_urls,
            self.val_transform,
            self.val_batch_size,
            resampled=False,
            shuffle_buffer=0,
            split_by_node=split,
            decoder=self.sample_decoder(train=False),
            **self.stream_checks,
        )
        dataset.set_epoch(0)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=min(self.num_workers, per_rank),
            pin_memory=self.pin_memory,
        )
