"""Opening whatever file a user names, for every command and ``pretrained=``: our checkpoints
(files, or folders of shards), our exports, Stable Diffusion's single files and diffusers
folders, as the frozen VAE (:func:`load_vae`) or a whole stage-2 system (:func:`load_ldm`), with
LoRA files merged (:func:`apply_loras`). Everything loads with ``torch.load(weights_only=True)``
or safetensors; a file from the wrong stage, or a missing one, is a clear error that says what
to pass instead.

Lightning checkpoints carry ``checkpoint["sd_lightning"] = {"stage", "config", ...}`` (the composed
run config); safetensors exports carry the same in their JSON metadata. A config stored by an
earlier version names the classes where they were then: :func:`upgraded` points it at today's.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from functools import partial
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sd_lightning.commands import pretrained
from sd_lightning.commands.preflight import LDM_HINT, check_sampling_source
from sd_lightning.conditioning.text_encoders import sd_text_encoder
from sd_lightning.core.atomic import save_safetensors
from sd_lightning.core.errors import InputError
from sd_lightning.finetune.base import check_base, rebased
from sd_lightning.finetune.lora import merge_adapters
from sd_lightning.finetune.lora_files import merge_lora
from sd_lightning.finetune.text_lora import fuse_attention
from sd_lightning.models import AutoencoderKL, UNetModel
from sd_lightning.systems.alignment import PREFIX as ALIGNER
from sd_lightning.systems.ldm import LatentDiffusionSystem
from sd_lightning.weights.configs import family_of_config
from sd_lightning.weights.files import SHARDED_META, read_weight_file, sharded_meta
from sd_lightning.weights.read import build, read_sd_unet, read_sd_vae
from sd_lightning.weights.schedule import PREDICTIONS, SD_HINT, SD_SCHEDULE, recorded
from sd_lightning.weights.text import text_components

log = logging.getLogger(__name__)

VAE_HINT = (
    "the checkpoints/last.ckpt (or export/vae.safetensors) of a stage=vae run, or Stable "
    "Diffusion's VAE (a single file, vae-ft-mse-840000-ema-pruned.safetensors, a diffusers vae/ "
    "folder)"
)


def read_checkpoint(path: str, stage: str | tuple[str, ...], key: str, hint: str) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint of ``stage`` (``key`` names the config option that
    gave ``path``, for the error messages); a sharded one (a folder, ``trainer=fsdp``) is
    gathered into one process, weights only (no optimizer state)."""
    found = read_weight_file(path, key, hint)
    found.require_stage(stage, exports=False)
    if found.kind == "sharded":
        return read_sharded_checkpoint(found.path)
    return found.content


def read_sharded_checkpoint(path: str) -> dict[str, Any]:
    """The ``state_dict`` of a folder of ``torch.distributed.checkpoint`` shards, whole, plus the
    ``meta.pt`` Lightning writes beside them (step, callbacks, ``sd_lightning``)."""
    # what Lightning's own consolidation uses: a load planner that builds the dict from the index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = sharded_meta(path)
    state: dict[str, Any] = {}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*load in a single process")
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),  # not the optimizer's
            no_dist=True,
        )
    return {**torch.load(meta, map_location="cpu", weights_only=True), **state}


def load_vae(path: str, option: str = "vae_ckpt", fp16: bool = False) -> AutoencoderKL:
    """The stage-1 autoencoder, frozen (``requires_grad=False``, eval mode), from a stage=vae
    Lightning checkpoint or its safetensors export, or from Stable Diffusion's own VAE (a single
    file, a standalone VAE file, a diffusers folder); those set ``vae.scaling_factor``, the
    family's latent scale (SD 1/2: 0.18215, SDXL: 0.13025). ``fp16``: under float16 autocast
    the VAE runs in float16 too (by default float32: SDXL's VAE overflows in float16)."""
    vae = _load_vae(str(path), option)
    vae.fp16 = bool(fp16)
    return vae


def _load_vae(path: str, option: str) -> AutoencoderKL:
    sd_folder = os.path.isdir(path) and not os.path.isfile(os.path.join(path, SHARDED_META))
    found = None if sd_folder else read_weight_file(path, option, VAE_HINT)
    if found is None or found.stage is None:  # not one of ours: Stable Diffusion's
        part = read_sd_vae(path, option, VAE_HINT)
        vae = build(AutoencoderKL, part, f"{option}={path!r}")  # with the family's scale
        log.info(
            "%s: Stable Diffusion's VAE from %s (latent scale %s)", option, path, part.latent_scale
        )
        return vae.requires_grad_(False).eval()
    found.require_stage("vae")
    if found.kind == "safetensors":
        config, state = found.metadata["config"], found.tensors()
    else:
        checkpoint = read_sharded_checkpoint(path) if found.kind == "sharded" else found.content
        config = checkpoint["sd_lightning"]["config"]["vae"]
        prefix = "autoencoder."
        state = {
            k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
        }
    config = {k: v for k, v in config.items() if k != "_target_"}
    vae = AutoencoderKL(**config)
    vae.load_state_dict(state)
    return vae.requires_grad_(False).eval()


def save_vae(vae: AutoencoderKL, path: str, step: int = 0) -> str:
    """Write ``vae`` as a stage-1 safetensors export (what ``load_vae`` and ``vae_ckpt=`` read):
    CompVis names, the building config and the stage in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    meta = {"stage": "vae", "model": "autoencoder", "config": vae.config, "step": step}
    save_safetensors(state, path, metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


# -- configs stored by earlier versions -----------------------------------------------------------
MOVED = {  # _target_ paths of classes and functions that moved (checkpoints keep their configs)
    "sd_lightning.models.OpenCLIPTextEncoder": "sd_lightning.conditioning.OpenCLIPTextEncoder",
    "sd_lightning.checkpoints.load_vae": "sd_lightning.commands.open.load_vae",
    "sd_lightning.optim.adamw": "sd_lightning.systems.optim.adamw",
    "sd_lightning.strategy.FSDP2Strategy": "sd_lightning.systems.strategy.FSDP2Strategy",
    "sd_lightning.resume.AtomicCheckpointIO": "sd_lightning.systems.checkpoint_io.AtomicCheckpointIO",
}


def upgraded(config: Any) -> Any:
    """``config`` (plain containers) with every moved ``_target_`` at its place today."""
    if isinstance(config, dict):
        return {k: MOVED.get(v, v) if k == "_target_" else upgraded(v) for k, v in config.items()}
    if isinstance(config, list):
        return [upgraded(v) for v in config]
    return config


# -- a whole stage-2 system -----------------------------------------------------------------------
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
        return load_sd_system(str(path), key, prediction, "auto" if use_ema else False)
    checkpoint = read_checkpoint(path, ("ldm", "e2e"), key, LDM_HINT)
    meta = checkpoint["sd_lightning"]
    config = upgraded(meta["config"])
    partial = "base" in meta  # a LoRA's checkpoint: the base weights (and VAE) from their files
    where = f"{key}={str(path)!r}"
    if partial:
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
    model_cfg.pop("repa", None)  # sampling needs neither the alignment's projector nor encoder
    tuned = meta["stage"] == "e2e"  # REPA-E: the VAE tuned with the U-Net, in the checkpoint
    if tuned:  # nor the VAE's loss, discriminator or optimizers
        model_cfg.update(loss=None, vae_optimizer=None, disc_optimizer=None)
    if not partial:
        model_cfg["vae"] = {"_target_": "sd_lightning.models.AutoencoderKL", **meta["vae_config"]}
    system = instantiate(OmegaConf.create(model_cfg))
    if partial:
        pretrained.load(system, OmegaConf.create(config), resume=None)
        check_base(meta["base"], system.base_reference, where, "base")
    skip = (ALIGNER, "loss.") if tuned else (ALIGNER,)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(skip)}
    system.load_state_dict(state, strict=not partial)
    system.run_config = config
    return system.eval()


def apply_loras(system: LatentDiffusionSystem, paths: Any, scales: Any) -> None:
    """Merge LoRA files (kohya's or diffusers') into the sampling U-Net (and the text encoder,
    for those that adapt it), each with its scale (one number for all, or one per file); a
    model trained with adapters has them merged first."""
    if system.partial:  # sample with the adapters merged: a plain U-Net, full speed
        system.unet = merge_adapters(system.unet)
        if system.ema is not None:
            system.ema.net = merge_adapters(system.ema.net)
    text = system.conditioner.text_encoder
    if getattr(system, "text_tower", None) is not None:  # the text encoder's adapters too
        fuse_attention(merge_adapters(system.text_tower))
        del system.text_tower
        for encoder in getattr(text, "encoders", [text]):
            encoder.trains = False
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(paths)
    scales = list(scales)
    if len(scales) != len(paths):
        raise InputError(
            f"lora_scale has {len(scales)} values for {len(paths)} LoRA files: give one for all, "
            "or one per file"
        )
    encoders = list(getattr(text, "encoders", [text]))  # SDXL's two, in order
    towers = [e.tower for e in encoders if getattr(e, "tower", None) is not None]
    family = family_of_config(system.unet.config)
    for lora, scale in zip(paths, scales):
        layers = merge_lora(system.sampling_net, str(lora), float(scale), towers, family)
        log.info("LoRA %s (scale %s): merged into %d layers", lora, scale, layers)


def load_sd_system(
    path: str, option: str = "ckpt", prediction: str | None = None, use_ema: bool | str = False
):
    """Our :class:`LatentDiffusionSystem` holding a Stable Diffusion release, in eval mode.

    ``prediction``: what the U-Net predicts, which weights cannot tell (SD 2.x's 768 px models
    predict ``v_prediction``); ``None``: a diffusers folder's scheduler config, else epsilon.
    ``use_ema``: a single file's ``model_ema.`` copy of the U-Net instead of its online weights
    (``"auto"``: where the file has a whole copy; "-emaonly" files hold the EMA as their weights).
    """
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
    text = sd_text_encoder(path, text_components(path) or ["text_encoder"])
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
    elif unet_part.family == "sdxl":
        size = 1024
    else:  # SD 2's v-prediction models were trained at 768 px, the rest at 512
        size = 768 if unet_part.family == "sd2" and prediction == "v_prediction" else 512
    system.run_config = {"model": {"schedule": schedule}, "data": {"image_size": size}}
    return system.eval()
