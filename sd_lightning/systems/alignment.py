"""U-REPA in the stage-2 system (``repa=urepa``): while the U-Net denoises, its middle block's
output is caught, projected and upsampled to the frozen vision encoder's patch grid, and aligned
with the encoder's features of the same (clean) images; the loss is added to the denoising loss.

The projector trains with the U-Net (in the optimizer and the checkpoints, so a run resumes
exactly) and is left out of every export; the encoder is frozen and outside the state dict (its
weights come from their folder). Sampling never needs either.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.models.alignment import UNetAlignment, alignment_loss, manifold_loss
from sd_lightning.models.frozen import Frozen
from sd_lightning.weights.vision import VisionEncoder

PREFIX = "aligner."  # the projector's keys in a checkpoint's state dict


class AlignmentMixin:
    """For the stage-2 system: ``unet``, ``log``."""

    def init_alignment(self, repa: dict[str, Any] | None) -> None:
        self.aligner = self.vision = None
        if not repa:
            return
        encoder = VisionEncoder(
            str(repa.get("encoder")), int(repa.get("resolution", 224)), repa.get("random_config"),
            repa.get("timm_model"), repa.get("timm_kwargs"),
        )  # fmt: skip
        config = self.unet.config
        channels = int(config["model_channels"]) * int(config["channel_mult"][-1])  # the middle
        self.aligner = UNetAlignment(channels, encoder.dim, int(repa.get("hidden", 2048)))
        self.vision = Frozen(encoder)
        self.repa_weight = float(repa.get("weight", 0.5))
        self.manifold_weight = float(repa.get("manifold_weight", 0.0))

    @contextmanager
    def caught_middle(self):
        """The U-Net's middle block output of the forwards inside (a list, filled in)."""
        caught: list[torch.Tensor] = []
        if self.aligner is None:
            yield caught
            return
        handle = self.unet.middle_block.register_forward_hook(
            lambda module, args, output: caught.append(output)
        )
        try:
            yield caught
        finally:
            handle.remove()

    def alignment_term(
        self,
        batch: dict,
        caught: list[torch.Tensor],
        target: torch.Tensor | None = None,
        weight: float | None = None,
        tag: str = "repa",
    ) -> torch.Tensor | float:
        """``weight x (alignment + manifold_weight x manifold)`` of the caught features (by
        default ``repa.weight``), against ``target`` (by default :meth:`alignment_target`);
        logged as ``train/<tag>_align``."""
        if self.aligner is None:
            return 0.0
        target = self.alignment_target(batch) if target is None else target
        predicted = self.aligner(caught[-1], self.vision.net.grid)
        align = alignment_loss(predicted, target.float())
        bs = len(target)
        self.log(f"train/{tag}_align", align, batch_size=bs)
        total = align
        if self.manifold_weight:
            manifold = manifold_loss(predicted, target.float())
            self.log(f"train/{tag}_manifold", manifold, batch_size=bs)
            total = total + self.manifold_weight * manifold
        return (self.repa_weight if weight is None else weight) * total

    def alignment_target(self, batch: dict) -> torch.Tensor:
        """The frozen encoder's patch features of the batch's images (tokens x dim each), or
        those the latent shards stored."""
        target = batch.get("repa_features")  # latent shards encoded with repa=urepa
        if target is None:
            images = batch.get("image")
            if images is None:
                raise InputError(
                    "repa=urepa aligns with the images' features, and these latent shards have "
                    "none: encode them with stage=encode repa=urepa repa.encoder=..., or train on "
                    "images (data=webdataset, data=folder)"
                )
            target = self.vision(images)
        grid = self.vision.net.grid
        if tuple(target.shape[1:]) != (grid[0] * grid[1], self.vision.net.dim):
            raise InputError(
                f"the latent shards' alignment features are {tuple(target.shape[1:])} per image "
                f"and repa.encoder gives {(grid[0] * grid[1], self.vision.net.dim)}: encode with "
                "the same repa.encoder and repa.resolution as training"
            )
        return target
