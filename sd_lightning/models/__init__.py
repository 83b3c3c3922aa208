"""Plain PyTorch networks (no Lightning imports): the KL autoencoder and the PatchGAN discriminator."""

from sd_lightning.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sd_lightning.models.discriminator import NLayerDiscriminator

__all__ = ["AutoencoderKL", "DiagonalGaussian", "NLayerDiscriminator"]
