"""REPA-E (``stage=e2e``, arXiv 2504.10483): the VAE and the U-Net trained together, the VAE
shaped by the U-Net's representation alignment while the U-Net learns to denoise its latents.

Per batch, as REPA-E's ``train_repae.py`` orders it (manual optimization, three optimizers):

1. the VAE encodes the images (a posterior sample ``z``) and decodes them;
2. **the VAE's step**, the U-Net frozen and in evaluation mode: stage 1's loss (L1 + LPIPS +
   KL + the PatchGAN's term at a fixed weight) plus ``vae_align_weight`` (1.5) x the alignment
   loss of the U-Net's middle block on the noised, normalised ``z`` (the up path is not run);
   that gradient runs back through the frozen U-Net into the encoder;
3. **the discriminator's step** on the detached reconstructions;
4. **the U-Net's step** on ``z.detach()``: the denoising loss plus ``repa.weight`` (0.5) x the
   alignment loss, at the same timesteps and noise as step 2; then the EMA update.

The latents are normalised by :class:`~sd_lightning.models.latent_norm.LatentNorm` (REPA-E's
non-affine batch norm, its statistics summed over ranks): batch statistics in the U-Net's step,
the running ones in the VAE's step, in validation and when sampling (the inverse before
decoding). Its running statistics start from the first batch's (REPA-E starts them from the VAE's
latent statistics). ``global_step`` counts U-Net steps.

What it writes: checkpoints of stage ``e2e`` (U-Net, EMA, projector, VAE, discriminator, the
norm's statistics, three optimizers), and at the end ``export/ldm.safetensors`` (the U-Net, with
the latent statistics it learnt on), ``export/vae.safetensors`` (the tuned VAE, what ``vae_ckpt=``
reads) and ``export/vae_diffusers/`` (diffusers' ``AutoencoderKL`` folder with ``latents_mean``
and ``latents_std``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.diffusion.training import add_noise, offset_noise
from sd_lightning.losses.autoencoder_loss import AutoencoderLoss
from sd_lightning.models.latent_norm import LatentNorm
from sd_lightning.models.parallel import full_state_dict
from sd_lightning.systems.ldm import NOT_HYPERPARAMETERS, LatentDiffusionSystem, OptimizerFactory
from sd_lightning.systems.optim import clipped_step
from sd_lightning.weights.write import write_diffusers_vae

log = logging.getLogger(__name__)
STAGE = "e2e"


def _noop() -> None:
    pass


class EndToEndSystem(LatentDiffusionSystem):
    """REPA-E: ``unet`` and ``vae`` trained together through the alignment with ``repa``'s
    frozen vision encoder (see the module's text for the step).

    Args (beyond :class:`LatentDiffusionSystem`'s, whose ``optimizer`` is the U-Net's):
        loss: stage 1's :class:`AutoencoderLoss` (REPA-E: L1, LPIPS, KL 1e-6, the PatchGAN's
            term at 0.1 without the adaptive weight, from the first step); ``None`` only when
            the system is rebuilt for sampling.
        vae_optimizer / disc_optimizer: factories for the VAE's and the discriminator's
            optimizers (REPA-E: AdamW, lr 1e-4, betas (0.9, 0.999), no weight decay).
        vae_align_weight: the alignment loss's weight in the VAE's step (REPA-E: 1.5).
        gradient_clip_val: each optimizer's gradient norm is clipped to it (REPA-E: 1.0).
        latent_norm: ``eps`` and ``momentum`` of the latents' batch norm (1e-4, 0.1).
    """

    checkpoint_stage = STAGE
    not_hyperparameters = [
        *NOT_HYPERPARAMETERS,
        "loss",
        "vae_optimizer",
        "disc_optimizer",
        "latent_norm",
    ]
    resume_fix = (
        "stage=e2e resumes only from a stage=e2e checkpoint (checkpoints/last.ckpt of such a "
        "run); a stage-2 checkpoint goes in ldm_ckpt=, a stage-1 one in vae_ckpt="
    )

    def __init__(
        self,
        *,
        loss: AutoencoderLoss | None,
        vae_optimizer: OptimizerFactory | None,
        disc_optimizer: OptimizerFactory | None,
        vae_align_weight: float = 1.5,
        gradient_clip_val: float | None = 1.0,
        latent_norm: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if loss is not None and not kwargs.get("repa"):  # training (sampling builds no loss)
            raise InputError(
                "stage=e2e tunes the VAE through the alignment loss: give repa.encoder=<a "
                "DINOv2 folder> (repa=urepa is the stage's default)"
            )
        if kwargs.get("finetune"):
            raise InputError(
                "stage=e2e trains the whole U-Net and VAE: finetune= (LoRA, DreamBooth, textual "
                "inversion) is for stage=ldm; drop finetune= here"
            )
        kwargs["latent_scale"] = 1.0  # unused: LatentNorm standardises the latents
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.vae.requires_grad_(True).train()
        self.loss = loss
        norm = dict(latent_norm or {})
        self.latent_norm = LatentNorm(
            self.vae.embed_dim, eps=float(norm.get("eps", 1e-4)),
            momentum=float(norm.get("momentum", 0.1)),
        )  # fmt: skip
        self.vae_optimizer_factory, self.disc_optimizer_factory = vae_optimizer, disc_optimizer
        self.vae_align_weight = float(vae_align_weight)
        self.gradient_clip_val = gradient_clip_val

    def train(self, mode: bool = True) -> EndToEndSystem:
        super().train(mode)
        self.vae.train(mode)  # trained here (the stage-2 system keeps it in evaluation mode)
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(self.trainer.strategy, DDPStrategy):
            # each optimizer's backward reaches only its own networks
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    # -- latents: normalised by the batch norm, not scaled -----------------------------------------
    def _scaled_latents(self, posterior, generator=None) -> torch.Tensor:
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return self.latent_norm(z.float())

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.latent_norm.denormalize(z))

    @torch.no_grad()
    def _start_latent_norm(self, z: torch.Tensor) -> None:
        """The running statistics from the first batch (all ranks), so that the VAE's first
        steps see standardised latents too."""
        mean, var = self.latent_norm.start_from(z)
        log.info(
            "latent norm: running statistics from the first batch (mean %s, std %s)",
            [round(float(v), 3) for v in mean],
            [round(float(v), 3) for v in var.sqrt()],
        )

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        opt_vae, opt_disc, opt_unet = self.optimizers()
        for opt in (opt_vae, opt_disc):  # global_step counts the U-Net's steps alone
            opt._on_before_step = opt._on_after_step = _noop
        x = batch.get("image")
        if x is None:
            raise InputError(
                "stage=e2e trains the VAE, so it reads images: data=webdataset or data=folder, "
                "not latent shards"
            )
        rng = self.step_rng()  # posterior sample, caption dropout, timesteps, noise
        step = self.global_step
        posterior = self.vae.encode(x)
        z = posterior.sample(rng).float()
        recon = self.vae.decode(z)
        if int(self.latent_norm.num_batches_tracked) == 0 and step == 0:
            self._start_latent_norm(z)
        size = [n * self.vae.downsample_factor for n in z.shape[-2:]]
        conditions = self.conditioner(batch, rng, train=True, size=size)
        noise = offset_noise(z.shape, self.offset_noise, rng, device=z.device, dtype=z.dtype)
        n = len(self.alphas_cumprod)
        t = torch.randint(0, n, (z.shape[0],), generator=rng, device=z.device)
        target = self.alignment_target(batch)
        bs = x.shape[0]

        # 1. the VAE: the U-Net frozen (not in opt_vae: toggled off), on running statistics
        self.unet.eval()
        self.latent_norm.eval()
        with self.toggled_optimizer(opt_vae):
            vae_loss, logs = self.loss.generator_loss(
                x, recon, posterior, step, last_layer=self.vae.last_layer
            )
            z_t = add_noise(self.latent_norm(z), noise, self.alphas_cumprod[t])
            middle = self.unet.middle_features(z_t, t, **conditions.kwargs())
            align = self.alignment_term(batch, [middle], target, self.vae_align_weight, "vae")
            self.manual_backward(vae_loss + align)
            self._step(opt_vae)
        # 2. the discriminator, on the reconstructions made before the VAE's step
        d_logs: dict[str, torch.Tensor] = {}
        if self.loss.disc_active(step):
            with self.toggled_optimizer(opt_disc):
                d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
                self.manual_backward(d_loss)
                self._step(opt_disc)
        # 3. the U-Net (and the projector) on the detached latents, batch statistics
        self.unet.train()
        self.latent_norm.train()
        with self.toggled_optimizer(opt_unet):
            zn = self.latent_norm(z.detach())
            with self.caught_middle() as caught:
                loss = self.diffusion_loss(self.unet, zn, conditions, t, noise)
            total = loss + self.alignment_term(batch, caught, target)
            self.manual_backward(total)
            self._step(opt_unet)
        if self.ema is not None:
            self.ema.update(self.unet)
        self._step_schedulers()

        self.log("train/loss", loss.detach(), batch_size=bs)  # callbacks.ProgressBar shows it
        self.log("train/vae_loss", logs.pop("loss"), batch_size=bs)
        logs = {k: v for k, v in logs.items() if k not in ("logvar", "disc_factor")}
        self.log_dict({f"train/vae_{k}": v for k, v in {**logs, **d_logs}.items()}, batch_size=bs)
        self.log_skipped()
        return total.detach()

    def _step(self, optimizer) -> None:
        clipped_step(self, optimizer, self.gradient_clip_val)

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()

    def configure_optimizers(self):
        unet_params = [p for n, p in self.named_parameters() if p.requires_grad and _unet_side(n)]
        vae_params = [p for p in self.vae.parameters() if p.requires_grad]
        if self.loss.learn_logvar:  # stage 1's learned log-variance trains with the VAE
            vae_params.append(self.loss.logvar)
        optimizers = [
            self.vae_optimizer_factory(vae_params),
            self.disc_optimizer_factory(self.loss.discriminator.parameters()),
            self.optimizer_factory(unet_params),
        ]
        if self.scheduler_factory is None:  # the U-Net's warm-up alone, as in stage 2
            return optimizers
        return optimizers, [self.scheduler_factory(optimizers[2])]

    # -- what it writes ----------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict[str, Any]:
        return {"vae_config": self.vae.config}

    def latent_statistics(self) -> dict[str, list[float]]:
        mean, std = self.latent_norm.mean_std()
        return {"latents_mean": mean.tolist(), "latents_std": std.tolist()}

    def export_weights(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """``ldm`` (the U-Net as stage 2 exports it, with the latent statistics instead of a
        scale) and ``vae`` (the tuned VAE as stage 1 exports it, with the same statistics)."""
        files = super().export_weights()
        state, meta = files["ldm"]
        stats = self.latent_statistics()
        meta = {**meta, "trained_by": STAGE, **stats}
        vae_meta = {
            "stage": "vae", "model": "autoencoder", "config": self.vae.config,
            "step": self.global_step, "trained_by": STAGE, **stats,
        }  # fmt: skip
        return {"ldm": (state, meta), "vae": (full_state_dict(self.vae), vae_meta)}

    def export_folders(self, folder: str) -> list[str]:
        """The tuned VAE as diffusers' ``AutoencoderKL`` folder (``<folder>/vae_diffusers``)."""
        path = os.path.join(folder, "vae_diffusers")
        stats = self.latent_statistics()
        write_diffusers_vae(
            self.vae, path, stats["latents_mean"], stats["latents_std"], self._image_size()
        )
        return [path]


def _unet_side(name: str) -> bool:
    """The parameters of the U-Net's optimizer: the U-Net and the alignment's projector."""
    return name.startswith(("unet.", "aligner."))
