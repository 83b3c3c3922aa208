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
    "sdxl": {"context_dim": 2048, "num_heads": -1, "num_head_channels": 64, "linear": True},
}
LATENT_SCALE = 0.18215  # SD 1.x and 2.x's VAE (scale_factor in their configs)
LATENT_SCALES = {"sd1": LATENT_SCALE, "sd2": LATENT_SCALE, "sdxl": 0.13025}
NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
SIZE_EMBED_DIM = 256  # SDXL's Fourier width per size number (diffusers' addition_time_embed_dim)
REFINER = (
    "an SDXL refiner (1280-d context, 2560-d vector condition), which sd_lightning does not read: "
    "give an SDXL base (sd_xl_base_1.0), SD 1.x or 2.x weights"
)


def family_of(context_dim: int) -> str | None:
    """``sd1``, ``sd2``, ``sdxl`` or ``None``: the family of a U-Net's text context width."""
    return next((f for f, v in FAMILIES.items() if v["context_dim"] == context_dim), None)


def family_of_config(config: dict[str, Any]) -> str | None:
    """The family of our U-Net config: ``sdxl`` where it takes a vector condition (at any size:
    SDXL-shaped), else its context's."""
    return "sdxl" if config.get("adm_in_channels") else family_of(config["context_dim"])


def _compact_depth(depths: list[int], attention: list[int], middle: int) -> dict[str, Any]:
    """``transformer_depth`` as one number where every attention level and the middle agree
    (SD 1/2's configs, unchanged), else one per level (0 without attention, SDXL's [0, 2, 10])
    and the middle's where it differs from the last level's."""
    used = {depths[i] for i in attention} | {middle}
    if len(used) == 1:
        return {"transformer_depth": used.pop()}
    per_level = [depths[i] if i in attention else 0 for i in range(len(depths))]
    out: dict[str, Any] = {"transformer_depth": per_level}
    if middle != per_level[-1]:
        out["transformer_depth_middle"] = middle
    return out


def unet_config_from_diffusers(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Our ``UNetModel`` arguments from a diffusers ``UNet2DConditionModel`` config (SDXL's
    ``text_time`` vector condition included)."""
    if d.get("class_embed_type") or d.get("addition_embed_type") not in (None, "text_time"):
        kind = d.get("class_embed_type") or d.get("addition_embed_type")
        raise InputError(
            f"{where} is a U-Net with extra embeddings of type {kind!r}, which sd_lightning does "
            "not read: give SD 1.x, 2.x or SDXL weights"
        )
    if d.get("cross_attention_dim") == 1280 and d.get("projection_class_embeddings_input_dim"):
        raise InputError(f"{where} is {REFINER}")
    channels = list(d["block_out_channels"])
    base = channels[0]
    attention = [i for i, t in enumerate(d["down_block_types"]) if t.startswith("CrossAttn")]
    depth = d.get("transformer_layers_per_block", 1)
    depths = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    reverse = d.get("reverse_transformer_layers_per_block")
    if reverse is not None and list(reverse) != [[x] * (d["layers_per_block"] + 1) for x in depths]:
        raise InputError(f"{where}: reverse_transformer_layers_per_block={reverse} is not read")
    if any(isinstance(x, list) for x in depths):
        raise InputError(f"{where}: transformer depth varying within a level is not read")
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers' old misnomer
    if isinstance(heads, int):
        num_heads, num_head_channels = heads, -1
    else:
        widths = {channels[i] // heads[i] for i in attention} or {channels[0] // heads[0]}
        if len(widths) != 1:
            raise InputError(f"{where}: heads {heads} for channels {channels} have no one width")
        num_heads, num_head_channels = -1, widths.pop()
    out = {
        "in_channels": d["in_channels"],
        "out_channels": d["out_channels"],
        "model_channels": base,
        "channel_mult": [c // base for c in channels],
        "num_res_blocks": d["layers_per_block"],
        "attention_levels": attention,
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        **_compact_depth(depths, attention, depths[-1]),
        "context_dim": d["cross_attention_dim"],
        "use_linear_in_transformer": bool(d.get("use_linear_projection", False)),
        "norm_groups": d.get("norm_num_groups", 32),
    }
    if d.get("addition_embed_type") == "text_time":
        out["adm_in_channels"] = d["projection_class_embeddings_input_dim"]
    return out


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
    adm = state["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in state else None
    if context == 1280 and adm:
        raise InputError(f"{where} is {REFINER}")
    family = family_of(context)
    if family is None:
        raise InputError(
            f"{where} is a U-Net with {context}-d text context: SD 1.x has 768, SD 2.x 1024, "
            "SDXL 2048 (another family is not read)"
        )
    if (adm is not None) != (family == "sdxl"):
        raise InputError(
            f"{where} is a U-Net with a {context}-d context {'and' if adm else 'but no'} vector "
            "condition (label_emb), which no SD family has (SDXL: 2048-d with one)"
        )
    fam = FAMILIES[family]
    base = conv_in.shape[0]
    n = 0  # residual blocks per level: the run of them after conv_in
    while f"input_blocks.{1 + n}.0.in_layers.0.weight" in state:
        n += 1
    levels = 1 + sum(1 for k in state if k.startswith("input_blocks.") and k.endswith(".op.weight"))

    def blocks(prefix: str) -> int:  # transformer blocks of the spatial transformer at prefix
        prefix += "transformer_blocks."
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    mult, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (n + 1)
        mult.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // base)
        depths.append(blocks(f"input_blocks.{first}.1."))
        if depths[-1]:
            attention.append(level)
    proj = state.get("middle_block.1.proj_in.weight")
    linear = proj is not None and proj.ndim == 2
    config = {
        "in_channels": conv_in.shape[1],
        "out_channels": state["out.2.weight"].shape[0],
        "model_channels": base,
        "channel_mult": mult,
        "num_res_blocks": n,
        "attention_levels": attention,
        "num_heads": fam["num_heads"],
        "num_head_channels": fam["num_head_channels"],
        **_compact_depth(depths, attention, blocks("middle_block.1.")),
        "context_dim": context,
        "use_linear_in_transformer": linear,
        "norm_groups": 32,
    }
    if adm is not None:
        config["adm_in_channels"] = adm
    return family, config


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


def unet_diffusers_config(
    config: dict[str, Any], sample_size: int = 64, size_embed_dim: int = SIZE_EMBED_DIM
) -> dict[str, Any]:
    """``UNet2DConditionModel(**unet_diffusers_config(unet.config))`` has our U-Net's layout;
    a vector condition becomes SDXL's ``text_time`` embedding with ``size_embed_dim``-wide
    Fourier features of each size number (SDXL: 256)."""
    channels = [config["model_channels"] * m for m in config["channel_mult"]]
    levels = range(len(channels))
    attn = set(config["attention_levels"])
    if config["num_heads"] != -1:
        heads: int | list[int] = config["num_heads"]
    else:
        heads = [c // config["num_head_channels"] for c in channels]
    depth = config["transformer_depth"]
    middle = config.get("transformer_depth_middle")
    if not isinstance(depth, int) or middle is not None:
        per_level = [depth] * len(channels) if isinstance(depth, int) else list(depth)
        middle = per_level[-1] if middle is None else middle
        # diffusers' middle block takes the last level's depth: only a level without attention
        # can lend it its number
        if len(channels) - 1 in attn and per_level[-1] != middle:
            raise ValueError(
                f"diffusers cannot hold a middle transformer depth ({middle}) apart from the "
                f"last level's ({per_level[-1]})"
            )
        depth = [d if i in attn else 1 for i, d in enumerate(per_level)]
        depth[-1] = middle
    out = {
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
        "transformer_layers_per_block": depth,
        "norm_num_groups": config["norm_groups"],
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if config.get("adm_in_channels") is not None:
        out |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": size_embed_dim,
            "projection_class_embeddings_input_dim": config["adm_in_channels"],
        }
    return out


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
