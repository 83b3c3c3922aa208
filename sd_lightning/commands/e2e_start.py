"""Where ``stage=e2e`` starts: ``ldm_ckpt=`` names a stage-2 checkpoint of ours whose U-Net (and
its EMA copy) REPA-E tunes on; the architecture, text encoder, prediction and schedule come from
that run's config, as ``pretrained=`` takes them from Stable Diffusion's weights. The VAE comes
from ``vae_ckpt=`` (by default the one that run trained on).

Two steps, called by :func:`sd_lightning.commands.train.train` beside ``pretrained``'s:
:func:`configure` rewrites the config (the checkpoint's config only, memory-mapped), :func:`load`
reads the weights into the built system unless the run resumes.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sd_lightning.commands.open import LDM_HINT, read_checkpoint, upgraded
from sd_lightning.core.errors import InputError
from sd_lightning.weights.read import check_keys

log = logging.getLogger(__name__)
RUNTIME = ("dropout", "gradient_checkpointing", "fp32_norms", "channels_last")  # the preset's


def configure(cfg: DictConfig) -> None:
    path = cfg.get("ldm_ckpt")
    if cfg.get("stage") != "e2e" or not path:
        return
    if cfg.get("pretrained"):
        raise InputError("give ldm_ckpt= or pretrained= for the U-Net to tune, not both")
    config = upgraded(
        read_checkpoint(str(path), "ldm", "ldm_ckpt", LDM_HINT)["sd_lightning"]["config"]
    )
    if (config.get("model") or {}).get("finetune"):
        raise InputError(
            f"ldm_ckpt={path!r} holds a fine-tune's adapters (finetune=...), not a whole U-Net: "
            "export it merged (stage=export) and give that as pretrained="
        )
    with open_dict(cfg):
        runtime = {k: cfg.unet[k] for k in RUNTIME if k in cfg.unet}
        cfg.unet = OmegaConf.create(config["unet"])
        cfg.unet.update(runtime)
        cfg.text_encoder = OmegaConf.create(config["text_encoder"])
        for key in ("prediction", "schedule"):
            cfg.model[key] = config["model"][key]
        trained_on = config.get("vae_ckpt")
        if cfg.get("vae_ckpt") is None:
            if not trained_on or not os.path.exists(str(trained_on)):
                raise InputError(
                    f"ldm_ckpt={path!r} trained on the VAE {trained_on!r}, which is not there: "
                    "give vae_ckpt= (a stage=vae checkpoint or export, or SD's VAE)"
                )
            cfg.vae_ckpt = trained_on
    log.info(
        "ldm_ckpt: the U-Net, text encoder and schedule of %s; VAE from %s", path, cfg.vae_ckpt
    )


def load(system: torch.nn.Module, cfg: DictConfig, resume: str | None) -> None:
    path = cfg.get("ldm_ckpt")
    if cfg.get("stage") != "e2e" or not path:
        return
    if resume:
        log.info("ldm_ckpt=%s: not read, the run resumes from %s", path, resume)
        return
    state = read_checkpoint(str(path), "ldm", "ldm_ckpt", LDM_HINT)["state_dict"]
    for prefix, net in (("unet.", system.unet), ("ema.net.", getattr(system.ema, "net", None))):
        if net is None:
            continue
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not part and prefix == "ema.net.":  # a run without EMA: the EMA starts from the U-Net
            part = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
        check_keys(net, part, f"ldm_ckpt={str(path)!r}")
        net.load_state_dict(part)
    if system.ema is not None:
        system.ema.resync()
    log.info("ldm_ckpt: the U-Net's weights and its EMA from %s", path)
