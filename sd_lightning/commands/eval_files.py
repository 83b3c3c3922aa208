"""``stage=eval``'s files: ``eval.json``'s record of what made each number, the finished
guidance values kept in ``parts/`` (named by every setting that decides their images, so a changed
setting never reuses them), and what a person reads (the table, the plot, the loggers' rows)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sd_lightning.core.fingerprint import cached_fingerprint
from sd_lightning.evaluation import report

log = logging.getLogger(__name__)


def record(cfg, inception, clip, reference, count, size) -> dict[str, Any]:
    """Everything that made the numbers, for ``eval.json`` (the results are added to it)."""
    e = cfg.eval
    model = str(cfg.ckpt if cfg.get("ckpt") is not None else cfg.vae_ckpt)
    out: dict[str, Any] = {
        "checkpoint": model,
        "checkpoint_sha256": cached_fingerprint(model) if os.path.isfile(model) else None,
        "stage": "ldm" if clip is not None else "vae",
        "protocol": {
            "name": e.get("name"),
            "num_images": int(e.num_images) if clip is not None else count,
            "image_size": size,
            "reference": str(reference.source),
            "reference_count": count,
            "reference_transform": (
                "centre crop to a square, " if e.reference_crop == "centre" else "whole image, "
            )
            + (f"PIL Lanczos to {inception.size}" if inception.size else f"PIL bicubic to {size}")
            + " px",
            "fid_size": inception.size,
            "resize": e.resize,
            "feature_dim": int(e.feature_dim),
            "kid": {"subsets": int(e.kid_subsets), "subset_size": int(e.kid_subset_size)},
        },
        "weights": {"inception": {"file": str(e.inception), "sha256": inception.sha256}},
    }
    if clip is not None:
        out["weights"]["clip"] = {
            "model": clip.name,
            "pretrained": str(clip.tag),
            "activation": clip.activation,
            "sha256": clip.sha256,
        }
        out.update(**_sampling_settings(cfg), prompts=str(e.prompts), prompt_seed=e.prompt_seed)
    return out


def _sampling_settings(cfg: DictConfig) -> dict[str, Any]:
    """What, besides the checkpoint, decides the images (``stage=sample``'s options)."""
    keys = ("sampler", "steps", "seed", "negative_prompt", "spacing", "use_ema", "base", "lora")
    keys += ("lora_scale", "embeddings", "prediction", "dtype")
    return {
        k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        for k, v in ((k, cfg.get(k)) for k in keys)
    }


def _fingerprint(path: Any) -> list[Any]:
    """Size and modification time of a file, or of every file under a folder."""
    path = str(path)
    if os.path.isdir(path):
        return [
            _fingerprint(os.path.join(root, f))
            for root, _, files in sorted(os.walk(path))
            for f in sorted(files)
        ]
    stat = os.stat(path) if os.path.exists(path) else None
    return [
        os.path.abspath(path),
        stat.st_size if stat else None,
        stat.st_mtime_ns if stat else None,
    ]


def part_path(cfg, prompts, inception, clip, size, g) -> str:
    """Where the gathered features of guidance ``g`` are kept, named by all that made them."""
    files = [cfg.ckpt, *(cfg.get("lora") or []), *(cfg.get("embeddings") or [])]
    if cfg.get("base"):
        files.append(cfg.base)
    settings = {
        **_sampling_settings(cfg),
        "files": [_fingerprint(f) for f in files],
        "size": size,
        "guidance": g,
        "dims": inception.dims,
        "resize": inception.resize,
        "inception": inception.sha256,
        "fid_size": inception.size,
        "clip": clip.sha256,
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(cfg.paths.output_dir, "parts", f"guidance_{g:g}_{key[:16]}.npz")


def save_part(path: str, features: np.ndarray, cosines: np.ndarray) -> None:
    from sd_lightning.core.atomic import beside

    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = beside(path, "part") + ".npz"
    np.savez(part, features=features, cosines=cosines)
    os.replace(part, path)


def line(result: dict[str, Any]) -> str:
    shown = {k: v for k, v in result.items() if k not in ("guidance", "kid_std", "images")}
    return ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


def write(cfg: DictConfig, record: dict[str, Any]) -> None:
    out = cfg.paths.output_dir
    os.makedirs(out, exist_ok=True)
    path = report.write_json(os.path.join(out, "eval.json"), record)
    report.write_markdown(os.path.join(out, "eval.md"), record)
    if record["stage"] == "ldm":
        report.write_plot(os.path.join(out, "eval.png"), record["results"], record["checkpoint"])
    print(report.table(record["results"]), end="")
    print(path)
    _log_metrics(cfg, record)
    log.info("evaluation of %s: %s (%.0f s)", record["checkpoint"], path, record["seconds"])


def _log_metrics(cfg: DictConfig, record: dict[str, Any]) -> None:
    """The results to the run's loggers (CSV, wandb...): one row per guidance value; the plot
    and the grids to those that take images."""
    from lightning.pytorch.loggers import WandbLogger

    from sd_lightning.commands.train import instantiate_group

    loggers = instantiate_group(cfg.get("logger"))
    out = cfg.paths.output_dir
    for step, result in enumerate(record["results"]):
        metrics = {f"eval/{k}": float(v) for k, v in result.items()}
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
    for logger in loggers:
        logger.log_hyperparams({k: v for k, v in record.items() if k != "results"})
        if isinstance(logger, WandbLogger) and record["stage"] == "ldm":
            logger.log_image("eval/fid_vs_clip", [os.path.join(out, "eval.png")])
            folder = os.path.join(out, "grids")
            grids = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            if grids:
                paths = [os.path.join(folder, g) for g in grids]
                logger.log_image("eval/samples", paths, caption=grids)
        logger.finalize("success")
