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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sd_lightning.checkpoints import read_checkpoint
from sd_lightning.errors import InputError
from sd_lightning.finetune.embedding_files import load_embeddings
from sd_lightning.preflight import LDM_HINT, check_sampling, check_sampling_source
from sd_lightning.systems.images import save_png, to_uint8
from sd_lightning.systems.ldm import LatentDiffusionSystem, sample_grid

log = logging.getLogger(__name__)


def load_ldm(
    path: str,
    key: str = "ckpt",
    prediction: str | None = None,
    use_ema: bool = True,
    base: str | None = None,
) -> LatentDiffusionSystem:
    """Rebuild the stage-2 system from its checkpoint alone (the U-Net, EMA and frozen VAE from
    the saved state, the text encoder from the saved config), or from Stable Diffusion's weights
    (``prediction`` and ``use_ema``: see :func:`load_sd_system`). A partial checkpoint (LoRA,
    textual inversion) takes its base from where it was trained, or ``base`` (it moved)."""
    if not check_sampling_source(str(path)):
        from sd_lightning.weights.pipeline import load_sd_system

        return load_sd_system(str(path), key, prediction, "auto" if use_ema else False)
    checkpoint = read_checkpoint(path, "ldm", key, LDM_HINT)
    meta = checkpoint["sd_lightning"]
    config = meta["config"]
    partial = "base" in meta  # a LoRA's checkpoint: the base weights (and VAE) from their files
    where = f"{key}={str(path)!r}"
    if partial:
        from sd_lightning.finetune.base import check_base, rebased

        trained_on = str(config.get("pretrained"))
        if base:
            config = rebased(config, trained_on, str(base))
        elif not os.path.exists(trained_on):
            raise InputError(
                f"{where} holds adapters for the base weights {trained_on}, which are not there "
                "any more: give their new place with base=/path/to/the/weights"
            )
    elif base:
        raise InputError(
            f"base= is for partial checkpoints (LoRA, textual inversion); {where} holds a whole model"
        )
    model_cfg: dict[str, Any] = dict(config["model"])
    if not partial:
        model_cfg["vae"] = {"_target_": "sd_lightning.models.AutoencoderKL", **meta["vae_config"]}
    system = instantiate(OmegaConf.create(model_cfg))
    if partial:
        from sd_lightning.weights import pretrained

        pretrained.load(system, OmegaConf.create(config), resume=None)
        check_base(meta["base"], system.base_reference, where, "base")
    system.load_state_dict(checkpoint["state_dict"], strict=not partial)
    system.run_config = config
    return system.eval()


def apply_loras(system: LatentDiffusionSystem, paths: Any, scales: Any) -> None:
    """Merge LoRA files (kohya's or diffusers') into the sampling U-Net (and the text encoder,
    for those that adapt it), each with its scale (one number for all, or one per file); a
    model trained with adapters has them merged first."""
    from sd_lightning.finetune.lora import merge_adapters
    from sd_lightning.finetune.lora_files import merge_lora

    if system.partial:  # sample with the adapters merged: a plain U-Net, full speed
        system.unet = merge_adapters(system.unet)
        if system.ema is not None:
            system.ema.net = merge_adapters(system.ema.net)
    text = system.text_encoder.net
    if getattr(system, "text_tower", None) is not None:  # the text encoder's adapters too
        from sd_lightning.finetune.text_lora import fuse_attention

        fuse_attention(merge_adapters(system.text_tower))
        del system.text_tower
        text.trains = False
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(paths)
    scales = list(scales)
    if len(scales) != len(paths):
        raise InputError(
            f"lora_scale has {len(scales)} values for {len(paths)} LoRA files: give one for all, "
            "or one per file"
        )
    for lora, scale in zip(paths, scales):
        layers = merge_lora(
            system.sampling_net, str(lora), float(scale), getattr(text, "tower", None)
        )
        log.info("LoRA %s (scale %s): merged into %d layers", lora, scale, layers)


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype={name!r}: choose auto, bfloat16 or float32")
    return DTYPES[name]


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def sample(cfg: DictConfig) -> dict[str, Any]:
    prompts, negative = check_sampling(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = sampling_dtype(cfg.get("dtype", "auto"), device)
    system = load_ldm(
        cfg.ckpt, prediction=cfg.get("prediction"), use_ema=cfg.use_ema, base=cfg.get("base")
    )
    apply_loras(system, cfg.get("lora"), cfg.get("lora_scale", 1.0))
    words = load_embeddings(system.text_encoder.net, cfg.get("embeddings"))
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
    seeds = [int(cfg.seed) + i for i in range(len(prompts))]
    low = device.type == "cuda" or dtype == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)
    with autocast:
        images = system.sample_images(
            prompts,
            seeds=seeds,
            image_size=cfg.image_size,
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
