"""The stage-2 optimizer: AdamW, or bitsandbytes' 8-bit AdamW (``model.optimizer.eight_bit=true``),
whose two moment buffers take a quarter of the memory (SD 1.5's U-Net: 6.9 GB -> 1.7 GB), what
lets a full fine-tune fit a 24 GB card. 8-bit needs CUDA and ``pip install bitsandbytes``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sd_lightning.core.errors import InputError


def adamw(
    params: Iterable[torch.nn.Parameter],
    eight_bit: bool = False,
    fused: bool | None = None,
    **kwargs,
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(params, fused=..., **kwargs)``, or with ``eight_bit``
    ``bitsandbytes.optim.AdamW8bit(params, **kwargs)``."""
    params = list(params)
    if not eight_bit:
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    if not all(p.device.type == "cuda" for p in params):
        raise InputError(
            "model.optimizer.eight_bit=true needs the parameters on a CUDA GPU (bitsandbytes' "
            "8-bit AdamW); on this machine use model.optimizer.eight_bit=false"
        )
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise InputError(
            "model.optimizer.eight_bit=true needs bitsandbytes: pip install bitsandbytes "
            "(or model.optimizer.eight_bit=false)"
        ) from e
    return bnb.optim.AdamW8bit(params, **kwargs)
