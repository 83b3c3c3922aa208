"""Key tables between our parameter names and diffusers' for the U-Net and the VAE.

Our names are the original CompVis/Stability layout (what single files hold under
``model.diffusion_model.`` and ``first_stage_model.``), so a single file maps by its prefix alone
(``to_original`` / ``from_original``).
A diffusers folder names the same tensors differently; the tables here are built from the
network's config (levels, blocks per level, where attention is), so they cover SD 1.x, 2.x and any
other layout our networks take, and map both ways. Where the two store a tensor in different
shapes (the VAE's attention: 1x1 convolutions here, linear layers in diffusers), ``convert``
reshapes it.
"""

from __future__ import annotations

from typing import Any

import torch

ORIGINAL_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}


def to_original(state: dict[str, Any], part: str) -> dict[str, Any]:
    """Our state dict -> the keys of an original single-file checkpoint."""
    return {ORIGINAL_PREFIX[part] + k: v for k, v in state.items()}


def from_original(state: dict[str, Any], part: str) -> dict[str, Any]:
    """The ``part`` ("unet" or "vae") of an original single-file checkpoint, in our names."""
    prefix = ORIGINAL_PREFIX[part]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# inside a U-Net residual block: ours (original) -> diffusers
_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# inside a VAE residual block and its attention block
_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTN = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
# diffusers before 0.14 named the VAE's attention differently
_VAE_ATTN_OLD = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def unet_blocks(config: dict[str, Any]) -> list[tuple[str, str, tuple]]:
    """``(our prefix, diffusers' prefix, inner renames)`` for every block of a U-Net built from
    ``config`` (our ``UNetModel.config``). Attention blocks keep their inner names."""
    n, levels = config["num_res_blocks"], len(config["channel_mult"])
    attn = set(config["attention_levels"])
    out: list[tuple[str, str, tuple]] = [
        ("time_embed.0.", "time_embedding.linear_1.", ()),
        ("time_embed.2.", "time_embedding.linear_2.", ()),
        ("input_blocks.0.0.", "conv_in.", ()),
        ("out.0.", "conv_norm_out.", ()),
        ("out.2.", "conv_out.", ()),
        ("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", ()),
        ("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET),
    ]
    if config.get("adm_in_channels") is not None:  # SDXL's vector condition
        out += [
            ("label_emb.0.0.", "add_embedding.linear_1.", ()),
            ("label_emb.0.2.", "add_embedding.linear_2.", ()),
        ]
    index = 1
    for level in range(levels):
        for j in range(n):
            out.append(
                (f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.", _UNET_RESNET)
            )
            if level in attn:
                out.append((f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}.", ()))
            index += 1
        if level != levels - 1:
            out.append(
                (f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", ())
            )
            index += 1
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            out.append((f"output_blocks.{index}.0.", f"up_blocks.{up}.resnets.{j}.", _UNET_RESNET))
            if level in attn:
                out.append((f"output_blocks.{index}.1.", f"up_blocks.{up}.attentions.{j}.", ()))
            if level and j == n:
                k = 2 if level in attn else 1
                out.append(
                    (f"output_blocks.{index}.{k}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", ())
                )
            index += 1
    return out


def vae_blocks(config: dict[str, Any]) -> list[tuple[str, str, tuple]]:
    """The same for a VAE built from ``config`` (our ``AutoencoderKL.config``)."""
    levels, n = len(config["ch_mult"]), config["num_res_blocks"]
    out: list[tuple[str, str, tuple]] = [
        ("quant_conv.", "quant_conv.", ()),
        ("post_quant_conv.", "post_quant_conv.", ()),
    ]
    for part in ("encoder", "decoder"):
        out += [
            (f"{part}.conv_in.", f"{part}.conv_in.", ()),
            (f"{part}.conv_out.", f"{part}.conv_out.", ()),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", ()),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTN),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
        ]
    for level in range(levels):
        down = f"encoder.down_blocks.{level}."
        for j in range(n):
            out.append((f"encoder.down.{level}.block.{j}.", f"{down}resnets.{j}.", _VAE_RESNET))
        if level != levels - 1:
            out.append((f"encoder.down.{level}.downsample.", f"{down}downsamplers.0.", ()))
        up = f"decoder.up_blocks.{levels - 1 - level}."
        for j in range(n + 1):
            out.append((f"decoder.up.{level}.block.{j}.", f"{up}resnets.{j}.", _VAE_RESNET))
        if level != 0:
            out.append((f"decoder.up.{level}.upsample.", f"{up}upsamplers.0.", ()))
    return out


def _rename(key: str, blocks: list[tuple[str, str, tuple]], to_diffusers: bool) -> tuple:
    """``(new key, the block's inner renames)``, or ``(None, ())`` when no block covers it."""
    for ours, theirs, inner in blocks:
        src, dst = (ours, theirs) if to_diffusers else (theirs, ours)
        if key.startswith(src):
            rest = key[len(src) :]
            for a, b in inner:
                a, b = (a, b) if to_diffusers else (b, a)
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return dst + rest, inner
    return None, ()


def rename(key: str, blocks: list[tuple[str, str, tuple]], to_diffusers: bool) -> str | None:
    """One parameter or module name in the other layout (``None``: no block covers it)."""
    return _rename(key, blocks, to_diffusers)[0]


def convert(
    state: dict[str, torch.Tensor], blocks: list[tuple[str, str, tuple]], to_diffusers: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``state`` with ``blocks`` (ours -> diffusers, or back); returns the renamed dict and
    the keys no block covers. The VAE's attention projections change shape on the way: 1x1
    convolutions here, linear layers in diffusers."""
    out, unknown = {}, []
    for key, value in state.items():
        if not to_diffusers:
            for old, new in _VAE_ATTN_OLD.items():  # older diffusers VAE names
                key = key.replace(f"attentions.0.{old}", f"attentions.0.{new}")
        name, inner = _rename(key, blocks, to_diffusers)
        if name is None:
            unknown.append(key)
            continue
        if inner is _VAE_ATTN and name.endswith("weight") and "norm" not in name:
            value = (
                value.reshape(value.shape[:2])
                if to_diffusers
                else value.reshape(*value.shape[:2], 1, 1)
            )
        out[name] = value
    return out, unknown
