"""Losses, plain PyTorch: the stage-1 autoencoder loss and the LPIPS builder."""

from sd_lightning.losses.autoencoder_loss import AutoencoderLoss, adaptive_weight
from sd_lightning.losses.perceptual import build_lpips

__all__ = ["AutoencoderLoss", "adaptive_weight", "build_lpips"]
