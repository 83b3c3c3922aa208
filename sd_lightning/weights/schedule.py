"""How Stable Diffusion releases sample, as files record it: the noise schedule SD was trained with
(scaled-linear betas 0.00085 to 0.012 over 1000 steps) in our terms and in diffusers' scheduler
terms, and what a diffusers folder's scheduler or our single files' metadata say (prediction
type, schedule, image size)."""

from __future__ import annotations

import json
import os
from typing import Any

from sd_lightning.core.errors import InputError
from sd_lightning.weights.files import read_weight_file

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
    found = read_weight_file(path, "ckpt", SD_HINT)
    meta = found.metadata
    out = {}
    # an SDXL file without our metadata may say it the way ComfyUI and AUTOMATIC1111 read it:
    # empty v_pred / ztsnr tensors
    keys = set(found.lazy_tensors(meta=True)) if found.kind == "safetensors" else set()
    if "v_pred" in keys:
        out["prediction"] = "v_prediction"
    if "ztsnr" in keys:
        out["schedule"] = {**SD_SCHEDULE, "zero_terminal_snr": True}
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
