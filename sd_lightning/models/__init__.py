"""Plain PyTorch networks (no Lightning imports): the KL autoencoder, the PatchGAN discriminator,
the conditional U-Net and the EMA holder. (The text encoders are conditioning's.)"""

from sd_lightning.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sd_lightning.models.discriminator import NLayerDiscriminator
from sd_lightning.models.ema import EMA
from sd_lightning.models.unet import UNetModel

__all__ = ["EMA", "AutoencoderKL", "DiagonalGaussian", "NLayerDiscriminator", "UNetModel"]
