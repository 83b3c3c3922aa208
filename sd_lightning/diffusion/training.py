"""Training-side pure functions: the denoising loss, its weights and noise variants."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sd_lightning.diffusion.conditions import Conditions
from sd_lightning.diffusion.prediction import add_noise, v_target


def snr(abar_t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar / (1 - abar)."""
    return abar_t / (1 - abar_t)


def min_snr_weight(abar_t: torch.Tensor, gamma: float, prediction: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, arXiv 2303.09556) for an MSE on the prediction
    target: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    s = snr(abar_t)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if prediction == "epsilon":
        return clipped / s
    if prediction == "v_prediction":
        return clipped / (s + 1)
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")


def offset_noise(
    shape: torch.Size,
    strength: float,
    generator: torch.Generator | None = None,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """Gaussian noise plus ``strength`` x a per-sample, per-channel constant (Guttenberg 2023):
    lets the model change an image's overall brightness."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if strength > 0:
        noise = noise + strength * torch.randn(
            (shape[0], shape[1], *([1] * (len(shape) - 2))),
            generator=generator,
            device=device,
            dtype=dtype,
        )
    return noise


def denoising_loss(
    net: Callable,
    z: torch.Tensor,
    conditions: Conditions,
    t: torch.Tensor,
    noise: torch.Tensor,
    abar: torch.Tensor,
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean per-sample MSE of ``net``'s prediction of the noise (or v) added to ``z`` at
    steps ``t`` (``abar``: alphas_cumprod), min-SNR-weighted if asked, each sample's times
    ``weight`` where given (DreamBooth's prior images: ``prior_loss_weight``)."""
    abar_t = abar[t]
    z_t = add_noise(z, noise, abar_t)
    target = noise if prediction == "epsilon" else v_target(z, noise, abar_t)
    out = net(z_t, t, **conditions.kwargs())
    per_sample = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(abar_t, min_snr_gamma, prediction)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()
