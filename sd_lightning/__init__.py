"""sd_lightning: train Stable Diffusion with Lightning + Hydra + WebDataset."""

from sd_lightning.core.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
