"""The Stable Diffusion conditional U-Net (``UNetModel``), plain PyTorch.

Layout and parameter names follow CompVis/Stability's ``ldm.modules.diffusionmodules.openaimodel``
(``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``time_embed``, ``out``), which is what
the original single-file checkpoints store under ``model.diffusion_model.``: loading them is an
identity map, and ``models.keymap`` turns the names into diffusers' ``UNet2DConditionModel`` ones.
Size presets are Hydra configs (``conf/unet/{tiny,sd15,sd2}.yaml``).

Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPUs); ``gradient_checkpointing=True`` recomputes each ResNet block and transformer in backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd_lightning.models.layers import Upsample  # the VAE's: nearest x2, then a 3x3 conv


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (CompVis; diffusers' ``flip_sin_to_cos=True``)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _KeepsDtype:
    """A normalisation layer that returns the activations' dtype under autocast.

    CUDA autocast runs ``group_norm``/``layer_norm`` in float32 and hands the next layer a
    float32 copy of every normalised activation, which the following SiLU and convolution read
    and cast back: extra memory traffic in every ResNet block and transformer. Here the kernel
    reads bf16, keeps its statistics in float32 (CUDA and CPU kernels accumulate in float32 for
    half types) and writes bf16, which is what SD's own ``GroupNorm32`` hands on (it casts the
    float32 result back). Without autocast (float32 training, the CPU) it is the ``nn`` layer
    exactly. ``fp32=True`` restores autocast's behaviour (``unet.fp32_norms``)."""

    fp32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # (entering an autocast context costs 15 us a call)
        with torch.autocast(x.device.type, enabled=False):
            return self.normalize(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class GroupNorm(_KeepsDtype, nn.GroupNorm):
    def normalize(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, w, b, self.eps)


class LayerNorm(_KeepsDtype, nn.LayerNorm):
    def normalize(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _norm(channels: int, groups: int, eps: float = 1e-5) -> GroupNorm:
    if channels % groups:
        raise ValueError(
            f"unet.norm_groups={groups} does not divide a block's {channels} channels; choose "
            f"model_channels as a multiple of norm_groups (SD uses 32 groups, 320 channels)"
        )
    return GroupNorm(groups, channels, eps=eps)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected timestep embedding, then GroupNorm-SiLU-dropout-conv
    (zero-initialised), with a 1x1 skip when the width changes."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections; self-attention without ``context``."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in (1x1 conv, or linear as in SD 2), transformer blocks over the h*w
    tokens, project out (zero-initialised), residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear: bool,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = _norm(channels, groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout)
            for _ in range(depth)
        )
        self.proj_out = _zero(
            nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # (b, h*w, c)
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Stack(nn.Sequential):
    """CompVis's ``TimestepEmbedSequential``: passes the embedding to ResNet blocks and the context
    to transformers, optionally under activation checkpointing. (A ``Sequential``, not a
    ``ModuleList``: FSDP2's ``fully_shard`` in torch < 2.14 refuses every ``ModuleList``, forward
    or not; the children are named ``0``, ``1``... either way.)"""

    def __init__(self, layers: list[nn.Module]):
        super().__init__(*layers)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, use_checkpoint: bool
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                args = (x, emb)
            elif isinstance(layer, SpatialTransformer):
                args = (x, context)
            else:
                x = layer(x)
                continue
            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x


class UNetModel(nn.Module):
    """``unet(x_t, t, context) -> prediction`` (epsilon or v, same shape as ``x_t``).

    Args:
        in_channels / out_channels: latent channels (4 for SD).
        model_channels: width of the first level (320 for SD).
        channel_mult: width multiplier per level; each level but the last halves the resolution.
        num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
        attention_levels: levels (0-based) with a spatial transformer after each ResNet block
            (SD: ``[0, 1, 2]``; CompVis writes this as ``attention_resolutions: [4, 2, 1]``).
        num_heads / num_head_channels: heads per transformer (SD 1.x: 8 heads) or channels per
            head (SD 2.x: 64); exactly one of them is set (the other is -1).
        transformer_depth: transformer blocks per spatial transformer.
        context_dim: width of the text encoder's token states (768 SD 1.x, 1024 SD 2.x).
        use_linear_in_transformer: linear instead of 1x1-conv projections (SD 2.x).
        norm_groups: GroupNorm groups everywhere (32 in SD; smaller for tiny models).
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
        transformer_depth: int = 1,
        context_dim: int = 768,
        use_linear_in_transformer: bool = False,
        norm_groups: int = 32,
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
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": model_channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_levels": list(attention_levels),
            "num_heads": num_heads,
            "num_head_channels": num_head_channels,
            "transformer_depth": transformer_depth,
            "context_dim": context_dim,
            "use_linear_in_transformer": use_linear_in_transformer,
            "norm_groups": norm_groups,
        }
        self.gradient_checkpointing = gradient_checkpointing
        self.model_channels = model_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * 4
        groups = norm_groups

        def transformer(ch: int) -> SpatialTransformer:
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            dim_head = ch // heads
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                transformer_depth,
                context_dim,
                groups,
                use_linear_in_transformer,
                dropout,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
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
                    layers.append(transformer(ch))
                self.input_blocks.append(Stack(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Stack([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Stack(
            [
                ResBlock(ch, emb_dim, ch, dropout, groups),
                transformer(ch),
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
                    layers.append(transformer(ch))
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} is not divisible by the U-Net's "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        context = context.to(x.dtype)
        ckpt = self.gradient_checkpointing and self.training
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, ckpt)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)
        return self.out(h)
