"""Data: WebDataset shards (real or the generated demo set) or a folder of photos into batches of
images and captions, square or in aspect-ratio buckets."""

from sd_lightning.data.datamodule import WebDataModule
from sd_lightning.data.demo import make_demo_shards
from sd_lightning.data.folder import FolderDataModule
from sd_lightning.data.latents import LatentDataModule
from sd_lightning.data.shards import expand_urls

__all__ = [
    "FolderDataModule",
    "LatentDataModule",
    "WebDataModule",
    "expand_urls",
    "make_demo_shards",
]
