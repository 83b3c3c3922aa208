"""LoRA on the text encoder: adapters on each running block's attention (q, k, v, out) and MLP
(``c_fc``, ``c_proj``) of OpenCLIP's text tower, transformers' CLIP names on export
(``text_model.encoder.layers.<i>.self_attn.q_proj``, ``mlp.fc1``...).

OpenCLIP's blocks use ``nn.MultiheadAttention``, whose q/k/v projection is one fused parameter;
peft's adapter for it merges weights around each forward. Instead the attention is split into
four ``nn.Linear`` (:class:`SplitAttention`, the same function) that peft adapts as any layer,
one adapter per projection as kohya and diffusers name them; :func:`fuse_attention` puts the
fused module back after the adapters are merged (sampling, export).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, no dropout) as four Linear projections."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.dropout:
            raise ValueError("only self-attention without dropout can be split")
        d, self.heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        bias = mha.in_proj_bias is not None
        for i, name in enumerate(PROJECTIONS[:3]):
            layer = nn.Linear(d, d, bias=bias).to(mha.in_proj_weight)
            layer.weight.data.copy_(mha.in_proj_weight.data[i * d : (i + 1) * d])
            if bias:
                layer.bias.data.copy_(mha.in_proj_bias.data[i * d : (i + 1) * d])
            setattr(self, name, layer)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None).to(mha.out_proj.weight)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)  # (batch, tokens, width)
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def fused(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (after the adapters are merged)."""
        d = self.q_proj.in_features
        mha = nn.MultiheadAttention(
            d, self.heads, bias=self.q_proj.bias is not None, batch_first=self.batch_first
        ).to(self.q_proj.weight)
        with torch.no_grad():
            mha.in_proj_weight.copy_(
                torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            )
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(
                    torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
                )
            mha.out_proj.load_state_dict(self.out_proj.state_dict())
        return mha.requires_grad_(False)


def adapt_text_encoder(text_encoder: nn.Module, rank: int, alpha: float, dropout: float):
    """Adapters on every running block of ``text_encoder``'s tower; returns the tower (SDXL's
    two text encoders: both towers, as a ``ModuleList`` in order)."""
    if hasattr(text_encoder, "encoders"):
        return nn.ModuleList(_adapt(e, rank, alpha, dropout) for e in text_encoder.encoders)
    return _adapt(text_encoder, rank, alpha, dropout)


def _adapt(text_encoder: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    tower = getattr(text_encoder, "tower", None)
    if tower is None:
        raise InputError(
            f"finetune.text_encoder=true needs OpenCLIP/CLIP text encoders, not "
            f"{type(text_encoder).__name__}"
        )
    running = len(tower.transformer.resblocks)  # the pooled output runs the last block too
    blocks = tower.transformer.resblocks[
        : running if text_encoder.pooled else running - text_encoder.skip
    ]
    names = []
    for i, block in enumerate(blocks):
        block.attn = SplitAttention(block.attn)
        prefix = f"transformer.resblocks.{i}."
        names += [prefix + "attn." + p for p in PROJECTIONS]
        names += [prefix + "mlp.c_fc", prefix + "mlp.c_proj"]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    tower.requires_grad_(False)
    inject_adapter_in_model(config, tower)
    text_encoder.trains = True
    trained = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    log.info(
        "finetune: LoRA rank %d on the text encoder's %d blocks (attention and MLP): %s "
        "trainable parameters",
        rank,
        len(blocks),
        f"{trained:,}",
    )
    return tower


def fuse_attention(tower: nn.Module) -> None:
    """Every :class:`SplitAttention` of ``tower`` (or of each of SDXL's two) back to OpenCLIP's
    fused module (its adapters merged first)."""
    for one in tower if isinstance(tower, nn.ModuleList) else [tower]:
        for block in one.transformer.resblocks:
            if isinstance(block.attn, SplitAttention):
                block.attn = block.attn.fused()
