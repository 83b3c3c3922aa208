"""Fine-tuning from Stable Diffusion's weights: ``pretrained=<single file or diffusers folder>``.

``stage=ldm``: the U-Net is the file's (its architecture replaces the ``unet=`` preset's; the
preset lends only its speed options), its weights and, where the file has a whole ``model_ema.``
copy, the EMA's; the VAE is the file's unless ``vae_ckpt=`` names another, and the text encoder
the file's unless ``text_encoder=`` names a pretrained one (the stage's default random tower is
replaced). ``stage=vae``: the autoencoder is SD's VAE, the discriminator fresh, the encoder
frozen unless ``model.freeze_encoder=false`` (a decoder fine-tune, how sd-vae-ft-mse was made:
the latents stay those SD's U-Nets were trained on).

Two steps, both called by :func:`sd_lightning.commands.train.train`: :func:`configure` rewrites the
config from the file's shapes alone (nothing is read), so the run's config, stored in every
checkpoint, rebuilds the network without the file; :func:`load` reads the weights into the built
system, unless the run resumes, whose checkpoint holds them.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sd_lightning.commands.options import text_nodes
from sd_lightning.conditioning.text_encoders import sd_text_encoder_config
from sd_lightning.core.errors import InputError
from sd_lightning.weights.configs import LATENT_SCALES, NAMES
from sd_lightning.weights.read import check_keys, read_sd_unet, read_sd_unet_ema, read_sd_vae
from sd_lightning.weights.schedule import recorded
from sd_lightning.weights.text import text_components

log = logging.getLogger(__name__)

HINT = (
    "Stable Diffusion weights to fine-tune: an original single file "
    "(v1-5-pruned-emaonly.safetensors) or a diffusers folder (model_index.json, unet/, vae/)"
)
VAE_HINT = (
    "Stable Diffusion's VAE to fine-tune: a single file, vae-ft-mse-840000-ema-pruned."
    "safetensors, or a diffusers vae/ folder"
)
# what a unet= preset keeps under pretrained=: options of speed and memory, not of the function
UNET_RUNTIME = ("dropout", "gradient_checkpointing", "fp32_norms", "channels_last")


def configure(cfg: DictConfig) -> None:
    """Rewrite ``cfg`` for ``pretrained=`` (nothing without it); reads shapes, not weights."""
    path = cfg.get("pretrained")
    if not path:
        return
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"pretrained={path!r} does not exist: give {HINT}")
    with open_dict(cfg):
        if cfg.stage in ("ldm", "e2e"):  # e2e: the U-Net, VAE and text encoder to tune
            _configure_ldm(cfg, path)
        elif cfg.stage == "vae":
            _configure_vae(cfg, path)
        else:
            raise InputError(
                f"pretrained= is for stage=ldm, stage=vae and stage=e2e, not stage={cfg.stage}"
            )


def _configure_ldm(cfg: DictConfig, path: str) -> None:
    part = read_sd_unet(path, "pretrained", HINT, meta=True)
    _configure_sampling(cfg, path)
    runtime = {k: cfg.unet[k] for k in UNET_RUNTIME if k in cfg.unet}
    cfg.unet = OmegaConf.create({"_target_": "sd_lightning.models.UNetModel", **part.config})
    cfg.unet.update(runtime)
    if cfg.get("vae_ckpt") is None:
        cfg.vae_ckpt = path
    components = text_components(path)
    # the stage's default random tower gives way to SD's own text encoder(s), if the weights hold
    if _random(cfg.text_encoder) and components:
        cfg.text_encoder = OmegaConf.create(sd_text_encoder_config(path, components))
    if cfg.model.get("latent_scale") is None:  # what the U-Net learnt on, whichever VAE decodes
        cfg.model.latent_scale = _latent_scale(path, part.family)
    _check_vae_family(str(cfg.vae_ckpt), path, cfg.model.latent_scale)
    nodes = [node for _, node in text_nodes(cfg.text_encoder)]
    if all(str(node.get("pretrained")) == path for node in nodes):
        two = " (two: CLIP ViT-L and OpenCLIP ViT-bigG)" if len(nodes) > 1 else ""
        text_from = "from it" + two
    else:
        text_from = "from text_encoder=" + ("" if components else " (the weights hold none)")
    log.info(
        "pretrained: %s U-Net from %s (%d levels, %d-d context); VAE from %s; text encoder %s",
        f"{NAMES[part.family]}'s" if part.family else "an SD-layout",
        path,
        len(part.config["channel_mult"]),
        part.config["context_dim"],
        cfg.vae_ckpt,
        text_from,
    )


def _random(text: DictConfig) -> bool:
    """Whether a ``text_encoder`` config builds random towers only (the stage's default)."""
    return all(node.get("random_text_cfg") is not None for _, node in text_nodes(text))


def _latent_scale(path: str, family: str | None) -> float | None:
    """The latent scale SD weights' U-Net was trained with: what the release's VAE records (our
    exports, diffusers folders), else the family's; ``None`` where neither says."""
    try:
        return read_sd_vae(path, "pretrained", HINT, meta=True).latent_scale
    except InputError:  # no VAE in the weights: the family's
        return LATENT_SCALES.get(family) if family else None


def _check_vae_family(vae: str, path: str, scale: float | None) -> None:
    """A ``vae_ckpt=`` of SD weights whose recorded latent scale is another family's than the
    U-Net's (SDXL's 0.13025 against SD's 0.18215) is refused: its latents are not the ones the
    U-Net learnt. (A standalone VAE file records none: its family cannot be told.)"""
    if vae == path or scale is None or not os.path.exists(vae):
        return
    try:
        found = read_sd_vae(vae, "vae_ckpt", VAE_HINT, meta=True).latent_scale
    except InputError:  # a stage-1 checkpoint of ours, or no SD VAE: read and checked later
        return
    families = {0.18215: "SD 1.x/2.x", 0.13025: "SDXL"}
    if found and abs(found - scale) > 1e-4 * scale and round(found, 5) in families:
        raise InputError(
            f"vae_ckpt={vae!r} is {families[round(found, 5)]}'s VAE (latent scale {found:g}), but "
            f"pretrained={path!r} learnt on latents scaled by {scale:g} "
            f"({families.get(round(scale, 5), 'another family')}): give that family's VAE"
        )


def _configure_sampling(cfg: DictConfig, path: str) -> None:
    """``model.prediction`` (``null``) from what the weights record (a folder's scheduler, our
    files' metadata; else epsilon); a schedule or prediction set apart from the record is
    kept, and said."""
    record = recorded(path)
    found = record.get("prediction")
    if cfg.model.get("prediction") is None:
        cfg.model.prediction = found or "epsilon"
        log.info(
            "pretrained: %s prediction, %s",
            cfg.model.prediction,
            f"as {path} records" if found else "SD's convention (the weights record none)",
        )
    elif found and found != cfg.model.prediction:
        log.warning(
            "pretrained: %s records %s prediction, model.prediction=%s trains the other target "
            "(drop the option to follow the weights)",
            path,
            found,
            cfg.model.prediction,
        )
    schedule = record.get("schedule")
    if schedule:
        ours = OmegaConf.to_container(cfg.model.schedule, resolve=True)
        differ = {k: (ours.get(k), v) for k, v in schedule.items() if ours.get(k) != v}
        if differ:
            log.warning(
                "pretrained: %s was trained with %s; model.schedule has %s: set "
                "model.schedule.<name>= to match",
                path,
                ", ".join(f"{k}={v[1]}" for k, v in differ.items()),
                ", ".join(f"{k}={v[0]}" for k, v in differ.items()),
            )


def _configure_vae(cfg: DictConfig, path: str) -> None:
    part = read_sd_vae(path, "pretrained", VAE_HINT, meta=True)
    cfg.vae = OmegaConf.create(
        {
            "_target_": "sd_lightning.models.AutoencoderKL",
            **part.config,
            "resolution": cfg.data.image_size,
        }
    )


def load(system: torch.nn.Module, cfg: DictConfig, resume: str | None) -> None:
    """The file's weights into ``system`` (built from :func:`configure`'s config), unless the run
    resumes from ``resume`` and its checkpoints hold every weight. A partial fine-tune (LoRA)
    always starts from the file, and records it (path and SHA-256) for its checkpoints."""
    path = cfg.get("pretrained")
    if not path:
        return
    path = str(path)
    partial = bool(getattr(system, "partial", False))
    if resume and not partial:
        log.info("pretrained=%s: not read, the run resumes from %s", path, resume)
        return
    if partial:
        from sd_lightning.finetune.base import base_reference

        system.base_reference = base_reference(path)
    if cfg.stage == "vae":
        part = read_sd_vae(path, "pretrained", VAE_HINT)
        check_keys(system.autoencoder, part.state, f"pretrained={path!r} (VAE)")
        system.autoencoder.load_state_dict(part.state)
        frozen = "encoder frozen" if system.freeze_encoder else "encoder trained too"
        log.info("pretrained: the autoencoder from %s (%s; discriminator fresh)", path, frozen)
        return
    part = read_sd_unet(path, "pretrained", HINT)
    where = f"pretrained={path!r} (U-Net)"
    if partial:  # adapted layers keep their weights under base_layer (peft)
        for net in [system.unet] + ([system.ema.net] if system.ema is not None else []):
            load_base(net, part.state, where)
        log.info("pretrained: the U-Net's weights from %s (base of the adapters)", path)
        return
    check_keys(system.unet, part.state, where)
    system.unet.load_state_dict(part.state)
    if system.ema is None:
        log.info("pretrained: the U-Net's weights from %s (no EMA kept)", path)
        return
    ema, updates = read_sd_unet_ema(path, "pretrained", HINT, list(part.state))
    system.ema.net.load_state_dict(ema if ema is not None else part.state)
    system.ema.num_updates.fill_(updates)
    system.ema.resync()
    log.info(
        "pretrained: the U-Net's weights from %s; its EMA from %s",
        path,
        f"the file's EMA copy ({updates} updates)" if ema is not None else "the same weights",
    )


def load_base(unet: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Base weights into a U-Net with adapters: every key of ``state`` to its place (under
    ``base_layer`` where peft wrapped the layer), every base weight given."""
    own = {k for k in unet.state_dict() if ".lora_" not in k}
    placed = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        placed[wrapped if wrapped in own else key] = value
    check_keys(unet, placed, where, skip=".lora_")
    unet.load_state_dict(placed, strict=False)
