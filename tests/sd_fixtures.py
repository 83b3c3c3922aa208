"""Tiny Stable Diffusion networks and folders for the weight tests: SD 1.x and 2.x layouts at a
tenth of their width, written by diffusers and transformers themselves (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sd_lightning.models import AutoencoderKL
from sd_lightning.weights.configs import unet_diffusers_config, vae_diffusers_config
from sd_lightning.weights.schedule import SD_SCHEDULER
from sd_lightning.weights.tokenizer import write_clip_tokenizer

HINT = "SD weights"
# SD 1.x and 2.x at a tenth of their width: every structural feature, seconds on a CPU
UNETS = {
    "sd1": dict(
        model_channels=32,
        channel_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        attention_levels=[0, 1, 2],
        num_heads=8,
        num_head_channels=-1,
        transformer_depth=2,
        context_dim=768,
        use_linear_in_transformer=False,
        norm_groups=32,
    ),
    "sd2": dict(
        model_channels=64,
        channel_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        attention_levels=[0, 1, 2],
        num_heads=-1,
        num_head_channels=64,
        transformer_depth=1,
        context_dim=1024,
        use_linear_in_transformer=True,
        norm_groups=32,
    ),
}
VAE = dict(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=2, z_channels=4, embed_dim=4)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised layers would hide mistakes: every weight random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


# two levels each: the pipeline a training test fine-tunes in seconds (32 px images)
SMALL_UNET = {
    **UNETS["sd1"],
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_levels": [0, 1],
    "transformer_depth": 1,
    "context_dim": 64,
    "norm_groups": 8,
}
SMALL_VAE = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)


def clip_model(transformers, layers: int = 3, heads: int = 4, act: str = "quick_gelu", **more):
    """A tiny CLIPTextModel unlike SD's in what readers must read: 16-wide heads (SD's are 64),
    an MLP of 2.5x the width (SD's 4x), 3 layers; ``heads=1`` for the 64-wide heads of SD's own
    releases, which single files assume."""
    sizes = {"hidden_size": 64, "intermediate_size": 160, **more}
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408,  # the tokenizer's ids
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        **sizes,
    )
    projected = "projection_dim" in more  # SDXL's second: its pooled output projected
    cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    return randomize(cls(cfg), 5 if projected else 0)


def pipeline_folder(
    tmp_path: Path,
    unet: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    sample_size: int = 8,
    name: str = "tiny-sd",
    text: dict[str, Any] | None = None,
    prediction: str = "epsilon",
) -> tuple:
    """A tiny SD 1-like diffusers pipeline folder written by diffusers and transformers (the
    4-level SD 1 layout unless ``unet``/``vae`` say otherwise; a 64-d CLIP text model of
    :func:`clip_model`, or with ``text``'s options: ``act="gelu"`` makes it SD 2-like, padded
    with "!")."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / name
    unet_cfg = {"in_channels": 4, "out_channels": 4, **(unet or UNETS["sd1"]), "context_dim": 64}
    config = unet_diffusers_config(unet_cfg, sample_size)
    unet_net = randomize(diffusers.UNet2DConditionModel(**config), 1)
    vae_cfg = {**AutoencoderKL(**(vae or VAE)).config, "resolution": 32}
    vae_net = randomize(diffusers.AutoencoderKL(**vae_diffusers_config(vae_cfg)), 2)
    text_net = clip_model(transformers, **(text or {}))
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    pad = "eot" if text_net.config.hidden_act == "quick_gelu" else "zero"
    words = write_clip_tokenizer(str(tmp_path / f"{name}-tokenizer"), pad)
    diffusers.StableDiffusionPipeline(
        vae=vae_net,
        text_encoder=text_net,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(words),
        unet=unet_net,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder, unet_net, vae_net, text_net, scheduler


# -- SDXL ------------------------------------------------------------------------------------------
# SDXL's layout in miniature, unlike its defaults where a reader could assume: three levels with no
# attention on the first, transformer depth 1 and 2 (and 2 in the middle), 16-wide heads (SDXL's
# are 64), an 8-wide size embedding (SDXL's 256), two text towers of other widths, head counts,
# layer counts and MLP ratios than CLIP-L's and bigG's, a 24-d pooled projection
SDXL_UNET = dict(
    model_channels=32,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attention_levels=[1, 2],
    num_heads=-1,
    num_head_channels=16,
    transformer_depth=[0, 1, 2],
    context_dim=80,  # 32 (text_encoder) + 48 (text_encoder_2)
    use_linear_in_transformer=True,
    norm_groups=8,
    adm_in_channels=24 + 6 * 8,  # the pooled projection + 6 size embeddings of 8
)
SDXL_SIZE_DIM = 8


def sdxl_text_models(transformers):
    """A CLIP-L-like ``CLIPTextModel`` (32 wide, 2 heads, 3 layers, quick-GELU) and a bigG-like
    ``CLIPTextModelWithProjection`` (48 wide, 4 heads of 12, 4 layers, GELU, 24-d projection,
    ``eos_token_id`` 2 as SDXL's config has it)."""
    one = clip_model(transformers, layers=3, heads=2, hidden_size=32, intermediate_size=80)
    two = clip_model(  # eos_token_id 2, as SDXL's: transformers pools at the highest id
        transformers, 4, 4, "gelu", hidden_size=48, intermediate_size=144, projection_dim=24,
        eos_token_id=2,
    )  # fmt: skip
    return one, two


def sdxl_pipeline_folder(tmp_path: Path, name: str = "tiny-sdxl", sample_size: int = 8) -> tuple:
    """A tiny SDXL pipeline folder written by diffusers and transformers
    (``StableDiffusionXLPipeline.save_pretrained``): the U-Net's ``text_time`` embedding, two
    text encoders and tokenizers (the second padded with "!"), SDXL's latent scale 0.13025."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet_cfg = {"in_channels": 4, "out_channels": 4, **SDXL_UNET}
    config = unet_diffusers_config(unet_cfg, sample_size, SDXL_SIZE_DIM)
    unet = randomize(diffusers.UNet2DConditionModel(**config), 1)
    vae_cfg = {**AutoencoderKL(**SMALL_VAE).config, "resolution": 8 * sample_size}
    vae = diffusers.AutoencoderKL(**vae_diffusers_config(vae_cfg), scaling_factor=0.13025)
    vae = randomize(vae, 2)
    one, two = sdxl_text_models(transformers)
    words = transformers.CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(str(tmp_path / f"{name}-tokenizer"), "eot")
    )
    words_2 = transformers.CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(str(tmp_path / f"{name}-tokenizer-2"), "zero")
    )
    scheduler = diffusers.EulerDiscreteScheduler(
        **{k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    )
    folder = tmp_path / name
    diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=one,
        text_encoder_2=two,
        tokenizer=words,
        tokenizer_2=words_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    ).save_pretrained(folder)
    return folder, unet, vae, one, two
