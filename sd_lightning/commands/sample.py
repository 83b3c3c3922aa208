"""``stage=sample``: images from prompts with a stage-2 checkpoint.

Writes ``<i>_<prompt>.png`` per prompt and ``grid.png`` into the run directory and prints their
paths. Image ``i`` starts from the noise of seed ``seed + i``: a repeated prompt gives different
images, the same command the same images.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from omegaconf import DictConfig

from sd_lightning.commands.open import apply_loras, load_ldm
from sd_lightning.commands.preflight import check_sampling, size_pair
from sd_lightning.core.errors import InputError
from sd_lightning.data.images import save_png, to_uint8
from sd_lightning.finetune.embedding_files import load_embeddings
from sd_lightning.systems.ldm import LatentDiffusionSystem
from sd_lightning.systems.sampling import sample_grid

log = logging.getLogger(__name__)


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype={name!r}: choose auto, bfloat16 or float32")
    return DTYPES[name]


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def open_for_sampling(
    cfg: DictConfig, device: torch.device | None = None
) -> tuple[LatentDiffusionSystem, torch.dtype]:
    """The stage-2 system of ``cfg.ckpt`` with its LoRA files and embeddings, on ``device``
    (by default ``cfg.device``, null: CUDA if there is one), its networks in the sampling dtype."""
    if device is None:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = sampling_dtype(cfg.get("dtype", "auto"), device)
    system = load_ldm(
        cfg.ckpt, prediction=cfg.get("prediction"), use_ema=cfg.use_ema, base=cfg.get("base")
    )
    apply_loras(system, cfg.get("lora"), cfg.get("lora_scale", 1.0))
    words = load_embeddings(system.conditioner.text_encoder, cfg.get("embeddings"))
    if words:
        log.info("embeddings: %s added to the text encoder", ", ".join(words))
    if cfg.image_size is not None:
        system.check_image_size(int(cfg.image_size), "image_size")
    system = system.to(device)
    if not cfg.use_ema and system.ema is not None:
        system.ema = None
    # the networks in bf16 (no weight casts in every step); schedule and latent scale stay float32
    system.sampling_net.to(dtype)
    system.vae.to(dtype)
    return system, dtype


def sample(cfg: DictConfig) -> dict[str, Any]:
    prompts, negative = check_sampling(cfg)
    system, dtype = open_for_sampling(cfg)
    device = system.device
    seeds = [int(cfg.seed) + i for i in range(len(prompts))]
    low = device.type == "cuda" or dtype == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)
    with autocast:
        images = system.sample_images(
            prompts,
            seeds=seeds,
            image_size=cfg.image_size,
            original_size=size_pair(cfg.get("original_size"), "original_size", 1),
            crop=size_pair(cfg.get("crop"), "crop", 0) or (0, 0),
            sampler=cfg.sampler,
            steps=cfg.steps,
            guidance=cfg.guidance,
            negative_prompt=negative,
            spacing=cfg.spacing,  # null: the system's (trailing for zero terminal SNR)
            batch_size=cfg.batch_size,
        )
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        path = os.path.join(out_dir, f"{i:03d}_{slug(prompt)}.png")
        save_png(to_uint8(image), path)
        paths.append(path)
    grid = os.path.join(out_dir, "grid.png")
    save_png(sample_grid(images), grid)
    for path in paths:
        print(path)
    print(grid)
    log.info(
        "%d images (%s, %d steps, guidance %s, seeds %d..%d) in %s",
        len(prompts),
        cfg.sampler,
        cfg.steps,
        cfg.guidance,
        seeds[0],
        seeds[-1],
        out_dir,
    )
    return {"images": paths, "grid": grid}
