"""LightningModules: thin training systems around the plain-PyTorch models and losses."""

from sd_lightning.systems.e2e import EndToEndSystem
from sd_lightning.systems.ldm import LatentDiffusionSystem
from sd_lightning.systems.vae import VAESystem

__all__ = ["EndToEndSystem", "LatentDiffusionSystem", "VAESystem"]
