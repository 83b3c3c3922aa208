"""Schedules and samplers against diffusers (a test-only reference), and the prediction maths."""

from __future__ import annotations

import pytest
import torch

from sd_lightning.diffusion import schedules as S
from sd_lightning.diffusion.prediction import Denoiser, add_noise, to_x0_eps, v_target
from sd_lightning.diffusion.samplers import ddim_step, sample_ddim, sample_ddpm, sample_dpmpp_2m

diffusers = pytest.importorskip("diffusers")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: S.scaled_linear_betas(),
            dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        ),
        (lambda: S.linear_betas(), dict(beta_schedule="linear")),
        (lambda: S.cosine_betas(), dict(beta_schedule="squaredcos_cap_v2")),
        (
            lambda: S.rescale_zero_terminal_snr(S.scaled_linear_betas()),
            dict(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True,
            ),
        ),
    ],
)
def test_alphas_cumprod_match_diffusers(ours, theirs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs).alphas_cumprod
    torch.testing.assert_close(S.alphas_cumprod(ours()), ref, atol=1e-6, rtol=0)


def test_zero_terminal_snr_ends_in_pure_noise():
    abar = S.alphas_cumprod(S.rescale_zero_terminal_snr(S.scaled_linear_betas()))
    assert abar[-1] == 0 and torch.isclose(abar[0], S.alphas_cumprod(S.scaled_linear_betas())[0])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacing_matches_diffusers(spacing):
    ref = diffusers.DDIMScheduler(
        **SD, steps_offset=1 if spacing == "leading" else 0, timestep_spacing=spacing
    )
    ref.set_timesteps(20)
    ours = S.sampling_timesteps(1000, 20, spacing, offset=1 if spacing == "leading" else 0)
    assert ours.tolist() == ref.timesteps.tolist()


def toy_net(x, t):
    """A fixed, nonlinear stand-in for a trained network (output depends on x and t)."""
    t = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.sin(x) + t / 2000.0


def test_one_ddim_step_equals_diffusers():
    ref = diffusers.DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(50)
    abar = ref.alphas_cumprod
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, t_prev = ref.timesteps[10], ref.timesteps[11]
    out = toy_net(x, t.expand(2))
    expected = ref.step(out, t, x, eta=0.0).prev_sample
    x0, eps = to_x0_eps(out, x, abar[t].expand(2), "epsilon")
    torch.testing.assert_close(
        ddim_step(x, x0, eps, abar[t], abar[t_prev]), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_sampler_matches_diffusers_loop(prediction):
    ref = diffusers.DDIMScheduler(
        **SD, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction
    )
    ref.set_timesteps(25)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_net(expected, t.expand(2)), t, expected).prev_sample
    ts, abar = S.sampling_schedule(ref.alphas_cumprod, 25, "leading", offset=1, final="first")
    got = sample_ddim(Denoiser(toy_net, ref.alphas_cumprod, prediction), x, ts, abar)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ddpm_sampler_matches_diffusers_with_the_same_noise():
    ref = diffusers.DDPMScheduler(**SD)
    ref.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_net(expected, t.expand(2)), t, expected, generator=gen).prev_sample
    ts, abar = S.sampling_schedule(ref.alphas_cumprod, 10, "leading", offset=0, final="one")
    got = sample_ddpm(
        Denoiser(toy_net, ref.alphas_cumprod),
        x,
        ts,
        abar,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(toy_net(expected, t.expand(2)), t, expected).prev_sample
    ts = ref.timesteps
    abar = torch.cat([ref.alphas_cumprod[ts], torch.ones(1)])
    got = sample_dpmpp_2m(Denoiser(toy_net, ref.alphas_cumprod), x, ts, abar)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_v_prediction_round_trip():
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    abar = S.alphas_cumprod(S.rescale_zero_terminal_snr(S.scaled_linear_betas()))[
        torch.tensor([0, 500, 999])
    ]
    x_t = add_noise(x0, noise, abar)
    got_x0, got_eps = to_x0_eps(v_target(x0, noise, abar), x_t, abar, "v_prediction")
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)  # also at zero SNR (t=999)
    torch.testing.assert_close(got_eps, noise, atol=1e-5, rtol=1e-5)


def test_min_snr_weights():
    from sd_lightning.diffusion.training import min_snr_weight

    abar = torch.tensor([0.99, 0.5, 0.01])  # SNR 99, 1, 1/99
    eps = min_snr_weight(abar, gamma=5.0, prediction="epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 99, 1.0, 1.0]))
    v = min_snr_weight(abar, gamma=5.0, prediction="v_prediction")
    torch.testing.assert_close(v, torch.tensor([5 / 100, 0.5, (1 / 99) / (1 / 99 + 1)]))


def test_offset_noise_adds_a_per_channel_constant():
    from sd_lightning.diffusion.training import offset_noise

    plain = offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    shifted = offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(0))
    diff = shifted - plain
    assert diff.abs().sum() > 0
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over space
