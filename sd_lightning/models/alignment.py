"""Representation alignment for U-Nets (U-REPA, arXiv 2503.18414, after REPA, arXiv 2410.06940),
as plain PyTorch: a projector from the U-Net's middle block to a frozen vision encoder's patch
features, and the losses.

REPA projects a transformer's tokens with an MLP (Linear, SiLU, Linear, SiLU, Linear; 2048 wide)
and maximises their cosine with the encoder's patch tokens (weight 0.5). U-REPA aligns a U-Net's
middle block, runs the MLP on its low-resolution tokens *first* and then upsamples them to the
encoder's token grid, and adds a manifold loss on relative similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projector(in_dim: int, out_dim: int, hidden: int = 2048) -> nn.Sequential:
    """REPA's MLP (``build_mlp``): three linear layers with SiLU between them."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


class UNetAlignment(nn.Module):
    """U-REPA's head: features ``(B, C, h, w)`` -> the MLP on each of the ``h x w`` tokens ->
    bilinear upsampling to the encoder's ``grid`` -> ``(B, gh * gw, out_dim)``."""

    def __init__(self, channels: int, out_dim: int, hidden: int = 2048) -> None:
        super().__init__()
        self.mlp = projector(channels, out_dim, hidden)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        tokens = self.mlp(features.float().permute(0, 2, 3, 1))  # (B, h, w, D)
        tokens = tokens.permute(0, 3, 1, 2)
        if tuple(tokens.shape[-2:]) != tuple(grid):
            tokens = F.interpolate(tokens, size=grid, mode="bilinear", align_corners=False)
        return tokens.flatten(2).transpose(1, 2)


def alignment_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's loss: minus the cosine of each token with its target, averaged (-1 at best)."""
    return -(F.normalize(predicted, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean()


def manifold_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The squared difference between the two sets' token-to-token cosine similarities, within
    each image (0 when the projected tokens relate to each other as the encoder's do)."""
    p, t = F.normalize(predicted, dim=-1), F.normalize(target, dim=-1)
    return ((p @ p.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean()
