"""Stage-1 loss: L1 + LPIPS reconstruction, KL, and a PatchGAN adversarial term.

The objective of CompVis's ``LPIPSWithDiscriminator`` (taming-transformers / latent-diffusion),
with three of its known defects fixed:

* the learnable log-variance ``logvar`` is a parameter here and the system puts it in the
  autoencoder's optimizer (CompVis left it out, so it never trained);
* the adaptive weight is finite when the generator's gradient vanishes or is non-finite;
* nothing depends on a global step that doubles with two optimizers: callers pass ``step``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sd_lightning.models.autoencoder import DiagonalGaussian
from sd_lightning.models.frozen import Frozen


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``||dL_rec/dW|| / (||dL_G/dW|| + eps)`` at the decoder's last layer W, clamped to
    [0, max_weight] and detached (Esser et al., Taming Transformers, eq. 7).

    Non-finite gradients (overflow, NaN) give 0 rather than poisoning the step.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grads.float().norm() / (g_grads.float().norm() + eps)
    weight = torch.nan_to_num(weight, nan=0.0, posinf=max_weight, neginf=0.0)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Reconstruction (L1 + LPIPS) / exp(logvar) + logvar, KL, and a gated adversarial term.

    Args:
        discriminator: the PatchGAN (trained by its own optimizer).
        perceptual: an LPIPS module (frozen; kept out of the state dict), or None to disable.
        disc_start: autoencoder step from which the adversarial terms are on.
        kl_weight: weight of the KL term (SD: 1e-6).
        pixel_loss: "l1" (SD) or "l2" per-pixel distance. L2 converges faster in the first few
            thousand steps (large errors dominate its gradient); L1 gives sharper results later.
        perceptual_weight: weight of LPIPS inside the reconstruction term.
        disc_weight: multiplies the adaptive weight (SD: 0.5).
        disc_factor: overall adversarial factor once started (1.0).
        disc_loss: "hinge" or "vanilla".
        logvar_init: the log-variance dividing the reconstruction term (0: plain L1 + LPIPS).
        learn_logvar: train the log-variance with the autoencoder (CompVis's loss defines it
            as a parameter; Stability's code keeps it fixed by default, ``learn_logvar=False``).
            Learned, it falls as the reconstruction error falls, scaling the reconstruction term
            up by ``exp(-logvar)`` and so weakening the KL term relative to it (5-20x over a run).
        max_adaptive_weight: clamp for the adaptive weight.
        adaptive: balance the adversarial gradient against the reconstruction's at the decoder's
            last layer (Taming's adaptive weight, SD's VAE); ``False``: the adversarial term is
            weighted by ``disc_weight`` alone (REPA-E's VAE loss).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        perceptual: nn.Module | None = None,
        disc_start: int = 50001,
        kl_weight: float = 1e-6,
        pixel_weight: float = 1.0,
        pixel_loss: str = "l1",
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        logvar_init: float = 0.0,
        max_adaptive_weight: float = 1e4,
        learn_logvar: bool = False,
        adaptive: bool = True,
    ):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"loss.disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"loss.pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        if disc_start < 0:
            raise ValueError(f"loss.disc_start must be >= 0, got {disc_start}")
        self.discriminator = discriminator
        self.perceptual = Frozen(perceptual) if perceptual is not None else None
        # a parameter either way (checkpoints hold it); optimized only when learned
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=learn_logvar)
        self.learn_logvar = learn_logvar
        self.disc_start = disc_start
        self.kl_weight = kl_weight
        self.pixel_weight = pixel_weight
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.d_loss_fn = D_LOSSES[disc_loss]
        self.max_adaptive_weight = max_adaptive_weight
        self.adaptive = adaptive

    def disc_active(self, step: int) -> bool:
        return self.disc_factor > 0 and step >= self.disc_start

    def reconstruction(
        self, inputs: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel L1 (or L2) plus the per-image LPIPS distance broadcast over pixels; also
        returns the per-image LPIPS distances (zeros when LPIPS is off)."""
        diff = inputs - recon
        rec = self.pixel_weight * (diff.abs() if self.pixel_loss == "l1" else diff.pow(2))
        p_loss = torch.zeros(inputs.shape[0], 1, 1, 1, device=inputs.device)
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual(inputs, recon).float()
            rec = rec + self.perceptual_weight * p_loss
        return rec, p_loss.flatten()

    def generator_loss(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the autoencoder's optimizer. ``last_layer`` enables the adaptive weight
        (needs autograd; without it, e.g. in validation, the weight is 0)."""
        inputs, recon = inputs.float(), recon.float()
        rec, p_loss = self.reconstruction(inputs, recon)
        batch = inputs.shape[0]
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = posterior.kl().float().sum() / batch

        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight = zero, zero
        if self.disc_active(step):
            g_loss = -self.discriminator(recon).float().mean()
            if not self.adaptive:
                d_weight = torch.full((), float(self.disc_weight), device=inputs.device)
            elif last_layer is not None and torch.is_grad_enabled():
                d_weight = self.disc_weight * adaptive_weight(
                    nll, g_loss, last_layer, self.max_adaptive_weight
                )
        factor = self.disc_factor if self.disc_active(step) else 0.0
        loss = nll + self.kl_weight * kl + factor * d_weight * g_loss
        logs = {
            "loss": loss.detach(),
            "nll": nll.detach(),
            "rec": rec.detach().mean(),
            "lpips": p_loss.detach().mean(),
            "kl": kl.detach(),
            "logvar": self.logvar.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight,
            "disc_factor": torch.tensor(factor, device=inputs.device),
        }
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the discriminator's optimizer; reconstructions must come in detached."""
        logits_real = self.discriminator(inputs.detach()).float()
        logits_fake = self.discriminator(recon.detach()).float()
        factor = self.disc_factor if self.disc_active(step) else 0.0
        d_loss = factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
