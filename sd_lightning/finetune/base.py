"""The base weights a partial fine-tune (LoRA) trains on top of: its checkpoints hold only the
trained parameters and a reference to the base (path and SHA-256), checked when they are read
again, so an adapter is never silently applied to other weights."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.core.fingerprint import cached_fingerprint, fingerprint  # noqa: F401

log = logging.getLogger(__name__)


def base_reference(path: str) -> dict[str, Any]:
    return {"path": os.path.abspath(path), "sha256": cached_fingerprint(path)}


def check_base(
    saved: dict[str, Any] | None,
    current: dict[str, Any] | None,
    where: str,
    option: str = "pretrained",
) -> None:
    """A partial checkpoint's base must be the weights it is loaded onto; the error names the
    option that gives them (``pretrained=`` when resuming, ``base=`` when sampling)."""
    if not saved or not current:
        return
    if saved["sha256"] != current["sha256"]:
        raise InputError(
            f"{where} holds adapters trained on {saved['path']} (sha256 {saved['sha256'][:12]}), "
            f"but the base weights now are {current['path']} (sha256 "
            f"{current['sha256'][:12]}): give {option}= the weights it was trained on"
        )


def rebased(config: Any, old: str, new: str) -> Any:
    """``config`` (plain containers) with every path to the base ``old`` (its VAE, its text
    encoder, a part inside its folder) pointing to ``new`` instead."""
    if isinstance(config, dict):
        return {k: rebased(v, old, new) for k, v in config.items()}
    if isinstance(config, list):
        return [rebased(v, old, new) for v in config]
    if isinstance(config, str) and (
        config == old or config.startswith(old.rstrip(os.sep) + os.sep)
    ):
        return new + config[len(old) :]
    return config


def trained_state(
    system: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (the system's) that a partial checkpoint keeps: the trainable
    parameters, their EMA copies, the EMA's count and the latent scale."""
    trained = {n for n, p in system.named_parameters() if p.requires_grad}
    ema = {"ema.net." + n[len("unet.") :] for n in trained if n.startswith("unet.")}
    keep = trained | ema | {"ema.num_updates", "latent_scale"}
    return {k: v for k, v in state.items() if k in keep}
