"""OmegaConf resolvers used by conf/ (registered on import of ``sd_lightning``)."""

from __future__ import annotations

from omegaconf import OmegaConf


def auto_precision() -> str:
    """``bf16-mixed`` where the GPU supports bfloat16 (A100, H100), else full fp32."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sd.precision"):
        OmegaConf.register_new_resolver("sd.precision", auto_precision)
