"""REPA-E's latent normalisation: a non-affine batch norm on the VAE's latents, in place of a fixed
scale (SD's 0.18215), so that the U-Net sees standardised latents while the VAE that makes them
changes (arXiv 2504.10483, section 3).

:class:`LatentNorm` computes what ``nn.BatchNorm2d(c, eps=1e-4, momentum=0.1, affine=False)`` computes
(batch statistics and a running average in training, the running ones in evaluation), with the
batch statistics summed over every rank of a ``torch.distributed`` group, as ``SyncBatchNorm``
does, but on any device (``SyncBatchNorm`` refuses the CPU, where the gloo tests run). Its
training mode is for detached latents (REPA-E's U-Net step): the statistics are constants to
autograd there; with gradients into the VAE (its step) it runs in evaluation mode, on the
running statistics.

:meth:`LatentNorm.denormalize` undoes it before decoding; :meth:`LatentNorm.mean_std` is what an
export records (diffusers' ``latents_mean``/``latents_std``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LatentNorm(nn.Module):
    """Standardise each latent channel by batch (training) or running (evaluation) statistics.

    Args:
        channels: the latent channels (SD: 4, SD 3/FLUX-style VAEs: 16).
        eps: added to the variance (REPA-E: 1e-4).
        momentum: of the running averages (REPA-E: 0.1, BatchNorm's default).
        sync: sum the batch statistics over all ranks when ``torch.distributed`` is initialised.
    """

    def __init__(self, channels: int, eps: float = 1e-4, momentum: float = 0.1, sync: bool = True):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"latent_norm.momentum must be in (0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"latent_norm.eps must be positive, got {eps}")
        self.channels, self.eps, self.momentum, self.sync = int(channels), eps, momentum, sync
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.channels:
            raise ValueError(f"latents have {z.shape[1]} channels, the norm {self.channels}")
        if not self.training:
            return self._standardise(z, self.running_mean, self.running_var)
        mean, var, count = self.batch_statistics(z)
        with torch.no_grad():
            unbiased = var * count / max(count - 1, 1)
            self.running_mean.lerp_(mean.to(self.running_mean), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var), self.momentum)
            self.num_batches_tracked += 1
        return self._standardise(z, mean, var)

    @torch.no_grad()
    def start_from(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running statistics set to ``z``'s (all ranks), as a first update with momentum 1;
        returns the batch mean and (biased) variance."""
        mean, var, count = self.batch_statistics(z)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var * count / max(count - 1, 1))
        return mean, var

    @torch.no_grad()
    def batch_statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and (biased) variance over the batch and the pixels of every rank,
        in float64 (sums of squares of a large batch lose digits in float32), and the count."""
        flat = z.detach().transpose(0, 1).reshape(self.channels, -1).double()
        sums = torch.stack([flat.sum(1), flat.pow(2).sum(1)])
        count = torch.tensor(float(flat.shape[1]), dtype=torch.float64, device=z.device)
        if (
            self.sync
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            packed = torch.cat([sums.flatten(), count[None]])
            dist.all_reduce(packed)
            sums, count = packed[:-1].view(2, self.channels), packed[-1]
        n = float(count)
        mean = sums[0] / n
        var = (sums[1] / n - mean.pow(2)).clamp_min(0.0)
        return mean.float(), var.float(), int(n)

    def _standardise(self, z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        scale = torch.rsqrt(var.float() + self.eps).view(shape)
        return ((z.float() - mean.float().view(shape)) * scale).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents the U-Net made back to the VAE's, by the running statistics."""
        mean, std = self.mean_std()
        return (z.float() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).to(z.dtype)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` per channel with ``std = sqrt(running_var + eps)``: ``z_vae = z x std +
        mean`` (diffusers' ``latents_mean`` and ``latents_std``, with ``scaling_factor`` 1)."""
        return self.running_mean.float(), (self.running_var.float() + self.eps).sqrt()

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"


@torch.no_grad()
def fold_into_vae(vae: nn.Module, mean: torch.Tensor, std: torch.Tensor, scale: float) -> nn.Module:
    """A copy of ``vae`` whose latents are REPA-E's normalised ones divided by ``scale``, so that a
    tool which multiplies latents by ``scale`` (SD's 0.18215, as every SD reader does) hands the
    U-Net exactly ``(z - mean) / std`` and decodes exactly what this VAE decodes.

    The per-channel affine map is folded into the two 1x1 convolutions around the latents:
    ``quant_conv`` (the posterior's mean is mapped, its log-variance shifted by ``2 log a``) and
    ``post_quant_conv`` (the inverse map), so the posterior sample of the copy is the map of the
    original's sample, noise and all."""
    import copy

    folded = copy.deepcopy(vae)
    c = folded.embed_dim
    a = 1.0 / (std.double() * float(scale))  # z' = (z - mean) x a
    mean = mean.double()
    q, p = folded.quant_conv, folded.post_quant_conv
    w, b = q.weight.double(), q.bias.double()
    w[:c] *= a.view(-1, 1, 1, 1)
    b[:c] = (b[:c] - mean) * a
    b[c:] += 2.0 * torch.log(a)
    q.weight.copy_(w), q.bias.copy_(b)
    pw, pb = p.weight.double(), p.bias.double()  # decode(z) = post(z) with z = z' / a + mean
    pb += pw[:, :, 0, 0] @ mean
    pw *= (1.0 / a).view(1, -1, 1, 1)
    p.weight.copy_(pw), p.bias.copy_(pb)
    return folded
