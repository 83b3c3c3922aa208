"""Reading our own checkpoints across stages: the frozen VAE for stage 2, the stage-2 system for
sampling. Everything loads with ``torch.load(weights_only=True)`` or safetensors; a file from the
wrong stage, or a missing one, is a clear error that says what to pass instead.

Lightning checkpoints carry ``checkpoint["sd_lightning"] = {"stage", "config", ...}`` (the composed
run config); safetensors exports carry the same in their JSON metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import torch

from sd_lightning.atomic import save_safetensors
from sd_lightning.files import read_weight_file
from sd_lightning.models.autoencoder import AutoencoderKL
from sd_lightning.resume import SHARDED_META, sharded_meta
from sd_lightning.weights.read import build, read_sd_vae

log = logging.getLogger(__name__)

VAE_HINT = (
    "the checkpoints/last.ckpt (or export/vae.safetensors) of a stage=vae run, or Stable "
    "Diffusion's VAE (a single file, vae-ft-mse-840000-ema-pruned.safetensors, a diffusers vae/ "
    "folder)"
)


def read_checkpoint(path: str, stage: str, key: str, hint: str) -> dict[str, Any]:
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


def check_stage(checkpoint: Any, stage: str, what: str, fix: str) -> None:
    """Raise ``ValueError("<what> of stage X, not stage Y: <fix>")`` unless ``checkpoint`` was
    written by ``stage``."""
    meta = checkpoint.get("sd_lightning") if isinstance(checkpoint, dict) else None
    found = (meta or {}).get("stage")
    if found != stage:
        raise ValueError(f"{what} of stage {found!r}, not stage {stage!r}: {fix}")


def load_vae(path: str, option: str = "vae_ckpt") -> AutoencoderKL:
    """The stage-1 autoencoder, frozen (``requires_grad=False``, eval mode), from a stage=vae
    Lightning checkpoint or its safetensors export, or from Stable Diffusion's own VAE (a single
    file, a standalone VAE file, a diffusers folder); those set ``vae.scaling_factor``, the
    family's latent scale (0.18215)."""
    path = str(path)
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
