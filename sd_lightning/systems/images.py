"""Image grids to every attached logger (wandb, TensorBoard) and to PNG files in the run dir."""

from __future__ import annotations

import os

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> [0, 255] uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


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


def save_png(image: torch.Tensor, path: str) -> None:
    """uint8 CHW -> PNG (PIL; torchvision's image I/O is deprecated)."""
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
