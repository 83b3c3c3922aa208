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

from sd_lightning.errors import InputError

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
    """

    partial = True  # checkpoints hold the adapters, not the base weights

    def __init__(
        self, rank: int = 16, alpha: float | None = None, targets: str = "attention", dropout=0.0
    ):
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"finetune.rank={rank!r}: give a whole number >= 1 (e.g. 16)")
        if targets not in TARGETS:
            raise InputError(
                f"finetune.targets={targets!r}: choose attention, attention_ff or all (LoCon)"
            )
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.targets, self.dropout = targets, float(dropout)

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

    def files(self, system: nn.Module, net: nn.Module, state: dict) -> dict[str, Any]:
        """The export: kohya's and diffusers' LoRA files of the adapters in ``state``."""
        from sd_lightning.finetune.lora_files import lora_files

        return lora_files(adapter_state(state), net, self.rank, self.alpha)

    def describe(self) -> dict[str, Any]:
        return {"method": "lora", "rank": self.rank, "alpha": self.alpha, "targets": self.targets}


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


def merge_adapters(unet: nn.Module) -> nn.Module:
    """The U-Net with its adapters added into the weights and removed (peft's layers replaced by
    their base layers): the plain network, for sampling and export."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    return unet
