"""The Stable Diffusion conditional U-Net (``UNetModel``), plain PyTorch.

Layout and parameter names follow CompVis/Stability's ``ldm.modules.diffusionmodules.openaimodel``
(``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``time_embed``, ``out``), which is what
the original single-file checkpoints store under ``model.diffusion_model.``: loading them is an
identity map, and ``models.keymap`` turns the names into diffusers' ``UNet2DConditionModel`` ones.
Size presets are Hydra configs (``conf/unet/{tiny,sd15,sd2}.yaml``).

Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPUs); ``gradient_checkpointing=True`` recomputes each ResNet block and transformer in backward.
A vector condition (``adm_in_channels``: class labels, SDXL's pooled text and sizes) is added to
the time embedding through ``label_emb``, in SGM's names. The blocks: :mod:`.unet_blocks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sd_lightning.models.unet_blocks import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    Stack,
    Upsample,
    _KeepsDtype,
    _norm,
    _zero,
    timestep_embedding,
)


class UNetModel(nn.Module):
    """``unet(x_t, t, context, y=None) -> prediction`` (epsilon or v, same shape as ``x_t``).

    Args:
        in_channels / out_channels: latent channels (4 for SD).
        model_channels: width of the first level (320 for SD).
        channel_mult: width multiplier per level; each level but the last halves the resolution.
        num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
        attention_levels: levels (0-based) with a spatial transformer after each ResNet block
            (SD: ``[0, 1, 2]``; CompVis writes this as ``attention_resolutions: [4, 2, 1]``).
        num_heads / num_head_channels: heads per transformer (SD 1.x: 8 heads) or channels per
            head (SD 2.x: 64); exactly one of them is set (the other is -1).
        transformer_depth: transformer blocks per spatial transformer: one number for every
            level, or one per level (SDXL: ``[0, 2, 10]``; a level without attention takes 0).
        transformer_depth_middle: the middle block's (``None``: the last level's, as SGM).
        context_dim: width of the text encoder's token states (768 SD 1.x, 1024 SD 2.x).
        use_linear_in_transformer: linear instead of 1x1-conv projections (SD 2.x).
        norm_groups: GroupNorm groups everywhere (32 in SD; smaller for tiny models).
        adm_in_channels: width of the vector condition ``y`` added to the time embedding
            through ``label_emb`` (SGM's ``adm_in_channels``, diffusers' ``add_embedding``;
            SDXL: 2816); ``None``: no vector condition (SD 1.x and 2.x).
        gradient_checkpointing: recompute blocks in backward (saves activation memory).
        fp32_norms: GroupNorm/LayerNorm outputs in float32 under autocast (autocast's default);
            ``False`` keeps the activations' dtype (statistics in float32 either way).
        channels_last: convolution weights and activations in NHWC (``torch.channels_last``),
            the layout the GPU's convolution kernels prefer.

    ``gradient_checkpointing``, ``fp32_norms`` and ``channels_last`` change speed and memory,
    not the function: they are not part of ``config`` (what exports and checkpoints record).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (0, 1, 2),
        num_heads: int = 8,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None,
        context_dim: int = 768,
        use_linear_in_transformer: bool = False,
        norm_groups: int = 32,
        adm_in_channels: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        fp32_norms: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of unet.num_heads (SD 1.x: 8) and unet.num_head_channels "
                f"(SD 2.x: 64), the other to -1; got num_heads={num_heads}, "
                f"num_head_channels={num_head_channels}"
            )
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(
                f"unet.attention_levels {list(attention_levels)} name levels outside "
                f"0..{len(channel_mult) - 1} (one level per entry of channel_mult)"
            )
        depths, middle = _depths(transformer_depth, transformer_depth_middle, channel_mult)
        shallow = [lvl for lvl in attention_levels if depths[lvl] < 1]
        if shallow:
            raise ValueError(
                f"unet.transformer_depth={_plain(transformer_depth)} gives attention level(s) "
                f"{shallow} no transformer block: give those levels 1 or more, or leave them "
                "out of unet.attention_levels"
            )
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": model_channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_levels": list(attention_levels),
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "transformer_depth": _plain(transformer_depth),
            "context_dim": context_dim,
            "use_linear_in_transformer": use_linear_in_transformer,
            "norm_groups": norm_groups,
        }
        # recorded only where set: SD 1/2 configs unchanged
        if transformer_depth_middle is not None:
            self.config["transformer_depth_middle"] = transformer_depth_middle
        if adm_in_channels is not None:
            self.config["adm_in_channels"] = adm_in_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.model_channels = model_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * 4
        groups = norm_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            dim_head = ch // heads
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth,
                context_dim,
                groups,
                use_linear_in_transformer,
                dropout,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.adm_in_channels = adm_in_channels
        if adm_in_channels is not None:  # SGM's "sequential" label embedding: label_emb.0.{0,2}
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )
        self.input_blocks = nn.ModuleList(
            [Stack([nn.Conv2d(in_channels, model_channels, 3, padding=1)])]
        )
        skip_channels, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [
                    ResBlock(ch, emb_dim, mult * model_channels, dropout, groups)
                ]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(Stack(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Stack([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Stack(
            [
                ResBlock(ch, emb_dim, ch, dropout, groups),
                transformer(ch, middle),
                ResBlock(ch, emb_dim, ch, dropout, groups),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [ResBlock(ch + skip, emb_dim, mult * model_channels, dropout, groups)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stack(layers))

        self.out = nn.Sequential(
            _norm(ch, groups),
            nn.SiLU(),
            _zero(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )
        self.set_fp32_norms(fp32_norms)
        self.set_channels_last(channels_last)

    def set_fp32_norms(self, enabled: bool) -> None:
        """Normalisation outputs in float32 under autocast (``True``) or in the activations'
        dtype (``False``, the default)."""
        for module in self.modules():
            if isinstance(module, _KeepsDtype):
                module.fp32 = bool(enabled)

    def set_channels_last(self, enabled: bool) -> None:
        """Store 4-d weights NHWC and feed activations NHWC (or back to NCHW)."""
        self.channels_last = bool(enabled)
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.to(memory_format=fmt)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        h, emb, context, skips = self._down(x, t, context, y)
        ckpt = self.gradient_checkpointing and self.training
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)
        return self.out(h)

    def middle_features(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The middle block's output, the up path not run (REPA-E's VAE step aligns only this)."""
        return self._down(x, t, context, y)[0]

    def _down(self, x, t, context, y):
        """The down path and the middle block: ``(h, emb, context, skips)``."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} is not divisible by the U-Net's "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if (y is None) != (self.adm_in_channels is None):
            raise ValueError(
                f"this U-Net takes {'a' if self.adm_in_channels else 'no'} vector condition y "
                f"(adm_in_channels={self.adm_in_channels}), got {'none' if y is None else 'one'}"
            )
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        context = context.to(x.dtype)
        ckpt = self.gradient_checkpointing and self.training
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, ckpt)
        return h, emb, context, skips


def _plain(depth: int | Sequence[int]) -> int | list[int]:
    return depth if isinstance(depth, int) else [int(d) for d in depth]


def _depths(
    depth: int | Sequence[int], middle: int | None, channel_mult: Sequence[int]
) -> tuple[list[int], int]:
    """Transformer blocks per level and in the middle block, checked."""
    levels = len(channel_mult)
    depths = [depth] * levels if isinstance(depth, int) else [int(d) for d in depth]
    if len(depths) != levels or min(depths) < 0:
        raise ValueError(
            f"unet.transformer_depth={_plain(depth)}: give one number, or one per level "
            f"({levels}, as channel_mult), none negative (SDXL: [0, 2, 10])"
        )
    middle = depths[-1] if middle is None else int(middle)
    if middle < 1:
        raise ValueError(
            f"the middle block's transformer needs 1 or more blocks, got {middle}: set "
            "unet.transformer_depth_middle (it defaults to the last level's depth)"
        )
    return depths, middle
