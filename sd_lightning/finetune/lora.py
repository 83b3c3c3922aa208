"""LoRA on the U-Net (Hu et al. 2021): low-rank adapters beside chosen projections, injected with
peft's ``inject_adapter_in_model`` into our plain-PyTorch U-Net, the base weights frozen.

What it targets (``targets``): ``attention`` (each transformer block's q, k, v and output
projections, as kohya's and diffusers' trainers do by default), ``attention_ff`` (plus the
GEGLU feed-forward and the transformers' in/out projections), or ``all`` (plus every ResNet
convolution: LoCon). Rank and alpha as in every LoRA file: the update is ``alpha / rank * B A``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", "op", "conv")
TARGETS = {
    "attention": ATTENTION,
    "attention_ff": ATTENTION + FEED_FORWARD,
    "all": ATTENTION + FEED_FORWARD + RESNET,
}


class LoRA:
    """``finetune=lora``: what :class:`LatentDiffusionSystem` trains instead of the whole U-Net.

    Args:
        rank: the adapters' rank (4 to 128; 16 is common for SD 1.5).
        alpha: scales the update by ``alpha / rank`` (``null``: the rank, a scale of 1).
        targets: ``attention``, ``attention_ff`` or ``all`` (see the module).
        dropout: dropout on the adapters' input.
        text_encoder: adapters on the text encoder too (attention and MLP of every block that
            runs), exported under kohya's ``lora_te_`` and diffusers' ``text_encoder.`` names.
    """

    partial = True  # checkpoints hold the adapters, not the base weights
    readers = {  # the exported files, and the tools each is for
        "lora": "kohya's names: AUTOMATIC1111, ComfyUI, kohya's scripts, diffusers",
        "pytorch_lora_weights": "diffusers' names: load_lora_weights, ComfyUI",
    }

    def __init__(
        self,
        rank: int = 16,
        alpha: float | None = None,
        targets: str = "attention",
        dropout: float = 0.0,
        text_encoder: bool = False,
    ):
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"finetune.rank={rank!r}: give a whole number >= 1 (e.g. 16)")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise InputError(
                f"finetune.alpha={alpha!r}: give a positive number (the update is alpha / rank "
                "* B A: 0 trains adapters that do nothing), or null for the rank"
            )
        if not 0 <= float(dropout) < 1:
            raise InputError(f"finetune.dropout={dropout!r}: give a number in [0, 1)")
        if targets not in TARGETS:
            raise InputError(
                f"finetune.targets={targets!r}: choose attention, attention_ff or all (LoCon)"
            )
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.targets, self.dropout = targets, float(dropout)
        self.text_encoder = bool(text_encoder)
        if self.text_encoder:  # its adapters live outside the sharded U-Net
            self.unshardable = (
                "LoRA on the text encoder (finetune.text_encoder=true) is not sharded: use "
                "trainer=ddp, or finetune.text_encoder=false with trainer=fsdp"
            )

    def module_names(self, unet: nn.Module) -> list[str]:
        """The names of the Linear/Conv2d modules of ``unet`` that get an adapter."""
        suffixes = TARGETS[self.targets]
        return [
            name
            for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            and any(name == s or name.endswith("." + s) for s in suffixes)
        ]

    def apply(self, unet: nn.Module) -> nn.Module:
        """Inject the adapters (B zero: the model starts as the base); only they train."""
        from peft import LoraConfig, inject_adapter_in_model

        names = self.module_names(unet)
        if not names:
            raise InputError(f"finetune.targets={self.targets!r} matches no layer of the U-Net")
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=names,
            init_lora_weights=True,
        )
        unet.requires_grad_(False)
        unet = inject_adapter_in_model(config, unet)
        trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        total = sum(p.numel() for p in unet.parameters())
        log.info(
            "finetune: LoRA rank %d, alpha %g on %d layers (%s): %s trainable parameters of %s",
            self.rank,
            self.alpha,
            len(names),
            self.targets,
            f"{trained:,}",
            f"{total:,}",
        )
        return unet

    def adapt_text(self, text_encoder: nn.Module) -> nn.Module | None:
        """With ``text_encoder``: adapters on the text tower too (:mod:`.text_lora`); returns
        the tower, which the system then holds (its adapters train, its weights stay frozen)."""
        if not self.text_encoder:
            return None
        from sd_lightning.finetune.text_lora import adapt_text_encoder

        return adapt_text_encoder(text_encoder, self.rank, self.alpha, self.dropout)

    def files(self, system: nn.Module, net: nn.Module, state: dict) -> dict[str, Any]:
        """The export: kohya's and diffusers' LoRA files of the adapters in ``state`` (and the
        text encoder's, when they train)."""
        from sd_lightning.finetune.lora_files import lora_files

        tower = getattr(system, "text_tower", None)
        towers = list(tower) if isinstance(tower, nn.ModuleList) else [tower] if tower else []
        texts = [adapter_state(t.state_dict()) for t in towers]  # SDXL: both encoders'
        return lora_files(
            adapter_state(state),
            net,
            self.rank,
            self.alpha,
            texts[0] if texts else None,
            prediction=system.prediction,
            image_size=system._image_size(),
            text_2=texts[1] if len(texts) > 1 else None,
        )


def adapter_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: (A, B)}``-style flat dict ``<module>.lora_A`` / ``<module>.lora_B`` of the
    injected adapters (peft's ``default`` adapter), from a full (gathered) state dict."""
    out = {}
    for key, value in unet.items() if isinstance(unet, dict) else unet.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.default.weight"
            if key.endswith(marker):
                out[f"{key[: -len(marker)]}.{part}"] = value
    return out


@torch.no_grad()
def _fold(layer: nn.Module) -> nn.Module:
    """``scaling * B A`` added into the base layer's weight (a Linear's or a Conv2d's); returns
    the base layer."""
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    weight = base.weight
    delta = (b.flatten(1).float() @ a.flatten(1).float()) * layer.scaling["default"]
    weight.add_(delta.reshape(weight.shape).to(weight))
    return base


def merge_adapters(net: nn.Module) -> nn.Module:
    """``net`` (the U-Net, or the text tower) with its adapters added into the weights and removed
    (peft's layers replaced by their base layers): the plain network, for sampling and export."""
    from peft.tuners.lora import LoraLayer

    adapted = [(n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer)]  # a list:
    # the loop replaces modules
    for name, module in adapted:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, _fold(module))
    return net
