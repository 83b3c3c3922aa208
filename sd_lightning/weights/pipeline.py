"""A whole Stable Diffusion release (an original single file, or a diffusers pipeline folder) as our
stage-2 system: its U-Net, VAE and text encoder, with the noise schedule SD was trained with
(scaled-linear betas 0.00085 to 0.012 over 1000 steps) and its latent scale, ready to sample."""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any

import torch

from sd_lightning.errors import InputError
from sd_lightning.files import read_weight_file
from sd_lightning.weights.read import build, read_sd_unet, read_sd_vae

SD_HINT = (
    "Stable Diffusion weights (v1-5-pruned-emaonly.safetensors, or a diffusers folder with "
    "model_index.json), or the checkpoints/last.ckpt of a stage=ldm run"
)
SD_SCHEDULE = {
    "beta_schedule": "scaled_linear",
    "num_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "zero_terminal_snr": False,
}
PREDICTIONS = ("epsilon", "v_prediction")
# SD's sampling settings in diffusers' scheduler terms (``DDIMScheduler(**SD_SCHEDULER)``), for
# folders written for diffusers and for comparing against it
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _scheduler_config(path: str) -> dict[str, Any]:
    """A diffusers folder's ``scheduler/scheduler_config.json`` (empty for single files)."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config):
        return {}
    with open(config) as f:
        return json.load(f)


def recorded(path: str) -> dict[str, Any]:
    """What SD weights record of how they sample, where they do: a diffusers folder's scheduler
    (``prediction``, ``schedule``), our single files' metadata (those, ``image_size``). Keys
    absent where nothing is recorded (another tool's single file: SD's conventions apply)."""
    if os.path.isdir(path):
        scheduler = _scheduler_config(path)
        out: dict[str, Any] = {"schedule": sd_schedule(scheduler)} if scheduler else {}
        if "prediction_type" in scheduler:
            out["prediction"] = scheduler["prediction_type"]
        return out
    meta = read_weight_file(path, "ckpt", SD_HINT).metadata
    out = {}
    if meta.get("prediction_type"):
        out["prediction"] = meta["prediction_type"]
    if isinstance(meta.get("sd_lightning_schedule"), dict):
        out["schedule"] = {**SD_SCHEDULE, **meta["sd_lightning_schedule"]}
    if meta.get("sd_lightning_image_size"):
        out["image_size"] = int(meta["sd_lightning_image_size"])
    return out


def sd_schedule(scheduler: dict[str, Any]) -> dict[str, Any]:
    """Our ``model.schedule`` from a diffusers scheduler config (SD's when absent)."""
    beta = scheduler.get("beta_schedule", SD_SCHEDULE["beta_schedule"])
    beta = {"squaredcos_cap_v2": "cosine"}.get(beta, beta)  # diffusers' name of the cosine one
    if beta not in ("scaled_linear", "linear", "cosine"):
        raise InputError(
            f"the scheduler's beta_schedule={beta!r} is not read (scaled_linear, linear, "
            "squaredcos_cap_v2)"
        )
    return {
        **SD_SCHEDULE,
        "beta_schedule": beta,
        "num_timesteps": scheduler.get("num_train_timesteps", SD_SCHEDULE["num_timesteps"]),
        "beta_start": scheduler.get("beta_start", SD_SCHEDULE["beta_start"]),
        "beta_end": scheduler.get("beta_end", SD_SCHEDULE["beta_end"]),
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
    }


def load_sd_system(
    path: str, option: str = "ckpt", prediction: str | None = None, use_ema: bool | str = False
):
    """Our :class:`LatentDiffusionSystem` holding a Stable Diffusion release, in eval mode.

    ``prediction``: what the U-Net predicts, which weights cannot tell (SD 2.x's 768 px models
    predict ``v_prediction``); ``None``: a diffusers folder's scheduler config, else epsilon.
    ``use_ema``: a single file's ``model_ema.`` copy of the U-Net instead of its online weights
    (``"auto"``: where the file has a whole copy; "-emaonly" files hold the EMA as their weights).
    """
    from sd_lightning.models import AutoencoderKL, OpenCLIPTextEncoder, UNetModel
    from sd_lightning.systems.ldm import LatentDiffusionSystem

    where = f"{option}={path!r}"
    unet_part = read_sd_unet(path, option, SD_HINT, use_ema=use_ema)
    vae_part = read_sd_vae(path, option, SD_HINT)
    record = recorded(path)
    prediction = prediction or record.get("prediction") or "epsilon"
    if prediction not in PREDICTIONS:
        raise InputError(f"prediction={prediction!r}: choose epsilon or v_prediction")
    unet = build(UNetModel, unet_part, f"{where} (U-Net)")
    vae = build(AutoencoderKL, vae_part, f"{where} (VAE)")
    # the file's tensors (memory-mapped pages) are not kept past this point
    unet_part.state, vae_part.state = {}, {}
    text = OpenCLIPTextEncoder(pretrained=path, layer="auto")
    if text.width != unet.config["context_dim"]:
        raise InputError(
            f"{where}: the text encoder's {text.width}-d states do not fit the U-Net's "
            f"{unet.config['context_dim']}-d context"
        )
    schedule = record.get("schedule") or dict(SD_SCHEDULE)
    system = LatentDiffusionSystem(
        unet=unet,
        vae=vae,
        text_encoder=text,
        optimizer=partial(torch.optim.AdamW),
        schedule=schedule,
        prediction=prediction,
        latent_scale=vae_part.latent_scale,
        ema_decay=None,
    )
    if record.get("image_size"):  # our single files say it
        size = record["image_size"]
    elif unet_part.sample_size:  # a diffusers folder says its size (in latents)
        size = unet_part.sample_size * vae.downsample_factor
    else:  # SD 2's v-prediction models were trained at 768 px, the rest at 512
        size = 768 if unet_part.family == "sd2" and prediction == "v_prediction" else 512
    system.run_config = {"model": {"schedule": schedule}, "data": {"image_size": size}}
    return system.eval()
