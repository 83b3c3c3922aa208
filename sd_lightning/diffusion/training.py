"""Training-side pure functions: loss weights and noise variants for the diffusion objective."""

from __future__ import annotations

import torch


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
