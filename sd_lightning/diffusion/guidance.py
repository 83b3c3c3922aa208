"""Text-to-image generation: classifier-free guidance around the U-Net, a sampler, the VAE decoder.

Plain PyTorch: the stage-2 system calls it for validation grids, ``stage=sample`` for images.
Image ``i`` starts from noise drawn with ``seeds[i]`` alone, so it does not depend on which other
prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sd_lightning.diffusion.conditions import Conditions, as_conditions
from sd_lightning.diffusion.prediction import Denoiser
from sd_lightning.diffusion.samplers import FINAL, SAMPLERS
from sd_lightning.diffusion.schedules import sampling_schedule


class GuidedNet(torch.nn.Module):
    """``net(x, t, context[, y])`` with classifier-free guidance: one batched pass over the
    conditional and unconditional conditions, ``uncond + scale * (cond - uncond)`` on the raw
    output (linear, so the same on epsilon, v or x0), in float32 whatever the network's dtype."""

    def __init__(self, net: Callable, uncond: Conditions, scale: float):
        super().__init__()
        self.net, self.uncond, self.scale = net, as_conditions(uncond), scale

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        cond = Conditions(context, y)
        if self.scale == 1.0:
            return self.net(x, t, **cond.kwargs())
        both = Conditions.cat([cond, self.uncond])
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), **both.kwargs())
        cond_out, uncond = out.float().chunk(2)  # combined in float32: bf16 would round the
        return uncond + self.scale * (cond_out - uncond)  # difference a scale of 7.5 amplifies


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """One latent of ``shape`` per seed, each from its own CPU generator (device-independent)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(
    *,
    unet: Callable,
    decode: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor | Conditions],
    prompts: Sequence[str],
    seeds: Sequence[int],
    abar: torch.Tensor,
    prediction: str,
    latent_shape: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | Sequence[str] = "",
    spacing: str = "leading",
    final: str | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    callback: Callable | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], ``(len(prompts), 3, H, W)``, on the CPU.

    ``negative_prompt``: one for all prompts, or one per prompt. ``decode(z)`` maps (unscaled) sampling-space latents to images: the caller divides by the
    latent scale there. ``unet(x, t, context[, y])`` is the raw network (EMA weights for
    sampling); ``encode_text(prompts)`` gives its token states or whole :class:`Conditions`.
    ``callback``: the sampler's, called after every step (a stop request raises from it).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    final = final or FINAL[sampler]  # where the sampler ends (Euler: clean data)
    ts, abar_steps = sampling_schedule(abar.cpu(), steps, spacing, final=final)
    ts, abar_steps = ts.to(device), abar_steps.to(device)
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        conditions = as_conditions(encode_text(chunk))
        negatives = (
            [negative_prompt] * len(chunk)
            if isinstance(negative_prompt, str)
            else list(negative_prompt[i : i + batch_size])
        )
        uncond = as_conditions(encode_text(negatives))
        net = GuidedNet(unet, uncond, guidance)
        denoiser = Denoiser(net, abar.to(device), prediction)
        x = initial_noise(chunk_seeds, latent_shape, device, torch.float32)
        generator = torch.Generator(device=device).manual_seed(int(chunk_seeds[0]))
        z = SAMPLERS[sampler](
            denoiser,
            x,
            ts,
            abar_steps,
            extra_args=conditions.kwargs(),
            callback=callback,
            generator=generator,
        )
        images.append(decode(z).float().clamp(-1, 1).cpu())
    return torch.cat(images)
