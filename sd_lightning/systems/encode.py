"""``stage=encode``'s system: the frozen VAE (and text encoder) under Lightning's predict loop,
writing latent shards as it goes (every rank its own shards, so it scales to many GPUs)."""

from __future__ import annotations

import json
import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from sd_lightning.core import stopping
from sd_lightning.data.latents import FIELDS, npy_bytes
from sd_lightning.data.transforms import to_model_range
from sd_lightning.data.writer import ShardWriter
from sd_lightning.models.autoencoder import AutoencoderKL
from sd_lightning.models.frozen import Frozen


class EncodeSystem(L.LightningModule):
    """``predict_step(batch) -> samples``: posterior mean and log-variance of each image, its
    caption and crop geometry (original size, crop, target size: SDXL's micro-conditioning),
    and (optionally) the text encoder's token states and, where it pools (SDXL), its pooled
    vector, and the features ``repa=urepa`` aligns with, as ``dtype`` numpy arrays."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module | None,
        dtype: str = "float16",
        vision: torch.nn.Module | None = None,
    ):
        super().__init__()
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        self.vae = Frozen(vae)
        self.text_encoder = Frozen(text_encoder) if text_encoder is not None else None
        self.vision = Frozen(vision) if vision is not None else None  # repa=urepa's encoder
        self.np_dtype = np.dtype(dtype)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, bytes]]:
        images = to_model_range(batch["image"])
        posterior = self.vae.net.encode(images)
        features = None
        if self.vision is not None:  # the aligned encoder's patch tokens, once for every epoch
            features = self.vision(images).float().cpu().numpy().astype(self.np_dtype)
        mean = posterior.mean.float().cpu().numpy().astype(self.np_dtype)
        logvar = posterior.logvar.float().cpu().numpy().astype(self.np_dtype)
        states = pooled = None
        if self.text_encoder is not None:
            states, pooled = self.text_encoder.net.encode(batch["caption"])
            states = states.float().cpu().numpy().astype(self.np_dtype)
            if pooled is not None:
                pooled = pooled.float().cpu().numpy().astype(self.np_dtype)
        samples = []
        for i, (caption, key) in enumerate(zip(batch["caption"], batch["key"])):
            record = {"source_key": key}
            for field in FIELDS:  # the crop's geometry, where the pipeline gave it
                if field in batch:
                    record[field] = [int(v) for v in batch[field][i]]
            sample = {
                "mean.npy": npy_bytes(mean[i]),
                "logvar.npy": npy_bytes(logvar[i]),
                "txt": caption.encode(),
                "json": json.dumps(record).encode(),
            }
            if states is not None:
                sample["text.npy"] = npy_bytes(states[i])
            if pooled is not None:
                sample["pooled.npy"] = npy_bytes(pooled[i])
            if features is not None:
                sample["repa.npy"] = npy_bytes(features[i])
            samples.append(sample)
        return samples


class LatentShardWriter(BasePredictionWriter):
    """Writes each rank's predicted samples into ``<output>/r<rank>-<index>.tar`` shards; the
    per-rank sizes land in ``sizes-r<rank>.json``, merged into ``sizes.json`` at the end."""

    def __init__(self, output: str, samples_per_shard: int):
        super().__init__(write_interval="batch")
        self.output, self.samples_per_shard = output, samples_per_shard
        self._writer: ShardWriter | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        os.makedirs(self.output, exist_ok=True)
        prefix = f"r{trainer.global_rank:03d}-"
        self._writer = ShardWriter(self.output, self.samples_per_shard, prefix, sizes_name=None)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        for sample in prediction:
            self._writer.write(sample)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signals = stopping.install()  # after Lightning's own handlers: ours decide

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, *args)
        stopping.check("stage=encode")  # after the batch's samples are written

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, stopping.Stopped) and self._writer is not None:
            self._finish(trainer)  # what was written: complete shards, their sizes

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stopping.restore(getattr(self, "_signals", {}))
        self._signals = {}

    def _finish(self, trainer: L.Trainer) -> None:
        sizes = self._writer.finish()
        self._writer = None
        with open(os.path.join(self.output, f"sizes-r{trainer.global_rank:03d}.json"), "w") as f:
            json.dump(sizes, f)


def merge_sizes(output: str) -> dict[str, int]:
    """Merge the per-rank ``sizes-r*.json`` into ``sizes.json``; returns it."""
    sizes: dict[str, int] = {}
    for name in sorted(os.listdir(output)):
        if name.startswith("sizes-r") and name.endswith(".json"):
            with open(os.path.join(output, name)) as f:
                sizes |= json.load(f)
    with open(os.path.join(output, "sizes.json"), "w") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)
    return sizes


def shard_pattern(output: str, names: list[str]) -> str:
    """A ``data.urls`` value for the shards ``names`` in ``output`` (a ``::``-join of one brace
    range per rank prefix)."""
    by_prefix: dict[str, list[int]] = {}
    for name in names:
        prefix, index = name[: -len("000000.tar")], int(name[-len("000000.tar") : -4])
        by_prefix.setdefault(prefix, []).append(index)
    return "::".join(
        os.path.join(output, f"{p}{{{min(ix):06d}..{max(ix):06d}}}.tar")
        for p, ix in sorted(by_prefix.items())
    )
