"""``stage=export``: a stage-2 checkpoint (or sharded folder), or any Stable Diffusion weights we
read, as an original single file or a diffusers folder (:mod:`sd_lightning.weights.write`).

    python -m sd_lightning stage=export ckpt=outputs/ldm/runs/X/checkpoints/last.ckpt \\
        format=single_file output=/models/mine.safetensors
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig

from sd_lightning.commands.options import check_add_ons
from sd_lightning.commands.preflight import check_sampling_source, require
from sd_lightning.core.atomic import replaced_folder
from sd_lightning.core.errors import InputError
from sd_lightning.weights.configs import LATENT_SCALE, LATENT_SCALES

log = logging.getLogger(__name__)

FORMATS = ("single_file", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_export(cfg: DictConfig) -> None:
    """The options of ``stage=export``, each error naming the option and the fix."""
    require(cfg)
    if cfg.format not in FORMATS:
        raise InputError(f"format={cfg.format!r}: choose single_file or diffusers")
    if cfg.dtype not in DTYPES:
        raise InputError(f"dtype={cfg.dtype!r}: choose float32, float16 or bfloat16")
    output = str(cfg.output)
    if cfg.format == "single_file" and not output.endswith(".safetensors"):
        raise InputError(
            f"output={output!r}: a single file is written as safetensors; give a path ending in "
            ".safetensors (or format=diffusers for a folder)"
        )
    check_output(output, cfg.format, bool(cfg.overwrite))
    check_add_ons(cfg)
    if os.path.abspath(output) == os.path.abspath(str(cfg.ckpt)):
        raise InputError(f"output={output!r} is the ckpt= being read: give another path")
    check_sampling_source(str(cfg.ckpt))


# what a diffusers pipeline folder holds (diffusers' model_index.json names its parts)
PIPELINE_ENTRIES = {
    "model_index.json",
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "text_encoder_2",
    "tokenizer_2",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
    "README.md",
    ".gitattributes",
}


def check_output(output: str, fmt: str, overwrite: bool) -> None:
    """What ``output=`` may replace: nothing without ``overwrite=true``; with it, only what an
    export writes (a file for a single file, a diffusers pipeline folder, an empty folder)."""
    if not os.path.lexists(output):
        return
    if fmt == "diffusers" and os.path.isdir(output) and not os.listdir(output):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise InputError(
            f"output={output!r} exists: give a new path, or overwrite=true to replace it"
        )
    if fmt == "single_file" and (os.path.isdir(output) or not os.path.isfile(output)):
        raise InputError(
            f"output={output!r} is a folder, not a file: overwrite=true replaces only a file with "
            "a single file; give a path ending in .safetensors"
        )
    if fmt == "diffusers":
        if not os.path.isdir(output):
            raise InputError(
                f"output={output!r} is a file: format=diffusers writes a folder; give a new path"
            )
        entries = set(os.listdir(output))
        foreign = sorted(entries - PIPELINE_ENTRIES)
        if "model_index.json" not in entries or foreign:
            shown = ", ".join(foreign[:4]) + (
                f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
            )
            what = f"it holds {shown}" if foreign else "it has no model_index.json"
            raise InputError(
                f"output={output!r} is not a diffusers pipeline folder ({what}): overwrite=true "
                "replaces only a pipeline folder, never other files; give a new path"
            )


def release_of(cfg: DictConfig) -> tuple[Any, str]:
    """The networks and sampling settings of ``cfg.ckpt`` as a :class:`Release`, and which
    weights of the U-Net it holds."""
    from sd_lightning.commands.open import apply_loras, load_ldm
    from sd_lightning.weights.configs import SIZE_EMBED_DIM
    from sd_lightning.weights.write import Release

    system = load_ldm(
        cfg.ckpt, prediction=cfg.get("prediction"), use_ema=cfg.use_ema, base=cfg.get("base")
    )
    apply_loras(system, cfg.get("lora"), cfg.get("lora_scale", 1.0))  # merged into the U-Net
    unet = system.sampling_net if cfg.use_ema else system.unet
    if system.ema is None:  # SD weights: load_sd_system took the file's EMA copy where asked
        which = "as loaded"
    else:
        which = "EMA" if cfg.use_ema else "online"
    schedule = dict((system.run_config or {}).get("model", {}).get("schedule") or {})
    release = Release(
        unet=unet,
        vae=system.vae,
        text=system.conditioner.text_encoder,
        latent_scale=float(system.latent_scale),
        prediction=system.prediction,
        schedule=schedule,
        spacing=system.default_spacing,
        image_size=system._image_size(),
        size_embed_dim=system.conditioner.size_dim or SIZE_EMBED_DIM,
    )
    norm = getattr(system, "latent_norm", None)
    if norm is not None:  # stage=e2e: standardised latents, folded into the VAE at SD's scale
        from sd_lightning.models.latent_norm import fold_into_vae

        release.latent_scale = LATENT_SCALES.get(release.family or "sd1", LATENT_SCALE)
        release.vae = fold_into_vae(system.vae, *norm.mean_std(), release.latent_scale)
        log.info(
            "REPA-E's latent normalisation (per-channel mean and std) folded into the VAE's "
            "quant_conv and post_quant_conv: the files sample at the standard latent scale %s",
            release.latent_scale,
        )
    return release, which


def export(cfg: DictConfig) -> dict[str, Any]:
    from sd_lightning.weights.write import text_layout, write_diffusers, write_single_file

    check_export(cfg)
    release, which = release_of(cfg)
    output, dtype = str(cfg.output), DTYPES[cfg.dtype]
    # written beside and then renamed over output: the old export stays until the new is whole
    if cfg.format == "single_file":
        missing = write_single_file(release, output, dtype)
    else:
        with replaced_folder(output) as folder:
            missing = write_diffusers(release, folder, dtype)
    layout = text_layout(release.text) or "none"
    log.info(
        "exported %s (%s, %s): U-Net (%s weights), VAE (latent scale %.5f), text encoder %s; "
        "%s prediction, %d px",
        output,
        cfg.format,
        cfg.dtype,
        which,
        release.latent_scale,
        layout,
        release.prediction,
        release.image_size,
    )
    if missing:
        log.warning(
            "%s: no %s. The run's text encoder is a random tower, in no release's layout, so "
            "it is left out: load the file with a text encoder of %d-d states (diffusers: "
            "text_encoder=... and tokenizer=... in from_pretrained / from_single_file)",
            output,
            " or ".join(missing),
            release.unet.config["context_dim"],
        )
    standard = LATENT_SCALES.get(release.family or "sd1", LATENT_SCALE)
    if abs(release.latent_scale - standard) > 1e-6 * standard:
        log.warning(
            "%s: latent scale %.5f, not %s's %s: single-file tools assume the family's and would "
            "decode wrongly (ComfyUI; AUTOMATIC1111 reads scale_factor from a .yaml beside the "
            "file). The file's metadata records it, and format=diffusers writes it as the VAE's "
            "scaling_factor, which diffusers reads",
            output,
            release.latent_scale,
            "SDXL" if release.family == "sdxl" else "SD",
            standard,
        )
    if release.prediction == "v_prediction":
        log.info(
            "v_prediction: tell the loading tool (AUTOMATIC1111: a .yaml beside the file with "
            "parameterization: v; ComfyUI: ModelSamplingDiscrete v_prediction)"
        )
    if layout == "sd1" and release.text.skip:
        log.info(
            "trained with clip skip %d (text_encoder.layer=%d): sample with clip_skip=%d in "
            "diffusers, CLIP Set Last Layer -%d in ComfyUI",
            release.text.skip + 1,
            release.text.skip,
            release.text.skip,
            release.text.skip + 1,
        )
    if layout == "sdxl":
        standard = {"skip": 1, "final_norm": False}
        odd = [
            f"{name} {key}={getattr(encoder, key)}"
            for name, encoder in zip(("CLIP-L", "bigG"), release.text.encoders)
            for key, value in standard.items()
            if getattr(encoder, key) != value
        ]
        if odd:
            log.warning(
                "%s: the text encoders were read as SDXL's are not (%s); diffusers, ComfyUI and "
                "AUTOMATIC1111 read SDXL's penultimate states without the final norm, so they "
                "condition it otherwise; our readers take the settings from the file",
                output,
                ", ".join(odd),
            )
    if layout == "sd2" and release.text.skip > 1:
        log.info(
            "trained on the states %d blocks before the last (text_encoder.layer=%d); SD 2 tools "
            "read the penultimate (ComfyUI: CLIP Set Last Layer -%d); our readers take it from "
            "the metadata",
            release.text.skip,
            release.text.skip,
            release.text.skip + 1,
        )
    print(output)
    return {"output": output, "missing": missing}
