"""The one place where config turns into objects: datamodule, system, callbacks, loggers, trainer.

``train(cfg)`` is a plain function (``python -m sd_lightning`` calls it, and so do the tests), in the
lightning-hydra-template order: instantiate everything, fit, return the metrics.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Named entries (``callbacks.model_checkpoint``, ``logger.wandb``...) to a list of objects."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; returns the final logged metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    os.makedirs(cfg.paths.output_dir, exist_ok=True)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    system: L.LightningModule = instantiate(cfg.model)
    system.run_config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for logger in loggers:
        logger.log_hyperparams(system.run_config)

    trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and trainer.is_global_zero:
        log.info(
            "checkpoints in %s (last: %s)", checkpoint.dirpath, checkpoint.last_model_path or "-"
        )
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
