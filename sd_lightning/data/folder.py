"""``data=folder``: a folder of photos for fine-tuning, no shards needed.

Every image under ``path`` (``.jpg .jpeg .png .webp .bmp``, subfolders too, symlinked ones
followed, each real folder once) with the caption in a same-named ``.txt`` beside it (UTF-8, or
UTF-16 with a BOM), or ``caption`` for those without one, read once
(:func:`~sd_lightning.data.images.read_folder`: any image mode made RGB, transparency composited
on white and said once per folder), each image resized to cover its aspect-ratio bucket
(:mod:`sd_lightning.data.buckets`) and kept in memory; ``repeats`` passes over it make one
epoch, as many batches as Lightning is told (``len``). With ``cache_latents``, the frozen VAE
encodes every image once at the start of training and batches carry the posterior instead of
pixels (DreamBooth-sized sets: a few MB).

A prior set (``prior_path``: DreamBooth's class images) joins the epoch with as many samples as
the instance images have (cycled), each with loss weight ``prior_weight``.

An unreadable image is skipped with a warning and counted; an image without a caption, a caption
that is not UTF-8, an empty or missing folder stop the run with the fix (captions are read before
any image). Batches are planned per epoch from the seed
(:func:`~sd_lightning.data.buckets.plan_epoch`), so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset

from sd_lightning.core import stopping
from sd_lightning.core.errors import InputError
from sd_lightning.data.buckets import BucketTransform, batches_in_epoch, crop, plan_epoch
from sd_lightning.data.folder_files import Item, read_folder
from sd_lightning.data.pipeline import collate
from sd_lightning.data.position import (
    PositionedDataModule,
    node_rank,
    worker_share,
)
from sd_lightning.data.transforms import to_model_range

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's length may be wrong with several workers; ours is
# exact (workers take turns at the rank's batches), so the warning is noise to a user.
LEN_WARNING = r"Your `IterableDataset` has `__len__` defined"


class FolderBatches(IterableDataset):
    """This rank's (and worker's) batches of an epoch of ``items``, from ``offset`` on."""

    def __init__(
        self, items: list[Item], batch_size: int, seed: int, crop: str, hflip: bool, train=True
    ):
        super().__init__()
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.crop, self.hflip, self.train = crop, hflip, train
        self.epoch, self.offset = 0, 0
        self.node: tuple[int, int] | None = None  # (rank, world size), set by set_epoch

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset
        self.node = node_rank()  # here, in the training process: its workers may not know it

    def sample(self, item: Item, rng: random.Random) -> dict:
        if item.latents:
            out = dict(item.latents)
        else:
            out = crop(item.image, item.bucket, item.original, self.crop, rng, self.hflip)
        out["caption"] = item.caption
        out["loss_weight"] = torch.tensor(item.weight)
        return out

    def plan(self, world: int) -> list[list[int]]:
        if not self.train:  # evaluation: the items in order, one batch per bucket run
            batches, run = [], []
            for i, item in enumerate(self.items):
                if run and (
                    len(run) == self.batch_size or self.items[run[0]].bucket != item.bucket
                ):
                    batches.append(run)
                    run = []
                run.append(i)
            return batches + [run]
        return plan_epoch(
            [i.bucket for i in self.items], self.batch_size, self.seed, self.epoch, world
        )

    def __len__(self) -> int:
        """The batches of an epoch on this rank (what Lightning counts an epoch and its progress
        bar by): this rank's share of :meth:`plan`, however many workers take turns at it."""
        if not self.train:
            return len(self.plan(1))
        world = (self.node or node_rank())[1]
        return batches_in_epoch([i.bucket for i in self.items], self.batch_size, world) // world

    def __iter__(self):
        rank, world = self.node or node_rank()
        worker, workers = worker_share()
        if not self.train:
            rank, world = 0, 1
        mine = self.plan(world if self.train else 1)[rank::world]
        for i in range(self.offset, len(mine)):
            if (i - self.offset) % workers != worker:
                continue
            rng = random.Random(f"folder-{self.seed}-{self.epoch}-{rank}-{i}")
            yield collate([self.sample(self.items[j], rng) for j in mine[i]])


class FolderDataModule(PositionedDataModule):
    """Images (and captions) from a folder, in aspect-ratio buckets.

    Args:
        path: the folder (subfolders included).
        caption: the caption of images without a ``.txt`` beside them (``None``: every image
            needs one).
        repeats: passes over the folder per epoch.
        image_size: the side of the square bucket; other buckets have about as many pixels.
        buckets: aspect-ratio buckets (``False``: every image cropped to the square).
        bucket_step / max_aspect: bucket sides are multiples of ``bucket_step`` (64 for SD),
            their aspect ratios at most ``max_aspect``.
        crop: ``center`` or ``random`` (within the bucket's excess only).
        hflip: random horizontal flips.
        cache_latents: encode every image once with the frozen VAE (needs ``crop=center`` and no
            flips: the same pixels every epoch).
        prior_path / prior_caption / prior_weight: a prior set (DreamBooth's class images),
            sampled as often as the instance images, its loss weighted by ``prior_weight``.
        val_images: the first images of the folder that make the validation batches (0: none).
    """

    def __init__(
        self,
        path: str | None = None,
        caption: str | None = None,
        repeats: int = 1,
        image_size: int = 512,
        batch_size: int = 1,
        buckets: bool = True,
        bucket_step: int = 64,
        max_aspect: float = 2.0,
        crop: str = "center",
        hflip: bool = False,
        cache_latents: bool = False,
        prior_path: str | None = None,
        prior_caption: str | None = None,
        prior_weight: float = 1.0,
        val_images: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        if not path:
            raise InputError(
                "data=folder needs data.path: a folder of images with optional same-named .txt "
                "captions (data.path=/photos/my_cat data.caption='a photo of sks cat')"
            )
        if not isinstance(repeats, int) or repeats < 1:
            raise InputError(f"data.repeats={repeats!r}: give a whole number >= 1")
        if batch_size < 1:
            raise InputError(f"data.batch_size must be positive, got {batch_size}")
        if cache_latents and (crop != "center" or hflip):
            raise InputError(
                "data.cache_latents=true encodes each image once, so every epoch sees the same "
                "pixels: set data.crop=center and data.hflip=false, or data.cache_latents=false"
            )
        step = bucket_step if buckets else image_size
        self.transform = BucketTransform(image_size, step, max_aspect if buckets else 1.0, crop)
        self.path, self.caption, self.repeats = path, caption, repeats
        self.image_size, self.batch_size = image_size, batch_size
        self.buckets, self.bucket_step = buckets, bucket_step
        self.crop, self.hflip, self.cache_latents = crop, hflip, cache_latents
        self.prior_path, self.prior_caption = prior_path, prior_caption
        self.prior_weight = float(prior_weight)
        self.val_images, self.num_workers, self.seed = val_images, num_workers, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.images: list[Item] = []
        self.items: list[Item] = []  # the epoch: images x repeats, then the prior set

    def setup(self, stage: str | None = None) -> None:
        if not self.images:
            self.images = read_folder(self.path, self.caption, self.transform, "data.path")
            counts = Counter(f"{w}x{h}" for w, h in (i.bucket for i in self.images))
            log.info(
                "data: %d images from %s (x%d repeats) in %d bucket(s): %s",
                len(self.images),
                self.path,
                self.repeats,
                len(counts),
                ", ".join(f"{k} ({v})" for k, v in counts.most_common()),
            )
        self.items = [item for _ in range(self.repeats) for item in self.images]

    def set_prior(self, path: str, caption: str, weight: float) -> None:
        """Use ``path`` (DreamBooth's class images) as the prior set."""
        self.prior_path, self.prior_caption, self.prior_weight = path, caption, float(weight)

    def _add_prior(self) -> None:
        """The prior set (written by DreamBooth at the start of training) joins the epoch."""
        if not self.prior_path or len(self.items) > len(self.images) * self.repeats:
            return
        prior = read_folder(
            self.prior_path,
            self.prior_caption,
            self.transform,
            "data.prior_path",
            self.prior_weight,
        )
        n = len(self.images) * self.repeats
        self.items += [prior[k % len(prior)] for k in range(n)]
        if len(prior) > n:
            log.warning(
                "data: only %d of the %d prior images join an epoch (as many as the instance "
                "images x repeats); raise data.repeats to use them all",
                n,
                len(prior),
            )
        log.info(
            "data: %d prior images from %s, %d samples per epoch at loss weight %g",
            len(prior),
            self.prior_path,
            n,
            self.prior_weight,
        )

    @torch.no_grad()
    def _encode(self) -> None:
        """Every image's VAE posterior, once (the frozen VAE of the system being trained)."""
        system = self.trainer.lightning_module
        if not hasattr(system, "vae"):  # stage=vae trains on the pixels
            return
        todo = [i for i in dict.fromkeys(self.items) if not i.latents]
        for item in todo:
            stopping.check("caching latents (data.cache_latents)")
            pixels = crop(item.image, item.bucket, item.original)
            x = to_model_range(pixels["image"][None]).to(system.device)
            posterior = system.vae.encode(x)
            item.latents = {
                "latent_mean": posterior.mean[0].float().cpu(),
                "latent_logvar": posterior.logvar[0].float().cpu(),
                **{k: v for k, v in pixels.items() if k != "image"},
            }
        if todo:
            log.info("data: %d images encoded once by the frozen VAE (cache_latents)", len(todo))

    def batches_per_epoch(self) -> int:
        world = self._world_size()  # workers take turns within a rank's batches
        return batches_in_epoch([i.bucket for i in self.items], self.batch_size, world) // world

    def train_dataloader(self) -> DataLoader:
        self._add_prior()
        if self.cache_latents:
            self._encode()
        dataset = FolderBatches(self.items, self.batch_size, self.seed, self.crop, self.hflip)
        warnings.filterwarnings("ignore", message=LEN_WARNING)
        return self.train_loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_images:
            return []
        first = self.images[: self.val_images]
        dataset = FolderBatches(first, self.batch_size, self.seed, "center", False, train=False)
        warnings.filterwarnings("ignore", message=LEN_WARNING)
        return DataLoader(dataset, batch_size=None, num_workers=0)
