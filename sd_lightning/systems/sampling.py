"""The stage-2 system's images: sampling with the EMA U-Net through the conditioner and the VAE
(validation grids, ``stage=sample``, DreamBooth's class images), at the size the U-Net trained."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from sd_lightning.data.images import to_uint8
from sd_lightning.diffusion.guidance import generate
from sd_lightning.models.parallel import is_sharded
from sd_lightning.systems.images import log_image

log = logging.getLogger(__name__)


def sample_grid(images: torch.Tensor) -> torch.Tensor:
    """uint8 CHW grid of [-1, 1] images, as square as possible."""
    import torchvision

    nrow = max(1, math.ceil(math.sqrt(len(images))))
    return torchvision.utils.make_grid(to_uint8(images), nrow=nrow, padding=2)


class SamplingMixin:
    """For the stage-2 system: ``unet``, ``ema``, ``conditioner``, ``alphas_cumprod``,
    ``prediction``, ``default_spacing``, ``val_prompts``/``val_seed``/``val_sampler``."""

    @property
    def sampling_net(self) -> torch.nn.Module:
        return self.ema.net if self.ema is not None else self.unet

    def sample_images(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        image_size: int | None = None,
        original_size: Sequence[int] | None = None,
        crop: Sequence[int] = (0, 0),
        **sampler: Any,
    ) -> torch.Tensor:
        """Images in [-1, 1] for ``prompts`` with the EMA U-Net; seed ``val_seed + i`` for the
        i-th when ``seeds`` is not given. ``image_size``: by default the size the U-Net was
        trained at; ``spacing`` (null): trailing with a zero-terminal-SNR schedule, else
        leading. ``original_size`` (height, width) and ``crop`` (top, left): SDXL's
        micro-conditioning (by default the image's size and no crop)."""
        if sampler.get("spacing") is None:
            sampler["spacing"] = self.default_spacing
        seeds = (
            list(seeds) if seeds is not None else [self.val_seed + i for i in range(len(prompts))]
        )
        size = image_size or self._image_size()
        factor = self.vae.downsample_factor
        shape = (self.unet.config["in_channels"], size // factor, size // factor)
        was_training = self.training
        self.eval()  # dropout off (DreamBooth's class images come before the first step)
        try:
            return generate(
                unet=self.sampling_net,
                decode=self.decode_latents,
                encode_text=partial(
                    self.conditioner.encode, size=(size, size), original=original_size, crop=crop
                ),
                prompts=prompts,
                seeds=seeds,
                abar=self.alphas_cumprod,
                prediction=self.prediction,
                latent_shape=shape,
                device=self.device,
                **sampler,
            )
        finally:
            self.train(was_training)

    def _image_size(self) -> int:
        """The size the U-Net trains (or trained) at: the data's, from the run's config after
        loading; the VAE's training size only when neither is known."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and getattr(datamodule, "image_size", None):
            return int(datamodule.image_size)
        size = ((self.run_config or {}).get("data") or {}).get("image_size")
        return int(size) if size else int(self.vae.config["resolution"])

    def on_validation_epoch_end(self) -> None:
        if not self.val_prompts or self.trainer.sanity_checking:
            return
        # a sharded U-Net gathers its weights in every forward: every rank samples, rank 0 logs
        if not (self.trainer.is_global_zero or is_sharded(self.unet)):
            return
        images = self.sample_images(self.val_prompts, **self.val_sampler)
        if not self.trainer.is_global_zero:
            return
        grid = sample_grid(images)
        caption = " | ".join(self.val_prompts)
        path = log_image(self.trainer, "val/samples", grid, caption=caption)
        log.info("sample grid: %s", path)
