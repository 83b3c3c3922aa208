"""The stage-2 system's latent space: images to scaled latents through the frozen VAE (or from the
posteriors ``data=latents`` stored), back to images, and the scale itself, SD's 0.18215 for its
VAE or ``1 / std`` of the first batch over all ranks (``scale_by_std``)."""

from __future__ import annotations

import logging

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.models.autoencoder import DiagonalGaussian

log = logging.getLogger(__name__)


class LatentsMixin:
    """For a LightningModule with ``vae``, ``unet``, a ``latent_scale`` buffer (NaN until
    estimated) and ``sample_posterior``."""

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """The frozen VAE's scaled latents of images. Under float16 autocast
        (``trainer.precision=16-mixed``) the VAE runs in float32 unless it was loaded with
        ``fp16=True``: SDXL's VAE overflows in float16 (NaN latents, black images), SD's can."""
        fp16 = x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type)
        fp16 = fp16 and torch.get_autocast_dtype(x.device.type) == torch.float16
        if fp16 and not getattr(self.vae, "fp16", False):
            with torch.autocast(x.device.type, enabled=False):
                posterior = self.vae.encode(x.float())
        else:
            posterior = self.vae.encode(x)
        z = self._scaled_latents(posterior, generator)
        if (fp16 or not getattr(self, "_latents_checked", False)) and not torch.isfinite(z).all():
            raise InputError(
                "the VAE's latents are not finite (NaN/inf) for this batch"
                + (
                    ": it ran in float16, where SDXL's VAE overflows; load it without fp16 "
                    "(model.vae.fp16=false) or use a VAE fixed for float16 (sdxl-vae-fp16-fix)"
                    if fp16 and getattr(self.vae, "fp16", False)
                    else ": check the images and vae_ckpt= (a VAE of another family or a damaged file)"
                )
            )
        self._latents_checked = True  # the first batch always (one sync), float16 every batch
        return z

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None):
        """Scaled latents of a batch: encoded online from ``image``, or drawn from the stored
        posterior (``latent_mean``/``latent_logvar`` of ``data=latents``) without the encoder."""
        if "latent_mean" in batch:
            params = torch.cat([batch["latent_mean"], batch["latent_logvar"]], dim=1)
            return self._scaled_latents(DiagonalGaussian(params.float()), generator)
        return self.encode_images(batch["image"], generator)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.latent_scale)

    def _scaled_latents(self, posterior: DiagonalGaussian, generator=None) -> torch.Tensor:
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        z = z.float()
        if not getattr(self, "_scale_known", False):  # read once, not every step (a GPU wait)
            if torch.isnan(self.latent_scale):
                self._estimate_latent_scale(z)
            self._scale_known = True
        return z * self.latent_scale

    def _estimate_latent_scale(self, z: torch.Tensor) -> None:
        """``scale_by_std``: 1 / std of the first batch's latents, the variance averaged over
        ranks so every rank gets the same factor."""
        var = self.trainer.strategy.reduce(z.var(), reduce_op="mean") if self._trainer else z.var()
        self.latent_scale.fill_(float(1.0 / var.sqrt()))
        log.info(
            "latent_scale estimated from the first batch: %.5f (1 / std of %d latents x ranks); "
            "stored in checkpoints; set model.latent_scale to fix it",
            float(self.latent_scale),
            z.shape[0],
        )

    def check_image_size(self, size: int, option: str) -> None:
        """Image sides must be multiples of the VAE's and the U-Net's downsampling together."""
        vae, unet = self.vae.downsample_factor, self.unet.downsample_factor
        factor = vae * unet
        if size <= 0 or size % factor:
            lo, hi = size // factor * factor, (max(size, 0) // factor + 1) * factor
            use = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise InputError(
                f"{option}={size} is not a positive multiple of {factor} (the VAE's downsampling "
                f"{vae} x the U-Net's {unet}): use {option}={use}"
            )
