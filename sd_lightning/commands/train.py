"""The one place where config turns into objects: datamodule, system, callbacks, loggers, trainer.

``train(cfg)`` is a plain function (``python -m sd_lightning`` calls it, and so do the tests), in the
lightning-hydra-template order: instantiate everything, fit, return the metrics.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from sd_lightning.callbacks import Preemption
from sd_lightning.commands import e2e_start, pretrained
from sd_lightning.commands.preflight import check_training, require
from sd_lightning.commands.resume import resolve_ckpt_path
from sd_lightning.core import stopping
from sd_lightning.core.atomic import save_safetensors

__all__ = ["export_weights", "require", "train"]

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Named entries (``callbacks.model_checkpoint``, ``logger.wandb``...) to a list of objects."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; returns the final logged metrics.
    A run stopped by Ctrl-C (checkpoint written) exits with status 130."""
    check_training(cfg)
    stopping.reset()  # a new command (tests run several in one process)
    pretrained.configure(cfg)  # pretrained=: the networks' shapes from the weights
    e2e_start.configure(cfg)  # stage=e2e ldm_ckpt=: the U-Net's config from that run
    checkpoint_dir = os.path.join(cfg.paths.output_dir, "checkpoints")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    os.makedirs(cfg.paths.output_dir, exist_ok=True)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    system: L.LightningModule = instantiate(cfg.model)
    system.run_config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # nothing to report learning rates to (Lightning would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for logger in loggers:
        logger.log_hyperparams(system.run_config)

    sharded = isinstance(trainer.strategy, ModelParallelStrategy)  # trainer=fsdp
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir, sharded, cfg.get("stage"))
    pretrained.load(system, cfg, ckpt_path)  # pretrained=: its weights, unless resuming
    e2e_start.load(system, cfg, ckpt_path)
    try:  # signals are recorded from here: a phase before the first step stops too
        with stopping.handling():
            trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(loggers)  # each job of a multirun sweep gets its own wandb run

    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    if preemption is not None and preemption.stopped:  # not finished: no export
        preemption.finish(trainer.is_global_zero)
        if preemption.received == "SIGINT":  # Ctrl-C: a chain of commands stops here
            raise SystemExit(130)
        return _metrics(trainer)

    checkpoint = trainer.checkpoint_callback
    if trainer.is_global_zero and checkpoint is not None:
        last = checkpoint.last_model_path or "-"
        log.info("checkpoints in %s (last: %s)", checkpoint.dirpath, last)
    # rank 0 writes; under FSDP every rank takes part in gathering the shards
    if hasattr(system, "export_weights") and (trainer.is_global_zero or sharded):
        path = export_weights(system, cfg.paths.output_dir, cfg.stage, trainer.is_global_zero)
        if path:
            log.info("exported weights: %s", path)
    return _metrics(trainer)


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _finish_wandb(loggers: list[Any]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def export_weights(
    system: L.LightningModule, output_dir: str, stage: str, write: bool = True
) -> str | None:
    """Write each of ``system.export_weights()`` to ``<output_dir>/export/<stem>.safetensors``
    (where ``write``: rank 0; ``<stage>.safetensors``, or a LoRA's files); metadata values that
    are not strings are stored as JSON (the config that rebuilds the network). Returns the
    paths, joined."""
    files = system.export_weights()
    if not write:
        return None
    paths = []
    for stem, (state, meta) in files.items():
        path = os.path.join(output_dir, "export", f"{stem}.safetensors")
        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        save_safetensors(state, path, metadata=text)
        paths.append(path)
    folders = getattr(system, "export_folders", None)  # stage=e2e: the VAE as diffusers reads it
    if folders is not None:
        paths += folders(os.path.join(output_dir, "export"))
    readers = getattr(getattr(system, "finetune", None), "readers", None) or {}
    for stem in files:
        if stem in readers:
            log.info("%s.safetensors: %s", stem, readers[stem])
    return ", ".join(paths)
