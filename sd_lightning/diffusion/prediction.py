"""What the network predicts (epsilon or v) and the conversions samplers need."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar) x0 + sqrt(1 - abar) noise (``abar_t`` broadcast per sample)."""
    abar_t = abar_t.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho's velocity: sqrt(abar) noise - sqrt(1 - abar) x0."""
    abar_t = abar_t.reshape(-1, *([1] * (x0.ndim - 1)))
    return abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x0


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction: str):
    """Network output -> (x0, eps). v-prediction stays defined at zero terminal SNR (abar = 0)."""
    a = abar_t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction == "epsilon":
        eps = output
        x0 = (x_t - s1a * eps) / sa
    elif prediction == "v_prediction":
        x0 = sa * x_t - s1a * output
        eps = s1a * x_t + sa * output
    else:
        raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")
    return x0, eps


class Denoiser(nn.Module):
    """Wraps a network ``net(x_t, t, **cond) -> output`` into the samplers' model:
    ``denoiser(x_t, t, **cond) -> (x0, eps)``."""

    def __init__(
        self, net: Callable[..., torch.Tensor], abar: torch.Tensor, prediction: str = "epsilon"
    ):
        super().__init__()
        self.net, self.prediction = net, prediction
        self.register_buffer("abar", abar.clone(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return to_x0_eps(self.net(x, t, **cond), x, self.abar[t], self.prediction)
