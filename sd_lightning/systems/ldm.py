"""Stage 2: a text-conditioned U-Net trained on a frozen VAE's latents (latent diffusion).

Per batch: encode images with the frozen VAE (scaled by ``latent_scale``), captions with the frozen
OpenCLIP text encoder (some replaced by "" for classifier-free guidance), add noise at random
timesteps, and regress the U-Net's output on epsilon or v, optionally min-SNR-weighted. An EMA of
the U-Net is updated after every optimizer step and used for validation and sampling.

What is trained, saved and sharded: only ``unet`` (and its EMA copy, saved, never optimized).
The VAE is a frozen submodule (its weights ride along in checkpoints, so a stage-2 checkpoint
samples on its own); the text encoder sits outside ``state_dict`` (it comes from its own weights).
Under ``trainer=fsdp``, ``configure_model`` shards the U-Net and its EMA copy block by block;
``compile=true`` compiles the U-Net's layers, or with ``compile_scope=model`` its whole forward
(either way the parameter names stay the same).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sd_lightning.diffusion import schedules
from sd_lightning.diffusion.guidance import generate
from sd_lightning.diffusion.prediction import add_noise, v_target
from sd_lightning.diffusion.training import min_snr_weight, offset_noise
from sd_lightning.errors import InputError
from sd_lightning.finetune.base import check_base, trained_state
from sd_lightning.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sd_lightning.models.ema import EMA
from sd_lightning.models.frozen import Frozen
from sd_lightning.models.parallel import (
    check_compile_scope,
    compile_unet,
    full_state_dict,
    fully_shard_unet,
    is_sharded,
)
from sd_lightning.models.unet import UNetModel
from sd_lightning.systems.images import log_image, to_uint8
from sd_lightning.systems.rng import StepSeededMixin
from sd_lightning.systems.stage import StageCheckpointMixin

log = logging.getLogger(__name__)
# The frozen VAE and the EMA copy are in eval mode on purpose; Lightning's warning about modules
# in eval mode at the start of training would only confuse.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
STAGE = "ldm"
TEXT_CACHE = 4096  # captions whose states an offloaded text encoder keeps


def make_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """alphas_cumprod of a named schedule (SD: scaled_linear 0.00085..0.012 over 1000 steps)."""
    if beta_schedule == "scaled_linear":
        betas = schedules.scaled_linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule == "linear":
        betas = schedules.linear_betas(num_timesteps, beta_start, beta_end)
    elif beta_schedule == "cosine":
        betas = schedules.cosine_betas(num_timesteps)
    else:
        raise InputError(
            f"model.schedule.beta_schedule must be scaled_linear, linear or cosine, "
            f"got {beta_schedule!r}"
        )
    if zero_terminal_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    return schedules.alphas_cumprod(betas.double()).float()


class LatentDiffusionSystem(StepSeededMixin, StageCheckpointMixin):
    """Trains ``unet`` on ``vae`` latents conditioned on ``text_encoder`` token states.

    Args:
        unet: the :class:`UNetModel` to train.
        vae: the frozen stage-1 :class:`AutoencoderKL` (``checkpoints.load_vae(vae_ckpt)``).
        text_encoder: the frozen :class:`OpenCLIPTextEncoder` (any ``captions -> states``).
        optimizer / lr_scheduler: factories (``_partial_: true``); the scheduler steps per
            optimizer step.
        schedule: keyword arguments of :func:`make_alphas_cumprod`.
        prediction: ``epsilon`` (SD 1.x, SD 2 base) or ``v_prediction`` (SD 2 768-v); ``None``:
            epsilon.
        latent_scale: multiplies latents (SD's VAE: 0.18215); ``None`` estimates ``1 / std`` from
            the first batch, over all ranks (``scale_by_std``). Saved in checkpoints either way.
        sample_posterior: train on samples of q(z|x) (SD) rather than its mean.
        ema_decay: EMA decay of the U-Net weights (``None``: no EMA, sample with online weights).
        caption_dropout: probability of replacing a caption by "" (classifier-free guidance).
        min_snr_gamma: min-SNR-gamma loss weighting (``None``: uniform).
        offset_noise: strength of the per-channel offset added to the noise (0: off).
        val_prompts / val_seed / val_sampler: the fixed prompts and seeds of the validation grid
            and how it is sampled (``sampler``, ``steps``, ``guidance``, ``spacing``).
        compile: ``torch.compile`` the U-Net (the EMA copy, used for sampling, stays eager).
        compile_scope: ``layers`` (each layer of each block; works with FSDP) or ``model`` (the
            whole forward as one graph; not with ``trainer=fsdp``).
        compile_options: keyword arguments of ``torch.compile`` (``mode``, ``dynamic``...).
        finetune: a method from :mod:`sd_lightning.finetune` (LoRA, DreamBooth, textual
            inversion): it adapts the U-Net (and the text encoder's vocabulary) before anything
            else sees it; a partial one makes checkpoints hold only what it trains, with the
            base weights' reference (``pretrained=``).
        offload_text_encoder: keep the frozen text encoder on the CPU and its states per
            caption on the device (the memory of a 24 GB card goes to the U-Net).
    """

    checkpoint_stage = STAGE
    resume_fix = (
        "ckpt_path resumes only from a stage-2 checkpoint (checkpoints/last.ckpt of a stage=ldm "
        "run); a stage-1 checkpoint goes in vae_ckpt="
    )

    def __init__(
        self,
        unet: UNetModel,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        schedule: dict[str, Any] | None = None,
        prediction: str | None = "epsilon",
        latent_scale: float | None = None,
        sample_posterior: bool = True,
        ema_decay: float | None = 0.9999,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        val_prompts: Sequence[str] = (),
        val_seed: int = 0,
        val_sampler: dict[str, Any] | None = None,
        seed: int = 0,
        compile: bool = False,
        compile_scope: str = "layers",
        compile_options: dict[str, Any] | None = None,
        finetune: Any = None,
        offload_text_encoder: bool = False,
    ):
        super().__init__()
        prediction = prediction or "epsilon"  # null: pretrained= resolves it before, else this
        if prediction not in ("epsilon", "v_prediction"):
            raise InputError(
                f"model.prediction must be 'epsilon' or 'v_prediction', got {prediction!r}"
            )
        if (schedule or {}).get("zero_terminal_snr") and prediction != "v_prediction":
            raise InputError(
                "model.schedule.zero_terminal_snr=true needs model.prediction=v_prediction "
                "(epsilon is undefined at zero SNR)"
            )
        if latent_scale is not None and not float(latent_scale) > 0:
            raise InputError(
                f"model.latent_scale={latent_scale}: give a positive number (SD's VAE: 0.18215), "
                "or null to estimate it from the first batch"
            )
        if not 0.0 <= caption_dropout < 1.0:
            raise InputError(f"model.caption_dropout must be in [0, 1), got {caption_dropout}")
        context_dim = getattr(text_encoder, "width", None)
        if context_dim is not None and context_dim != unet.config["context_dim"]:
            raise InputError(
                f"the text encoder's states are {context_dim}-d but unet.context_dim="
                f"{unet.config['context_dim']}; set unet.context_dim={context_dim}"
            )
        # plain containers (Hydra passes DictConfigs), so checkpoints load with weights_only=True
        schedule, val_sampler = _plain(schedule or {}), _plain(val_sampler or {})
        self.save_hyperparameters(
            ignore=[
                "unet",
                "vae",
                "text_encoder",
                "optimizer",
                "lr_scheduler",
                "schedule",
                "val_prompts",
                "val_sampler",
                "compile_options",
                "finetune",
            ]
        )
        self.finetune = finetune or None  # finetune=none composes to an empty node
        if self.finetune is not None:
            unet = self.finetune.apply(unet)
        # textual inversion: the new word's vectors, trained (the text encoder stays frozen)
        make_embeddings = getattr(self.finetune, "embeddings", None)
        self.embeddings = make_embeddings(text_encoder) if make_embeddings else None
        self.partial = bool(getattr(self.finetune, "partial", False))
        self.strict_loading = not self.partial  # partial checkpoints: the base comes from its file
        self.base_reference: dict[str, Any] | None = None  # set by pretrained.load
        self.unet = unet
        self.ema = EMA(unet, ema_decay) if ema_decay is not None else None
        self.vae = vae.requires_grad_(False).eval()
        if offload_text_encoder and self.embeddings is not None:
            raise InputError(
                "model.offload_text_encoder=true keeps the text encoder on the CPU, but textual "
                "inversion trains through it: set model.offload_text_encoder=false"
            )
        adapt_text = getattr(self.finetune, "adapt_text", None)
        text_tower = adapt_text(text_encoder) if adapt_text else None
        if offload_text_encoder and text_tower is not None:
            raise InputError(
                "model.offload_text_encoder=true keeps the text encoder on the CPU, but its LoRA "
                "trains (finetune.text_encoder=true): set one of them to false"
            )
        self.text_encoder = Frozen(text_encoder, offload=offload_text_encoder)
        if text_tower is not None:  # its adapters train: held (and moved, saved) by the system
            self.text_tower = text_tower
        self._text_cache: dict[str, torch.Tensor] = {}  # offloaded: states per caption
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.prediction = prediction
        self.sample_posterior = sample_posterior
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.val_prompts, self.val_seed = [str(p) for p in val_prompts], val_seed
        self.val_sampler = val_sampler
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(**schedule))
        # a schedule that reaches zero SNR is sampled from its last step (trailing spacing)
        self.default_spacing = "trailing" if schedule.get("zero_terminal_snr") else "leading"
        if latent_scale is None and getattr(vae, "scaling_factor", None):  # SD's own VAE
            latent_scale = vae.scaling_factor
            log.info(
                "latent_scale: %s, the VAE family's (model.latent_scale overrides)", latent_scale
            )
        scale = float("nan") if latent_scale is None else float(latent_scale)
        self.register_buffer("latent_scale", torch.tensor(scale))
        self.init_skipped()
        self.seed = seed
        check_compile_scope(compile_scope)  # before training, not at configure_model
        self.compile, self.compile_options = compile, _plain(compile_options or {})
        self.compile_scope = compile_scope
        self.run_config: dict[str, Any] | None = None

    # -- sharding and compiling (called by Lightning before the optimizers are made) ---------------
    def configure_model(self) -> None:
        strategy = getattr(self._trainer, "strategy", None)
        mesh = getattr(strategy, "shard_mesh", None)  # trainer=fsdp only
        if self.compile and not getattr(self, "_compiled", False):  # the EMA copy samples eagerly
            if mesh is not None and self.compile_scope == "model":
                raise InputError(
                    "model.compile_scope=model compiles the whole U-Net as one graph, which "
                    "FSDP's per-block hooks would split: use model.compile_scope=layers with "
                    "trainer=fsdp"
                )
            compile_unet(self.unet, self.compile_scope, **self.compile_options)
            self._compiled = True
        unshardable = getattr(self.finetune, "unshardable", None)
        if mesh is not None and unshardable:
            raise InputError(unshardable)
        nets = [self.unet] + ([self.ema.net] if self.ema is not None else [])
        if mesh is None or is_sharded(self.unet):  # not FSDP, or done already (validate after fit)
            return
        for net in nets:  # the EMA copy is sharded alike, so its update is per shard
            fully_shard_unet(net, mesh, strategy.mp_policy, strategy.reshard_after_forward)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "image_size", None)
        if size is not None:
            self.check_image_size(int(size), "data.image_size")
        if getattr(datamodule, "buckets", False):  # every bucket's sides are multiples of it
            self.check_image_size(int(datamodule.bucket_step), "data.bucket_step")

    def check_image_size(self, size: int, option: str) -> None:
        """Image sides must be multiples of the VAE's and the U-Net's downsampling together."""
        vae, unet = self.vae.downsample_factor, self.unet.downsample_factor
        factor = vae * unet
        if size <= 0 or size % factor:
            lo, hi = size // factor * factor, (max(size, 0) // factor + 1) * factor
            use = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise InputError(
                f"{option}={size} is not a positive multiple of {factor} (the VAE's downsampling "
                f"{vae} x the U-Net's {unet}): use {option}={use}"
            )

    # -- frozen parts stay frozen ------------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusionSystem:
        super().train(mode)
        self.vae.eval()
        return self

    def checkpoint_extras(self) -> dict[str, Any]:
        extras = {"vae_config": self.vae.config}  # rebuilds the frozen VAE for sampling
        if self.partial:
            extras["base"] = self.base_reference
        return extras

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.partial:  # the adapters only: the base weights are pretrained='s
            checkpoint["state_dict"] = trained_state(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.partial:
            saved = checkpoint["sd_lightning"].get("base")
            check_base(saved, self.base_reference, "ckpt_path")
            expected = trained_state(self, self.state_dict())
            missing = sorted(set(expected) - set(checkpoint["state_dict"]))
            if missing:
                raise InputError(
                    f"ckpt_path lacks {len(missing)} of this fine-tune's trained tensors "
                    f"({missing[0]}...): it was written by another finetune= setting"
                )

    def export_weights(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """``{file stem: (tensors, metadata)}``: the U-Net's weights (EMA if kept; original SD
        names) and the config that builds it, or a LoRA's files (kohya's and diffusers').
        When sharded, every rank must call it (the shards are gathered)."""
        net = self.ema.net if self.ema is not None else self.unet
        state = full_state_dict(net)
        files = getattr(self.finetune, "files", None)
        written = files(self, net, state) if files else None  # LoRA, embeddings
        if written is not None:
            return written
        return {
            STAGE: (
                state,
                {
                    "stage": STAGE,
                    "model": "unet",
                    "config": net.config,
                    "ema": self.ema is not None,
                    "latent_scale": float(self.latent_scale),
                    "prediction": self.prediction,
                    "step": self.global_step,
                },
            )
        }

    # -- latents and text ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, generator: torch.Generator | None = None):
        return self._scaled_latents(self.vae.encode(x), generator)

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None):
        """Scaled latents of a batch: encoded online from ``image``, or drawn from the stored
        posterior (``latent_mean``/``latent_logvar`` of ``data=latents``) without the encoder."""
        if "latent_mean" in batch:
            params = torch.cat([batch["latent_mean"], batch["latent_logvar"]], dim=1)
            return self._scaled_latents(DiagonalGaussian(params.float()), generator)
        return self.encode_images(batch["image"], generator)

    def batch_context(self, batch: dict, captions: list[str]) -> torch.Tensor:
        """Token states of ``captions`` (where dropped: ""), from the stored ``text_states`` of
        ``data=latents`` when present (the encoder then runs only for the empty caption)."""
        if "text_states" not in batch or self.embeddings is not None:
            return self.encode_text(captions)
        if hasattr(self, "text_tower"):  # its adapters train: stored states would starve them
            if not getattr(self, "_said_states", False):
                log.info(
                    "data=latents: the stored text_states are not used, the text encoder trains "
                    "(finetune.text_encoder=true): captions are encoded in every step"
                )
                self._said_states = True
            return self.encode_text(captions)
        context = batch["text_states"].float().clone()
        dropped = [i for i, c in enumerate(captions) if c == "" and batch["caption"][i] != ""]
        if dropped:
            context[dropped] = self.encode_text([""]).to(context)
        return context

    def _scaled_latents(self, posterior: DiagonalGaussian, generator=None) -> torch.Tensor:
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        z = z.float()
        if torch.isnan(self.latent_scale):
            self._estimate_latent_scale(z)
        return z * self.latent_scale

    def _estimate_latent_scale(self, z: torch.Tensor) -> None:
        """``scale_by_std``: 1 / std of the first batch's latents, the variance averaged over
        ranks so every rank gets the same factor."""
        var = self.trainer.strategy.reduce(z.var(), reduce_op="mean") if self._trainer else z.var()
        self.latent_scale.fill_(float(1.0 / var.sqrt()))
        log.info(
            "latent_scale estimated from the first batch: %.5f (1 / std of %d latents x ranks); "
            "stored in checkpoints; set model.latent_scale to fix it",
            float(self.latent_scale),
            z.shape[0],
        )

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        if self.embeddings is not None:  # the trained word's vectors, with gradients
            return self.text_encoder(list(captions), extra=self.embeddings.weight).float()
        if not self.text_encoder.offload:
            return self.text_encoder(list(captions)).float()
        # on the CPU: each caption encoded once (a folder fine-tune has a few), kept on the device
        new = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if len(self._text_cache) + len(new) > TEXT_CACHE:
            self._text_cache.clear()
            new = list(dict.fromkeys(captions))
        if new:
            states = self.text_encoder(new).float().to(self.device)
            self._text_cache.update(zip(new, states))
        return torch.stack([self._text_cache[c] for c in captions])

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.latent_scale)

    # -- training ----------------------------------------------------------------------------------
    def diffusion_loss(
        self,
        net: Callable,
        z: torch.Tensor,
        context: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean per-sample loss, each sample's times ``weight`` where given (DreamBooth's
        prior images: ``prior_loss_weight``)."""
        abar_t = self.alphas_cumprod[t]
        z_t = add_noise(z, noise, abar_t)
        target = noise if self.prediction == "epsilon" else v_target(z, noise, abar_t)
        out = net(z_t, t, context)
        per_sample = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(abar_t, self.min_snr_gamma, self.prediction)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample)
        return per_sample.mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        rng = self.step_rng()  # timesteps, noise, posterior samples, caption dropout
        z = self.batch_latents(batch, rng)
        captions = list(batch["caption"])
        if self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=rng, device=z.device) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        context = self.batch_context(batch, captions)
        noise = offset_noise(z.shape, self.offset_noise, rng, device=z.device, dtype=z.dtype)
        n = len(self.alphas_cumprod)
        t = torch.randint(0, n, (z.shape[0],), generator=rng, device=z.device)
        loss = self.diffusion_loss(self.unet, z, context, t, noise, batch.get("loss_weight"))
        bs = z.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_skipped()
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # right after the step, before any callback's on_train_batch_end: a checkpoint written at
        # this step holds this step's EMA update
        if self.ema is not None:
            self.ema.update(self.unet)

    def on_fit_start(self) -> None:
        prepare = getattr(self.finetune, "prepare", None)
        if prepare is not None:  # DreamBooth's class images, before the data's first batch
            prepare(self)

    def on_train_start(self) -> None:
        if self.ema is not None:  # a resumed run loaded the count into the buffer
            self.ema.resync()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.log("train/ema_decay", self.ema.current_decay(), batch_size=1)

    # -- validation: a loss with fixed noise and timesteps, and a fixed grid of samples ----------
    @property
    def sampling_net(self) -> torch.nn.Module:
        return self.ema.net if self.ema is not None else self.unet

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        z = self.batch_latents(batch)
        bs = z.shape[0]
        noise = torch.randn(z.shape, generator=generator).to(z)
        n = len(self.alphas_cumprod)
        t = ((torch.arange(bs) + 0.5) * n / bs).long().clamp(max=n - 1).to(z.device)  # stratified
        context = self.batch_context(batch, list(batch["caption"]))
        loss = self.diffusion_loss(self.sampling_net, z, context, t, noise)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        if not self.val_prompts or self.trainer.sanity_checking:
            return
        # a sharded U-Net gathers its weights in every forward: every rank samples, rank 0 logs
        if not (self.trainer.is_global_zero or is_sharded(self.unet)):
            return
        images = self.sample_images(self.val_prompts, **self.val_sampler)
        if not self.trainer.is_global_zero:
            return
        grid = sample_grid(images)
        caption = " | ".join(self.val_prompts)
        path = log_image(self.trainer, "val/samples", grid, caption=caption)
        log.info("sample grid: %s", path)

    def sample_images(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        image_size: int | None = None,
        **sampler: Any,
    ) -> torch.Tensor:
        """Images in [-1, 1] for ``prompts`` with the EMA U-Net; seed ``val_seed + i`` for the
        i-th when ``seeds`` is not given. ``image_size``: by default the size the U-Net was
        trained at; ``spacing`` (null): trailing with a zero-terminal-SNR schedule, else
        leading."""
        if sampler.get("spacing") is None:
            sampler["spacing"] = self.default_spacing
        seeds = (
            list(seeds) if seeds is not None else [self.val_seed + i for i in range(len(prompts))]
        )
        size = image_size or self._image_size()
        factor = self.vae.downsample_factor
        shape = (self.unet.config["in_channels"], size // factor, size // factor)
        was_training = self.training
        self.eval()  # dropout off (DreamBooth's class images come before the first step)
        try:
            return generate(
                unet=self.sampling_net,
                decode=self.decode_latents,
                encode_text=self.encode_text,
                prompts=prompts,
                seeds=seeds,
                abar=self.alphas_cumprod,
                prediction=self.prediction,
                latent_shape=shape,
                device=self.device,
                **sampler,
            )
        finally:
            self.train(was_training)

    def _image_size(self) -> int:
        """The size the U-Net trains (or trained) at: the data's, from the run's config after
        loading; the VAE's training size only when neither is known."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and getattr(datamodule, "image_size", None):
            return int(datamodule.image_size)
        size = ((self.run_config or {}).get("data") or {}).get("image_size")
        return int(size) if size else int(self.vae.config["resolution"])

    # -- optimizers --------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def sample_grid(images: torch.Tensor) -> torch.Tensor:
    """uint8 CHW grid of [-1, 1] images, as square as possible."""
    import torchvision

    nrow = max(1, math.ceil(math.sqrt(len(images))))
    return torchvision.utils.make_grid(to_uint8(images), nrow=nrow, padding=2)
