"""Image grids to every attached logger (wandb, TensorBoard) and to PNG files in the run dir
(pixels to uint8 and PNG: :mod:`sd_lightning.data.images`)."""

from __future__ import annotations

import os

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from sd_lightning.data.images import save_png, to_uint8


def pairs_grid(inputs: torch.Tensor, outputs: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """A grid with rows of inputs each followed by the row of their outputs (uint8, CHW)."""
    rows = []
    for i in range(0, len(inputs), per_row):
        rows += [inputs[i : i + per_row], outputs[i : i + per_row]]
    return torchvision.utils.make_grid(to_uint8(torch.cat(rows)), nrow=per_row, padding=2)


def log_image(trainer: L.Trainer, key: str, grid: torch.Tensor, caption: str | None = None) -> str:
    """Send ``grid`` (uint8 CHW) to the loggers that take images and save it as a PNG under
    ``<run dir>/images/``; returns the PNG's path. Call on global rank 0 only."""
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(
                key=key,
                images=[grid.permute(1, 2, 0).numpy()],
                step=step,
                caption=[caption] if caption else None,
            )
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
    folder = os.path.join(trainer.default_root_dir, "images")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key.replace('/', '_')}_step{step:08d}.png")
    save_png(grid, path)
    return path
