"""Network configs in diffusers' terms (plain dicts for ``UNet2DConditionModel`` /
``AutoencoderKL``; diffusers itself is not imported) and back from diffusers' ``config.json``
files, or from the weights themselves when a single file carries no config (SD 1.x and 2.x differ
in what the tensors show: the context width, and 1x1-conv or linear projections around
attention)."""

from __future__ import annotations

from typing import Any

from sd_lightning.core.errors import InputError

# what SD's families fix that their weights cannot show
FAMILIES = {
    "sd1": {"context_dim": 768, "num_heads": 8, "num_head_channels": -1, "linear": False},
    "sd2": {"context_dim": 1024, "num_heads": -1, "num_head_channels": 64, "linear": True},
}
LATENT_SCALE = 0.18215  # SD 1.x and 2.x's VAE (scale_factor in their configs)


def family_of(context_dim: int) -> str | None:
    """``sd1``, ``sd2`` or ``None``: the family of a U-Net's text context width."""
    return next((f for f, v in FAMILIES.items() if v["context_dim"] == context_dim), None)


def unet_config_from_diffusers(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Our ``UNetModel`` arguments from a diffusers ``UNet2DConditionModel`` config."""
    sdxl = [k for k in ("addition_embed_type", "class_embed_type") if d.get(k)]
    if sdxl:
        raise InputError(
            f"{where} is a U-Net with {sdxl[0]}={d[sdxl[0]]!r} (SDXL or another family with extra "
            "embeddings), which sd_lightning does not read yet: give SD 1.x or 2.x weights"
        )
    channels = list(d["block_out_channels"])
    base = channels[0]
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        if len(set(depth)) != 1:
            raise InputError(
                f"{where}: transformer depth varying per level ({depth}) is not read yet"
            )
        depth = depth[0]
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers' old misnomer
    if isinstance(heads, int):
        num_heads, num_head_channels = heads, -1
    else:
        widths = {c // h for c, h in zip(channels, heads)}
        if len(widths) != 1:
            raise InputError(f"{where}: heads {heads} for channels {channels} have no one width")
        num_heads, num_head_channels = -1, widths.pop()
    return {
        "in_channels": d["in_channels"],
        "out_channels": d["out_channels"],
        "model_channels": base,
        "channel_mult": [c // base for c in channels],
        "num_res_blocks": d["layers_per_block"],
        "attention_levels": [
            i for i, t in enumerate(d["down_block_types"]) if t.startswith("CrossAttn")
        ],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": depth,
        "context_dim": d["cross_attention_dim"],
        "use_linear_in_transformer": bool(d.get("use_linear_projection", False)),
        "norm_groups": d.get("norm_num_groups", 32),
    }


def vae_config_from_diffusers(d: dict[str, Any]) -> dict[str, Any]:
    """Our ``AutoencoderKL`` arguments from a diffusers ``AutoencoderKL`` config."""
    channels = list(d["block_out_channels"])
    return {
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": d["layers_per_block"],
        "attn_resolutions": [],
        "z_channels": d["latent_channels"],
        "embed_dim": d["latent_channels"],
        "in_channels": d["in_channels"],
        "out_channels": d["out_channels"],
        "resolution": d.get("sample_size", 512),
        "dropout": 0.0,
        "norm_groups": d.get("norm_num_groups", 32),
    }


def unet_config_from_weights(state: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """``(family, our UNetModel arguments)`` from original-layout U-Net weights."""
    try:
        conv_in = state["input_blocks.0.0.weight"]
        attn = next(k for k in state if k.endswith("attn2.to_k.weight"))
    except (KeyError, StopIteration):
        raise InputError(
            f"{where} has no SD U-Net (no input_blocks.0.0 or cross-attention)"
        ) from None
    context = state[attn].shape[1]
    family = family_of(context)
    if family is None:
        raise InputError(
            f"{where} is a U-Net with {context}-d text context: SD 1.x has 768, SD 2.x 1024 "
            "(another family, such as SDXL's 2048, is not read yet)"
        )
    if "label_emb.0.0.weight" in state:
        raise InputError(f"{where} has a class/size embedding (SDXL-like), not read yet")
    fam = FAMILIES[family]
    base = conv_in.shape[0]
    n = 0  # residual blocks per level: the run of them after conv_in
    while f"input_blocks.{1 + n}.0.in_layers.0.weight" in state:
        n += 1
    levels = 1 + sum(1 for k in state if k.startswith("input_blocks.") and k.endswith(".op.weight"))
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (n + 1)
        mult.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // base)
        if f"input_blocks.{first}.1.proj_in.weight" in state:
            attention.append(level)
    prefix = "middle_block.1.transformer_blocks."
    depth = len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    proj = state.get("middle_block.1.proj_in.weight")
    linear = proj is not None and proj.ndim == 2
    return family, {
        "in_channels": conv_in.shape[1],
        "out_channels": state["out.2.weight"].shape[0],
        "model_channels": base,
        "channel_mult": mult,
        "num_res_blocks": n,
        "attention_levels": attention,
        "num_heads": fam["num_heads"],
        "num_head_channels": fam["num_head_channels"],
        "transformer_depth": depth,
        "context_dim": context,
        "use_linear_in_transformer": linear,
        "norm_groups": 32,
    }


def vae_config_from_weights(state: dict[str, Any], where: str) -> dict[str, Any]:
    """Our ``AutoencoderKL`` arguments from original-layout VAE weights."""
    if "encoder.conv_in.weight" not in state:
        raise InputError(f"{where} has no SD VAE (no encoder.conv_in)")
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    mult = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    n = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    z = state["decoder.conv_in.weight"].shape[1]
    return {
        "ch": ch,
        "ch_mult": mult,
        "num_res_blocks": n,
        "attn_resolutions": [],
        "z_channels": z,
        "embed_dim": state["post_quant_conv.weight"].shape[1],
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "resolution": 512,
        "dropout": 0.0,
        "norm_groups": 32,
    }


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
