"""The WebDataset pipeline: shard lists -> samples -> decoded, transformed tensors -> batches.

Bad samples never crash a run: each stage that can fail drops the sample and counts the reason in a
per-worker ``SkipCounter``; every batch carries the counts since the previous batch of its worker
(``batch["skipped"]``), so the training process can log totals however many workers there are.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle as shuffle

from sd_lightning.data.health import StreamHealth
from sd_lightning.data.images import (
    TRANSPARENCY_NOTE,
    TRANSPARENT,
    decode_text,
    has_transparency,
    to_rgb,
)
from sd_lightning.data.position import node_rank, worker_share
from sd_lightning.data.tar import shard_samples

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption")
SKIP_REASONS = ("tar", "no_image", "decode", "no_caption", "too_small", "duplicate")
LOGGED_DECODE_ERRORS = 3  # per worker; later ones are counted (data/skipped_decode), not logged


class SkipCounter:
    """Counts dropped samples by reason inside one worker."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def delta(self) -> dict[str, int]:
        """Counts since the previous call (what the next batch reports)."""
        out = {r: self.counts[r] - self._reported[r] for r in SKIP_REASONS}
        self._reported = self.counts.copy()
        return out


def collate(samples: list[dict], counter: SkipCounter | None = None) -> dict:
    """Tensors stacked, everything else (captions, keys) as lists; plus the skips so far."""
    batch = {
        k: torch.stack([s[k] for s in samples])
        if isinstance(samples[0][k], torch.Tensor)
        else [s[k] for s in samples]
        for k in samples[0]
    }
    if counter is not None:
        batch["skipped"] = counter.delta()
    return batch


class Skip(Exception):
    """Raised by a sample decoder to drop a sample under a counted ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def caption_of(sample: dict) -> str:
    """The sample's caption: UTF-8 (a BOM stripped) or UTF-16 with a BOM; other bytes raise
    :class:`~sd_lightning.data.images.TextEncodingError` (a ``ValueError``: the sample is
    skipped and counted, ``data/skipped_decode``, like any undecodable one)."""
    key = next((k for k in CAPTION_KEYS if k in sample), None)
    if key is None:
        raise Skip("no_caption")
    return decode_text(sample[key], f"caption {sample.get('__key__')}.{key}").strip()


class ImageSampleDecoder:
    """``{"jpg": bytes, "txt": bytes, "json": ...}`` -> ``{"image": tensor, "caption": str}`` and
    the crop's geometry (``original_size``, ``crop_top_left``, ``target_size``). The original
    size is the image's, or the one its ``.json`` records (img2dataset's ``original_width`` and
    ``original_height`` of an image it resized, kept to the same shape), which SDXL conditions
    on."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], min_size: int = 0):
        self.transform, self.min_size = transform, min_size
        self.notes: Counter[str] = Counter()  # images with transparency, in this worker

    def __call__(self, sample: dict, rng: random.Random | None = None) -> dict:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise Skip("no_image")
        caption = caption_of(sample)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:  # unreadable metadata drops the sample only where it is needed
            if self.min_size:
                raise
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        if self.min_size and meta:
            side = min(int(meta.get("width", 1 << 30)), int(meta.get("height", 1 << 30)))
            if side < self.min_size:
                raise Skip("too_small")
        with Image.open(io.BytesIO(sample[key])) as img:
            if has_transparency(img):  # composited here, to be counted; other modes (and JPEG's
                before = self.notes[TRANSPARENT]  # reduced-scale decoding) are the transform's
                img = to_rgb(img, self.notes)
                if before == 0 and self.notes[TRANSPARENT] == 1:
                    log.info(
                        "images with transparency are %s (first: %s from %s; said once per worker)",
                        TRANSPARENCY_NOTE,
                        sample.get("__key__"),
                        sample.get("__url__"),
                    )
            fields = self.transform.sample(img, rng)
            stored = img.size  # (width, height)
        original = meta.get("original_height"), meta.get("original_width")
        if "original_size" in fields and all(isinstance(v, int) and v > 0 for v in original):
            # only a resize keeps the shape: img2dataset's center_crop or border (padding) modes
            # changed it, and the crop conditioning would then claim an uncropped image
            h, w = original
            if abs(w * stored[1] - h * stored[0]) <= 0.02 * w * stored[1]:
                fields["original_size"] = torch.tensor(original)
        return {**fields, "caption": caption}


def stream_key(*parts: object, offset: int = 0) -> str:
    """The seed string of a random stream; ``offset`` > 0 (a restart mid-epoch after that many
    batches) gives a stream of its own."""
    return "-".join(map(str, parts)) + (f"-from{offset}" if offset else "")


def resampled_shards(
    urls: list[str],
    seed: int,
    epoch: int,
    rank: int,
    worker: int,
    sources: list[list[str]] | None = None,
    weights: list[float] | None = None,
    offset: int = 0,
) -> Iterator[dict]:
    """Shards drawn with replacement, seeded by (seed, epoch, rank, worker): a restarted run draws
    the same stream, and ranks and workers draw different ones. With ``weights``, a source (one
    ``::``-joined part of ``data.urls``) is drawn with those probabilities, then one of its shards
    uniformly; without, every shard is equally likely. ``offset``: see :func:`stream_key`."""
    rng = random.Random(stream_key(seed, epoch, rank, worker, offset=offset))
    while True:
        if weights:
            source = rng.choices(sources, weights=weights)[0]
            yield {"url": rng.choice(source)}
        else:
            yield {"url": rng.choice(urls)}


def exact_shards(
    urls: list[str],
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    worker: int,
    workers: int,
    cycle: bool,
    offset: int = 0,
) -> Iterator[dict]:
    """This (rank, worker)'s disjoint share of ``urls``, each shard once per pass; with ``cycle``
    (training), in an order shuffled per epoch and pass, passes repeating until the caller stops
    at the epoch length."""
    mine = urls[rank::world][worker::workers]
    passes = 0
    while True:
        order = list(mine)
        if cycle:  # training: a new order every epoch and pass; evaluation: the given order
            key = stream_key(f"exact-{seed}", epoch, passes, rank, worker, offset=offset)
            random.Random(key).shuffle(order)
        yield from ({"url": u} for u in order)
        passes += 1
        if not cycle or not mine:
            return


class ShardPipeline(IterableDataset):
    """Decoded, transformed, batched samples from a list of shard URLs.

    Args:
        urls: expanded shard URLs.
        transform: PIL image -> tensor in [-1, 1].
        batch_size: samples per batch (batching happens in the workers).
        resampled: draw shards with replacement (training's default) or read each shard once per
            pass, split by rank and worker (``exact``; evaluation always).
        batches_per_worker: the length of one epoch in batches per worker (training, both modes:
            an exact worker that runs out of shards starts another pass, so every rank yields the
            same number of batches). ``None``: one pass (evaluation).
        sources / weights: the ``::``-joined parts of ``data.urls`` and their sampling weights
            (resampled mode).
        shuffle_buffer: sample shuffle buffer per worker (0 disables).
        max_bad_shards: shards in a row that may yield no usable sample before a worker stops
            with :class:`~sd_lightning.data.health.DataStreamError` (``None``: no limit; a
            one-pass stream still fails when it ends without a usable sample).
        shard_retries: more tries for a remote shard (``pipe:``, ``http:``) that fails before
            its first sample.
        split_by_node: in exact mode, give each rank a disjoint subset of shards.
        min_size: drop images whose ``.json`` width or height is below this.
        decoder: ``(raw sample {ext: bytes}, rng)`` -> fields of the batch, with ``rng`` a
            ``random.Random`` of the worker's stream for augmentations; raises :class:`Skip` for a
            counted skip. Default: :class:`ImageSampleDecoder` (``transform``, ``min_size``).
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        resampled: bool = True,
        batches_per_worker: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        split_by_node: bool = True,
        min_size: int = 0,
        sources: list[list[str]] | None = None,
        weights: list[float] | None = None,
        decoder: Callable[[dict], dict] | None = None,
        max_bad_shards: int | None = 8,
        shard_retries: int = 2,
    ):
        super().__init__()
        if max_bad_shards is not None and max_bad_shards < 1:
            raise ValueError(
                f"data.max_bad_shards must be a positive number or null (no limit), "
                f"got {max_bad_shards}"
            )
        if shard_retries < 0:
            raise ValueError(f"data.shard_retries must be >= 0, got {shard_retries}")
        self.max_bad_shards, self.shard_retries = max_bad_shards, shard_retries
        if resampled and not batches_per_worker:
            raise ValueError("a resampled pipeline needs batches_per_worker (the epoch length)")
        self.sources, self.weights = sources, weights
        self.urls, self.transform, self.batch_size = urls, transform, batch_size
        self.resampled, self.batches_per_worker = resampled, batches_per_worker
        self.shuffle_buffer, self.seed, self.split_by_node = shuffle_buffer, seed, split_by_node
        self.decoder = decoder or ImageSampleDecoder(transform, min_size)
        self.epoch, self.offset = 0, 0
        self.node: tuple[int, int] | None = None  # (rank, world size), set by set_epoch

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """The epoch, and the batches of it already trained when the stream (re)starts: a run
        resumed mid-epoch draws a new stream seeded from that point instead of replaying the
        epoch's start (at an epoch boundary, offset 0, it is the uninterrupted run's stream)."""
        self.epoch, self.offset = epoch, offset
        self.node = node_rank()  # here, in the training process: its workers may not know it

    def _seed(self, kind: str, rank: int, worker: int) -> str:
        return stream_key(f"{kind}{self.seed}", self.epoch, rank, worker, offset=self.offset)

    def _decode(
        self,
        counter: SkipCounter,
        samples: Iterator[dict],
        rng: random.Random,
        health: StreamHealth,
    ) -> Iterator[dict]:
        errors = 0
        for sample in samples:  # a key repeated within a shard was dropped (and counted) there
            shard = sample.get("__shard__")
            try:
                out = self.decoder(sample, rng)
            except Skip as skip:
                counter.counts[skip.reason] += 1
                health.decoded(shard, usable=False)
                continue
            except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
                counter.counts["decode"] += 1
                errors += 1
                if errors <= LOGGED_DECODE_ERRORS:
                    log.warning(
                        "skipping undecodable sample %s from %s: %r%s",
                        sample.get("__key__"),
                        sample.get("__url__"),
                        exn,
                        "; further ones are counted (data/skipped_decode), not logged"
                        if errors == LOGGED_DECODE_ERRORS
                        else "",
                    )
                health.decoded(shard, usable=False, error=repr(exn))
                continue
            health.decoded(shard, usable=True)
            yield {**out, "key": sample["__key__"]}

    def _batch(self, counter: SkipCounter, samples: Iterator[dict]) -> Iterator[dict]:
        """Batches of one shape each: with aspect-ratio buckets, a sample waits for a full
        batch of its bucket (one buffer per bucket)."""
        buffers: dict[tuple, list[dict]] = {}
        for s in samples:
            shape = tuple(s["image"].shape) if "image" in s else ()
            buf = buffers.setdefault(shape, [])
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(buf, counter)
                buffers[shape] = []
        if not self.batches_per_worker:  # evaluation keeps the last partial batches
            for buf in buffers.values():
                if buf:
                    yield collate(buf, counter)

    def __iter__(self) -> Iterator[dict]:
        if get_worker_info() is not None:  # Ctrl-C reaches the whole process group: the training
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # process checkpoints, workers carry on
        counter = SkipCounter()
        rank, world = self.node or node_rank()
        worker, workers = worker_share()
        where = f"rank {rank} worker {worker}"
        if self.resampled:
            stream = resampled_shards(
                self.urls,
                self.seed,
                self.epoch,
                rank,
                worker,
                self.sources,
                self.weights,
                self.offset,
            )
        else:
            if not self.split_by_node:
                rank, world = 0, 1
            cycle = bool(self.batches_per_worker)
            stream = exact_shards(
                self.urls, self.seed, self.epoch, rank, world, worker, workers, cycle, self.offset
            )
        health = StreamHealth(self.max_bad_shards, counter.counts, where)
        samples = shard_samples(stream, counter.counts, health, self.shard_retries)
        if self.shuffle_buffer > 0:
            rng = random.Random(self._seed("shuffle-", rank, worker))
            samples = shuffle(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
        augment = random.Random(self._seed("augment-", rank, worker))
        batches = self._batch(counter, self._decode(counter, samples, augment, health))
        if not self.batches_per_worker:
            yield from batches
            health.finish()
        else:
            for _, batch in zip(range(self.batches_per_worker), batches):
                yield batch
        health.log_summary()
