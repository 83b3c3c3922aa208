"""The U-Net's blocks, plain PyTorch, in CompVis/Stability's names (``openaimodel.py``,
``attention.py``): the timestep embedding, ResNet blocks, attention and spatial transformers,
and ``Stack``, the sequence that hands each block what it takes. Normalisations keep the
activations' dtype under autocast (statistics in float32)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd_lightning.models.layers import Upsample  # noqa: F401 - the VAE's: nearest x2, 3x3 conv


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
