"""Our networks' configs in diffusers' terms, and the original single-file key prefixes.

Our parameter names *are* the original (CompVis/Stability) layout, so a single-file checkpoint maps
by prefix alone (``ORIGINAL_PREFIX``) and diffusers' own converters
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` / ``..._vae_checkpoint``)
turn our state dicts into ``UNet2DConditionModel`` / ``AutoencoderKL`` ones. These functions give
the matching diffusers configs (plain dicts; diffusers itself is not imported), for loading and
exporting weights and for benchmarking against diffusers' U-Net.
"""

from __future__ import annotations

from typing import Any

ORIGINAL_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}


def to_original(state: dict[str, Any], part: str) -> dict[str, Any]:
    """Our state dict -> the keys of an original single-file checkpoint."""
    return {ORIGINAL_PREFIX[part] + k: v for k, v in state.items()}


def from_original(state: dict[str, Any], part: str) -> dict[str, Any]:
    """The ``part`` ("unet" or "vae") of an original single-file checkpoint, in our names."""
    prefix = ORIGINAL_PREFIX[part]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def unet_diffusers_config(config: dict[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """``UNet2DConditionModel(**unet_diffusers_config(unet.config))`` has our U-Net's layout."""
    channels = [config["model_channels"] * m for m in config["channel_mult"]]
    levels = range(len(channels))
    attn = set(config["attention_levels"])
    if config["num_heads"] != -1:
        heads: int | list[int] = config["num_heads"]
    else:
        heads = [c // config["num_head_channels"] for c in channels]
    return {
        "sample_size": sample_size,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": [
            "CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)
        ],
        "block_out_channels": channels,
        "layers_per_block": config["num_res_blocks"],
        "cross_attention_dim": config["context_dim"],
        "attention_head_dim": heads,  # diffusers' name; it is the number of heads
        "use_linear_projection": config["use_linear_in_transformer"],
        "transformer_layers_per_block": config["transformer_depth"],
        "norm_num_groups": config["norm_groups"],
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def vae_diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """``diffusers.AutoencoderKL(**vae_diffusers_config(vae.config))`` has our VAE's layout
    (without attention inside the levels, as in SD's kl-f8)."""
    if config["attn_resolutions"]:
        raise ValueError("diffusers' AutoencoderKL has no attention inside its resolution levels")
    channels = [config["ch"] * m for m in config["ch_mult"]]
    n = len(channels)
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": config["num_res_blocks"],
        "latent_channels": config["embed_dim"],
        "norm_num_groups": config["norm_groups"],
        "sample_size": config["resolution"],
    }
