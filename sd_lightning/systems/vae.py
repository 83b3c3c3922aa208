"""Stage 1: the KL autoencoder trained against L1 + LPIPS + KL + PatchGAN, with manual optimization.

Per batch: the autoencoder's optimizer steps on the generator loss; once the discriminator has
started (``loss.disc_start``), the discriminator's optimizer steps on the hinge/vanilla loss of the
detached reconstructions. ``global_step`` counts autoencoder steps only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from sd_lightning.core.errors import InputError
from sd_lightning.losses.autoencoder_loss import AutoencoderLoss
from sd_lightning.models.autoencoder import AutoencoderKL
from sd_lightning.models.parallel import full_state_dict
from sd_lightning.systems.images import log_image, pairs_grid
from sd_lightning.systems.optim import clipped_step
from sd_lightning.systems.rng import StepSeededMixin
from sd_lightning.systems.stage import StageCheckpointMixin

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
STAGE = "vae"


def _noop() -> None:
    pass


class VAESystem(StepSeededMixin, StageCheckpointMixin):
    """Trains ``autoencoder`` with ``loss`` (which owns the discriminator and the log-variance).

    Args:
        autoencoder: the :class:`AutoencoderKL` to train.
        loss: the :class:`AutoencoderLoss` (discriminator, LPIPS, weights, ``disc_start``).
        optimizer: factory for the autoencoder's optimizer (``_partial_: true`` in the config);
            it receives the autoencoder's parameters (and the loss's ``logvar`` where
            ``loss.learn_logvar``).
        disc_optimizer: factory for the discriminator's optimizer.
        lr_scheduler / disc_lr_scheduler: optional factories, stepped per optimizer step.
        accumulate_grad_batches: micro-batches per optimizer step (Lightning's Trainer option does
            not apply under manual optimization).
        gradient_clip_val: max gradient norm per optimizer (``None``: no clipping).
        num_val_images: images of the first validation batch shown beside their reconstructions.
        freeze_encoder: train the decoder only (the encoder and ``quant_conv`` frozen), as when
            fine-tuning SD's VAE so its latents stay those SD's U-Nets were trained on.
    """

    checkpoint_stage = STAGE
    resume_fix = "stage=vae resumes only from a stage-1 checkpoint (checkpoints/last.ckpt of a stage=vae run)"

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        loss: AutoencoderLoss,
        optimizer: OptimizerFactory,
        disc_optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        disc_lr_scheduler: SchedulerFactory | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        num_val_images: int = 8,
        seed: int = 0,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        if accumulate_grad_batches < 1:
            raise InputError(
                f"model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}"
            )
        self.automatic_optimization = False
        self.save_hyperparameters(
            ignore=[
                "autoencoder",
                "loss",
                "optimizer",
                "disc_optimizer",
                "lr_scheduler",
                "disc_lr_scheduler",
            ]
        )
        self.autoencoder = autoencoder
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            autoencoder.encoder.requires_grad_(False)
            autoencoder.quant_conv.requires_grad_(False)
        self.loss = loss
        self.optimizer_factory, self.disc_optimizer_factory = optimizer, disc_optimizer
        self.scheduler_factory, self.disc_scheduler_factory = lr_scheduler, disc_lr_scheduler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.num_val_images = num_val_images
        self.seed = seed
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = MeanMetric()
        self.init_skipped()
        self.run_config: dict[str, Any] | None = None  # the composed config, stored in checkpoints
        self._val_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- setup and checkpoints -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "image_size", None)
        factor = self.autoencoder.downsample_factor
        if size is not None and size % factor:
            lo, hi = size // factor * factor, (size // factor + 1) * factor
            raise InputError(
                f"data.image_size={size} is not divisible by the VAE's downsampling factor {factor} "
                f"(2 ** (len(ch_mult) - 1)); use data.image_size={lo or hi} or {hi}"
            )
        if isinstance(self.trainer.strategy, DDPStrategy):
            # Each optimizer's backward touches only its own network, and the discriminator is idle
            # before disc_start: DDP must tolerate parameters without gradients.
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def export_weights(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """``{"vae": (weights, metadata)}``: the autoencoder's weights (CompVis names) and the
        config that builds it, for safetensors export."""
        state = full_state_dict(self.autoencoder)
        config = (self.run_config or {}).get("vae", {})
        meta = {"stage": STAGE, "model": "autoencoder", "config": config, "step": self.global_step}
        return {STAGE: (state, meta)}

    # -- training ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x, sample_posterior=False)[0]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        self.count_skipped(batch)
        opt_ae, opt_d = self.optimizers()
        # Lightning counts every optimizer's step in global_step under manual optimization
        # (Lightning-AI/pytorch-lightning#17958): leave the discriminator's out, so that
        # global_step, max_steps and disc_start all count autoencoder steps.
        opt_d._on_before_step = opt_d._on_after_step = _noop
        step = self.global_step
        accumulate = self.accumulate_grad_batches
        update = (batch_idx + 1) % accumulate == 0

        recon, posterior = self.autoencoder(x, generator=self.step_rng())
        with self.toggled_optimizer(opt_ae):
            loss, logs = self.loss.generator_loss(
                x, recon, posterior, step, last_layer=self.autoencoder.last_layer
            )
            self.manual_backward(loss / accumulate)
            if update:
                self._step(opt_ae)

        d_logs: dict[str, torch.Tensor] = {}
        if self.loss.disc_active(step):
            with self.toggled_optimizer(opt_d):
                d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
                self.manual_backward(d_loss / accumulate)
                if update:
                    self._step(opt_d)

        if update:
            self._step_schedulers(disc_stepped=self.loss.disc_active(step))

        bs = x.shape[0]
        self.log("train/loss", logs.pop("loss"), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in {**logs, **d_logs}.items()}, batch_size=bs)
        self.log_skipped()

    def _step(self, optimizer) -> None:
        clipped_step(self, optimizer, self.gradient_clip_val)

    def _step_schedulers(self, disc_stepped: bool) -> None:
        schedulers = self.lr_schedulers()
        schedulers = (
            schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []
        )
        stepped = ([True] if self.scheduler_factory else []) + (
            [disc_stepped] if self.disc_scheduler_factory else []
        )
        for scheduler, was_stepped in zip(schedulers, stepped):
            if was_stepped:
                scheduler.step()

    # -- validation --------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        bs = x.shape[0]
        recon, posterior = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss.generator_loss(x, recon, posterior, self.global_step)
        x01, r01 = (x.float() + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
        self.val_psnr(r01, x01)
        self.val_ssim(r01, x01)
        if self.loss.perceptual is not None:  # the loss already measured LPIPS on this batch
            self.val_lpips.update(logs["lpips"], weight=bs)
            self.log("val/lpips", self.val_lpips, batch_size=bs)
        val_logs = {f"val/{k}": v for k, v in logs.items() if k in ("loss", "nll", "rec", "kl")}
        self.log_dict(val_logs, sync_dist=True, batch_size=bs)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=bs)
        self.log("val/ssim", self.val_ssim, batch_size=bs)
        if batch_idx == 0:
            n = self.num_val_images
            self._val_batch = (x[:n].detach().cpu(), recon[:n].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if (
            self._val_batch is not None
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
        ):
            path = log_image(
                self.trainer,
                "val/reconstructions",
                pairs_grid(*self._val_batch),
                caption="rows: inputs, then their reconstructions",
            )
            log.info("reconstruction grid: %s", path)
        self._val_batch = None

    # -- optimizers --------------------------------------------------------------------------------
    def configure_optimizers(self):
        ae_params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if self.loss.learn_logvar:
            ae_params.append(self.loss.logvar)
        opt_ae = self.optimizer_factory(ae_params)
        opt_d = self.disc_optimizer_factory(self.loss.discriminator.parameters())
        schedulers = [
            self.scheduler_factory(opt_ae) if self.scheduler_factory else None,
            self.disc_scheduler_factory(opt_d) if self.disc_scheduler_factory else None,
        ]
        if not any(schedulers):
            return [opt_ae, opt_d]
        return [opt_ae, opt_d], [s for s in schedulers if s is not None]
