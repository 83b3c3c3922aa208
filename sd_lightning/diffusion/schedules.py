"""Noise schedules (pure functions of their arguments) and sampling timestep grids.

Betas follow diffusers' definitions exactly, so that ``alphas_cumprod`` match its
``DDPMScheduler`` to float precision (tested): SD's ``scaled_linear``, ``linear``, the
``squaredcos_cap_v2`` cosine of Nichol & Dhariwal, and Lin et al.'s zero-terminal-SNR rescaling.
"""

from __future__ import annotations

import math

import torch

from sd_lightning.core.errors import InputError


def scaled_linear_betas(
    num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's schedule: betas linear in sqrt space."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2


def linear_betas(
    num_steps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
) -> torch.Tensor:
    """Ho et al.'s DDPM schedule."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers' ``squaredcos_cap_v2``)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891, Algorithm 1): shift and scale sqrt(alphas_cumprod) so the
    last step has zero SNR (pure noise) and the first keeps its value. Use with v-prediction."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """alphas_cumprod of a named schedule (SD: scaled_linear 0.00085..0.012 over 1000 steps)."""
    if beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule == "cosine":
        betas = cosine_betas(num_timesteps)
    else:
        raise InputError(
            f"model.schedule.beta_schedule must be scaled_linear, linear or cosine, "
            f"got {beta_schedule!r}"
        )
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod(betas.double()).float()


def sampling_timesteps(
    num_train_steps: int, steps: int, spacing: str = "leading", offset: int = 1
) -> torch.Tensor:
    """Descending timesteps for a ``steps``-step sampler, as diffusers spaces them.

    ``leading`` (SD 1.x/2.x defaults, with ``offset=1``), ``trailing`` (includes the last
    training step: needed with zero terminal SNR), ``linspace``.
    """
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    if spacing == "leading":
        ts = torch.arange(0, steps) * (num_train_steps // steps) + offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(num_train_steps, 0, -num_train_steps / steps)) - 1
        ts = ts.flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train_steps - 1, steps).round()
    else:
        raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    return ts.long().clamp(0, num_train_steps - 1).flip(0)


def sampling_schedule(
    abar: torch.Tensor, steps: int, spacing: str = "leading", offset: int = 1, final: str = "first"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ts, abar_steps)``: ``steps`` descending timesteps and ``steps + 1`` alphas_cumprod, the
    last being where sampling ends: ``final="one"`` (clean data, alpha_cumprod 1) or ``"first"``
    (alphas_cumprod[0], diffusers' ``set_alpha_to_one=False`` as in SD's scheduler config)."""
    ts = sampling_timesteps(len(abar), steps, spacing, offset)
    end = torch.ones(1, dtype=abar.dtype) if final == "one" else abar[:1]
    return ts, torch.cat([abar[ts], end])
