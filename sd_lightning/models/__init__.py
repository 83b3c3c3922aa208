"""Plain PyTorch networks (no Lightning imports): the KL autoencoder, the PatchGAN discriminator,
the conditional U-Net, the OpenCLIP text encoder wrapper and the EMA holder."""

from sd_lightning.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sd_lightning.models.discriminator import NLayerDiscriminator
from sd_lightning.models.ema import EMA
from sd_lightning.models.text_encoder import OpenCLIPTextEncoder
from sd_lightning.models.unet import UNetModel

__all__ = [
    "EMA",
    "AutoencoderKL",
    "DiagonalGaussian",
    "NLayerDiscriminator",
    "OpenCLIPTextEncoder",
    "UNetModel",
]
