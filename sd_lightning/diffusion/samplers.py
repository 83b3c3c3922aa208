"""Samplers as plain functions with one signature (k-diffusion's style, in discrete VP time):

    sample_xxx(model, x, ts, abar, extra_args=None, callback=None, generator=None) -> x_0

``model(x, t, **extra_args) -> (x0, eps)`` (see ``prediction.Denoiser``); ``ts`` are ``n``
descending timesteps, ``abar`` the ``n + 1`` alphas_cumprod at them plus the end point
(``schedules.sampling_schedule``); ``callback({"i", "t", "x", "x0"})`` sees every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddim_step(x, x0, eps, abar_t, abar_prev, eta: float = 0.0, noise=None):
    """One DDIM update (Song et al. 2021, eq. 12). ``eta=1`` is the DDPM posterior."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = abar_prev.sqrt() * x0 + direction
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def sample_ddim(
    model,
    x,
    ts,
    abar,
    extra_args=None,
    callback: Callable | None = None,
    generator=None,
    eta: float = 0.0,
):
    """DDIM (Song, Meng & Ermon 2021, arXiv 2010.02502); deterministic with ``eta=0``."""
    extra_args = extra_args or {}
    for i, t in enumerate(ts):
        x0, eps = model(x, t, **extra_args)
        noise = _randn(x, generator) if eta > 0 and i < len(ts) - 1 else None
        x = ddim_step(x, x0, eps, abar[i], abar[i + 1], eta, noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_ddpm(
    model, x, ts, abar, extra_args=None, callback: Callable | None = None, generator=None
):
    """Ancestral DDPM sampling (Ho et al. 2020, arXiv 2006.11239): the posterior
    q(x_prev | x_t, x0) at every step, for any subset of timesteps."""
    return sample_ddim(model, x, ts, abar, extra_args, callback, generator, eta=1.0)


@torch.no_grad()
def sample_dpmpp_2m(
    model, x, ts, abar, extra_args=None, callback: Callable | None = None, generator=None
):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): second-order multistep in the
    data-prediction form; first order on the first step, and on the last one when there are
    fewer than 15 steps or sampling ends at clean data (abar 1), as diffusers does."""
    extra_args = extra_args or {}
    a, s = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(a) - torch.log(s)  # half log-SNR; -inf at zero terminal SNR
    x0_prev, h_prev = None, None
    n = len(ts)
    for i, t in enumerate(ts):
        x0, _ = model(x, t, **extra_args)
        h = lam[i + 1] - lam[i]
        d = x0
        last_low = i == n - 1 and (n < 15 or bool(abar[-1] >= 1))
        if x0_prev is not None and not last_low and torch.isfinite(h_prev) and torch.isfinite(h):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x_next = (s_next / s) x + (a_next - a s_next / s) d, i.e. -a_next (e^{-h} - 1) d
        x = (s[i + 1] / s[i]) * x + (a[i + 1] - a[i] * s[i + 1] / s[i]) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_euler(
    model, x, ts, abar, extra_args=None, callback: Callable | None = None, generator=None
):
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, arXiv
    2206.00364, Algorithm 1 without churn; k-diffusion's ``sample_euler``, diffusers'
    ``EulerDiscreteScheduler``): ``x/a + (sigma_next - sigma) * eps`` with ``sigma =
    sqrt((1 - abar) / abar)``, written back in VP terms (``a = sqrt(abar)``). It is DDIM's
    update; what sets it apart is where it ends: at clean data (sigma 0), by default
    (:data:`FINAL`)."""
    extra_args = extra_args or {}
    for i, t in enumerate(ts):
        x0, eps = model(x, t, **extra_args)
        x = abar[i + 1].sqrt() * x0 + (1 - abar[i + 1]).sqrt() * eps
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


SAMPLERS = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
}
# where each sampler ends by default: "first" (alphas_cumprod[0], SD's DDIM scheduler config),
# "one" (clean data: diffusers' Euler, final_sigmas_type="zero")
FINAL = {"ddim": "first", "ddpm": "first", "dpmpp_2m": "first", "euler": "one"}
