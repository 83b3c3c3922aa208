"""Our stage-2 networks as the files other tools load: an original single file (the CompVis layout
ComfyUI and AUTOMATIC1111 read: ``model.diffusion_model.``, ``first_stage_model.``, and the text
encoder under ``cond_stage_model.``) or a diffusers pipeline folder (``model_index.json``, each
part's ``config.json`` and safetensors, a CLIP tokenizer and a DDIM scheduler with the run's
schedule) that ``StableDiffusionPipeline.from_pretrained`` loads.

The text encoder is written in SD's layout for its kind: SD 1.x's CLIP (quick-GELU, prompts padded
with end-of-text) in transformers' names, SD 2.x's OpenCLIP in OpenCLIP's, SDXL's two as SGM's
``conditioner.embedders.0/1`` (CLIP-L in transformers' names, bigG in OpenCLIP's with its
projection) or diffusers' ``text_encoder``/``text_encoder_2`` (an ``StableDiffusionXLPipeline``).
A random tower (the demo's) has no such layout and is left out; the writers return what is
missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from sd_lightning.core.atomic import save_safetensors
from sd_lightning.weights import configs, layouts
from sd_lightning.weights.clip import hf_from_openclip
from sd_lightning.weights.openclip import activation
from sd_lightning.weights.read import UNET_META, VAE_META
from sd_lightning.weights.schedule import SD_SCHEDULER
from sd_lightning.weights.text import TEXT_META
from sd_lightning.weights.tokenizer import write_clip_tokenizer

DIFFUSERS_VERSION = "0.30.0"  # the format written (read by every diffusers since)
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
LOGIT_SCALE = "logit_scale"  # bigG's CLIP temperature: SDXL files hold it, nothing reads it
V_PRED, ZTSNR = "v_pred", "ztsnr"  # SDXL files' markers of v-prediction and zero terminal SNR
BETAS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass
class Release:
    """What an export holds: the networks (the U-Net's chosen weights: EMA or online), the text
    encoder (``None``: none in SD's layout) and how the model samples."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module | None
    latent_scale: float
    prediction: str
    schedule: dict[str, Any]
    spacing: str
    image_size: int
    size_embed_dim: int = configs.SIZE_EMBED_DIM  # SDXL's size embeddings (the conditioner's)

    @property
    def family(self) -> str | None:
        """``sdxl`` for a U-Net with a vector condition, else its context's family."""
        config = self.unet.config
        return "sdxl" if config.get("adm_in_channels") else configs.family_of(config["context_dim"])


def text_layout(encoder: torch.nn.Module | None) -> str | None:
    """``"sd1"`` (transformers' CLIP names under ``cond_stage_model.transformer.``: SD 1's
    quick-GELU CLIP, and any 768-wide tower, which tools load for a 768-context model by those
    names), ``"sd2"`` (OpenCLIP's names), ``"sdxl"`` (two encoders), or ``None`` for a random
    tower, which is no release's."""
    if encoder is None or getattr(encoder, "random", False):
        return None
    if hasattr(encoder, "encoders"):
        if len(encoder.encoders) != 2 or any(e.random for e in encoder.encoders):
            return None
        return "sdxl"
    quick = activation(encoder.tower) == "quick_gelu"
    return "sd1" if quick or encoder.tower.transformer.width == 768 else "sd2"


def text_record(encoder: torch.nn.Module, layer: int) -> dict[str, Any]:
    """What a single file's tensors do not show of its text encoder (our metadata): heads,
    activation, padding, layer norm, and ``layer``, the file's final blocks to skip."""
    tower = encoder.tower
    return {
        "heads": tower.transformer.resblocks[0].attn.num_heads,
        "activation": activation(tower),
        "pad": "eot" if encoder.pad_eot else "zero",
        "layer_norm_eps": tower.ln_final.eps,
        "layer": layer,
        "final_norm": encoder.final_norm,
        "pool": encoder.pool,
    }


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }


def _tower_state(
    release: Release,
    layers: int | None = None,
    encoder: torch.nn.Module | None = None,
    projection: bool | None = None,
) -> dict[str, torch.Tensor]:
    """The text tower's OpenCLIP-named weights; ``layers``: only the first so many blocks;
    ``projection``: with the tower's text projection (``None``: where the encoder pools; SD 2
    files keep OpenCLIP's unused one)."""
    encoder = encoder or release.text
    state = encoder.tower.state_dict()
    if not (encoder.pooled if projection is None else projection):
        state.pop("text_projection", None)
    if layers is None:
        return state
    keep = tuple(f"transformer.resblocks.{i}." for i in range(layers))
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("transformer.resblocks.") or k.startswith(keep)
    }


def _identity_block(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Block ``index`` as zeros: a pre-norm residual block whose projections are zero adds
    nothing, so the penultimate layer of the file is the last one of ``state``."""
    first = "transformer.resblocks.0."
    return {
        f"transformer.resblocks.{index}.{k[len(first) :]}": torch.zeros_like(v)
        for k, v in state.items()
        if k.startswith(first)
    }


def single_file_state(
    release: Release,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any] | None]:
    """The tensors of an original single file, what it lacks, and what its text encoder's
    tensors do not show (:func:`text_record`). An SDXL file that predicts v, or whose schedule
    reaches zero SNR, carries the empty ``v_pred`` / ``ztsnr`` tensors by which ComfyUI and
    AUTOMATIC1111 tell (their metadata-free convention)."""
    state = {
        **layouts.to_original(release.unet.state_dict(), "unet"),
        **layouts.to_original(release.vae.state_dict(), "vae"),
    }
    if release.family == "sdxl":
        if release.prediction == "v_prediction":
            state[V_PRED] = torch.zeros(0)
        if release.schedule.get("zero_terminal_snr"):
            state[ZTSNR] = torch.zeros(0)
    layout = text_layout(release.text)
    if layout is None:
        return state, ["text encoder"], None
    if layout == "sdxl":
        clip_l, clip_g = release.text.encoders
        state.update({SDXL_TEXT[0] + k: v for k, v in hf_from_openclip(
            _tower_state(release, encoder=clip_l)).items()})  # fmt: skip
        bigg = _tower_state(release, encoder=clip_g)
        bigg[LOGIT_SCALE] = torch.tensor(100.0).log()
        state.update({SDXL_TEXT[1] + k: v for k, v in bigg.items()})
        records = {"text_encoder": text_record(clip_l, clip_l.skip)}
        return state, [], {**records, "text_encoder_2": text_record(clip_g, clip_g.skip)}
    tower = _tower_state(release, projection=layout == "sd2")
    skip = release.text.skip
    if layout == "sd1":
        state.update({SD1_TEXT + k: v for k, v in hf_from_openclip(tower).items()})
    else:
        # SD 2 files hold 24 blocks and are read at the penultimate: a tower that runs all its
        # blocks (diffusers' SD 2 folders keep 23) gets a 24th that changes nothing
        if skip == 0:
            blocks = len(release.text.tower.transformer.resblocks)
            tower = {**tower, **_identity_block(tower, blocks)}
            skip = 1
        state.update({SD2_TEXT + k: v for k, v in tower.items()})
    return state, [], text_record(release.text, skip)


def file_metadata(release: Release, text: dict[str, Any] | None) -> dict[str, str]:
    """Our single file's metadata: how it samples and what its tensors do not show."""
    meta = {
        "format": "pt",
        "prediction_type": release.prediction,
        "sd_lightning_schedule": json.dumps(release.schedule),
        "sd_lightning_latent_scale": repr(float(release.latent_scale)),
        "sd_lightning_image_size": str(release.image_size),
        UNET_META: json.dumps(release.unet.config),
        VAE_META: json.dumps(release.vae.config),
    }
    if text is not None:
        meta[TEXT_META] = json.dumps(text)
    return meta


def write_single_file(release: Release, path: str, dtype: torch.dtype) -> list[str]:
    """Write ``release`` as one original-layout safetensors file; returns what is missing."""
    state, missing, text = single_file_state(release)
    save_safetensors(_cast(state, dtype), path, metadata=file_metadata(release, text))
    return missing


def _json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _part(folder: str, name: str, config: dict[str, Any], state: dict, stem: str) -> None:
    _json(os.path.join(folder, name, "config.json"), config)
    path = os.path.join(folder, name, f"{stem}.safetensors")
    save_safetensors(state, path, metadata={"format": "pt"})


def _text_config(encoder: torch.nn.Module, layers: int, dtype: torch.dtype, skip: int) -> dict:
    tower = encoder.tower
    block = tower.transformer.resblocks[0]
    width = tower.transformer.width
    pooled = encoder.pooled
    return {
        "architectures": ["CLIPTextModelWithProjection" if pooled else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_attention_heads": block.attn.num_heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": tower.positional_embedding.shape[0],
        "vocab_size": tower.token_embedding.num_embeddings,
        "hidden_act": activation(tower),
        "layer_norm_eps": tower.ln_final.eps,
        "projection_dim": encoder.pooled_dim if pooled else width,
        "bos_token_id": 49406,
        # transformers pools at the highest id for eos_token_id 2 (SDXL's own config), else at
        # the first end-of-text
        "eos_token_id": 2 if pooled and encoder.pool == "argmax" else 49407,
        "pad_token_id": 49407 if encoder.pad_eot else 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # how our text encoder reads this tower (transformers keeps unknown keys): the final
        # blocks skipped, whether the states pass the final norm; our reader takes them
        TEXT_META: {"layer": skip, "final_norm": encoder.final_norm},
    }


def scheduler_config(release: Release) -> dict[str, Any]:
    """A ``DDIMScheduler`` config with the run's schedule, prediction and spacing (SD's
    settings: steps_offset 1, no clipping)."""
    schedule = release.schedule
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **SD_SCHEDULER,
        "num_train_timesteps": schedule.get("num_timesteps", 1000),
        "beta_start": schedule.get("beta_start", SD_SCHEDULER["beta_start"]),
        "beta_end": schedule.get("beta_end", SD_SCHEDULER["beta_end"]),
        "beta_schedule": BETAS[schedule.get("beta_schedule", "scaled_linear")],
        "prediction_type": release.prediction,
        "timestep_spacing": release.spacing,
        "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr", False)),
    }


def write_diffusers_vae(
    vae: torch.nn.Module,
    folder: str,
    latents_mean: list[float],
    latents_std: list[float],
    image_size: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``vae`` as diffusers' ``AutoencoderKL`` folder whose latents are standardised per channel
    (REPA-E's): ``latents_mean`` and ``latents_std`` in its config, ``scaling_factor`` 1, so a
    reader computes ``(z - mean) / std`` before the U-Net and ``z x std + mean`` before decoding."""
    config = vae.config
    state, _ = layouts.convert(vae.state_dict(), layouts.vae_blocks(config), to_diffusers=True)
    vae_d = {
        **configs.vae_diffusers_config(config),
        "sample_size": image_size,
        "scaling_factor": 1.0,
        "latents_mean": [float(v) for v in latents_mean],
        "latents_std": [float(v) for v in latents_std],
    }
    head = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
    _json(os.path.join(folder, "config.json"), {**head, **vae_d})
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_safetensors(_cast(state, dtype), path, metadata={"format": "pt"})


def write_diffusers(release: Release, folder: str, dtype: torch.dtype) -> list[str]:
    """Write ``release`` as a diffusers ``StableDiffusionPipeline`` folder; returns what is
    missing (then ``null`` in ``model_index.json``: pass it to ``from_pretrained``)."""
    unet_cfg = release.unet.config
    factor = release.vae.downsample_factor
    unet_d = configs.unet_diffusers_config(
        unet_cfg, release.image_size // factor, release.size_embed_dim
    )
    unet_state, _ = layouts.convert(
        release.unet.state_dict(), layouts.unet_blocks(unet_cfg), to_diffusers=True
    )
    head = {"_diffusers_version": DIFFUSERS_VERSION}
    _part(
        folder,
        "unet",
        {"_class_name": "UNet2DConditionModel", **head, **unet_d},
        _cast(unet_state, dtype),
        "diffusion_pytorch_model",
    )
    vae_cfg = release.vae.config
    vae_state, _ = layouts.convert(
        release.vae.state_dict(), layouts.vae_blocks(vae_cfg), to_diffusers=True
    )
    vae_d = {
        **configs.vae_diffusers_config(vae_cfg),
        "sample_size": release.image_size,
        "scaling_factor": release.latent_scale,
    }
    _part(
        folder,
        "vae",
        {"_class_name": "AutoencoderKL", **head, **vae_d},
        _cast(vae_state, dtype),
        "diffusion_pytorch_model",
    )
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config(release))
    layout = text_layout(release.text)
    xl = release.family == "sdxl"
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        **head,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    }
    if xl:  # the unconditional is zeros, as SDXL learnt it (and our conditioner samples it)
        index |= {
            "text_encoder_2": [None, None],
            "tokenizer_2": [None, None],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": True,
        }
    else:
        index |= {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
    if layout is not None:
        encoders = list(release.text.encoders) if layout == "sdxl" else [release.text]
        for i, encoder in enumerate(encoders):
            suffix = f"_{i + 1}" if i else ""
            # diffusers' SD 2 text encoder ends where SD reads it (23 of OpenCLIP's 24 blocks);
            # SDXL's pipeline reads hidden_states[-2] of whole towers itself
            blocks = len(encoder.tower.transformer.resblocks)
            layers = blocks - encoder.skip if layout == "sd2" else blocks
            text_state = hf_from_openclip(_tower_state(release, layers, encoder))
            skip = 0 if layout == "sd2" else encoder.skip  # (SD 2's folder ends where it reads)
            _part(
                folder,
                "text_encoder" + suffix,
                _text_config(encoder, layers, dtype, skip),
                _cast(text_state, dtype),
                "model",
            )
            pad = "eot" if encoder.pad_eot else "zero"
            path = os.path.join(folder, "tokenizer" + suffix)
            write_clip_tokenizer(path, pad, encoder.context_length)
            kind = "CLIPTextModelWithProjection" if encoder.pooled else "CLIPTextModel"
            index["text_encoder" + suffix] = ["transformers", kind]
            index["tokenizer" + suffix] = ["transformers", "CLIPTokenizer"]
    _json(os.path.join(folder, "model_index.json"), index)
    return [] if layout else ["text encoder", "tokenizer"]
