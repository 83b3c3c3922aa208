"""Stage 2: a text-conditioned U-Net trained on a frozen VAE's latents (latent diffusion).

Per batch: the frozen VAE's latents (scaled by ``latent_scale``; :mod:`.latents`), the batch's
conditions from the conditioner (captions, some dropped for classifier-free guidance;
:mod:`sd_lightning.conditioning`), noise at random timesteps, and the U-Net's output regressed
on epsilon or v, optionally min-SNR-weighted (:func:`~sd_lightning.diffusion.training.
denoising_loss`). An EMA of the U-Net is updated after every optimizer step and used for
validation and sampling (:mod:`.sampling`).

What is trained, saved and sharded: only ``unet`` (and its EMA copy, saved, never optimized), or
what a fine-tuning method trains (adapters, a new word's vectors). The VAE is a frozen submodule
(its weights ride along in checkpoints, so a stage-2 checkpoint samples on its own); the text
encoder sits outside ``state_dict`` (it comes from its own weights). Under ``trainer=fsdp``,
``configure_model`` shards the U-Net and its EMA copy block by block; ``compile=true`` compiles
the U-Net's layers, or with ``compile_scope=model`` its whole forward (either way the parameter
names stay the same).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf

from sd_lightning.conditioning.conditioner import Conditioner
from sd_lightning.core.errors import InputError
from sd_lightning.diffusion.schedules import make_alphas_cumprod
from sd_lightning.diffusion.training import denoising_loss, offset_noise
from sd_lightning.models.autoencoder import AutoencoderKL
from sd_lightning.models.ema import EMA
from sd_lightning.models.parallel import (
    check_compile_scope,
    compile_unet,
    full_state_dict,
    fully_shard_unet,
    is_sharded,
)
from sd_lightning.models.unet import UNetModel
from sd_lightning.systems.alignment import AlignmentMixin
from sd_lightning.systems.latents import LatentsMixin
from sd_lightning.systems.partial import PartialCheckpointMixin
from sd_lightning.systems.rng import StepSeededMixin
from sd_lightning.systems.sampling import SamplingMixin
from sd_lightning.systems.stage import StageCheckpointMixin

log = logging.getLogger(__name__)
NETS = ["unet", "vae", "text_encoder", "optimizer", "lr_scheduler", "schedule", "finetune", "repa"]
NOT_HYPERPARAMETERS = [*NETS, "val_prompts", "val_sampler", "compile_options"]  # own, or in config
# The frozen VAE and the EMA copy are in eval mode on purpose; Lightning's warning about modules
# in eval mode at the start of training would only confuse.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
STAGE = "ldm"


class LatentDiffusionSystem(
    StepSeededMixin,
    LatentsMixin,
    SamplingMixin,
    PartialCheckpointMixin,
    StageCheckpointMixin,
    AlignmentMixin,
):
    """Trains ``unet`` on ``vae`` latents conditioned on ``text_encoder`` token states.

    Args:
        unet: the :class:`UNetModel` to train.
        vae: the frozen stage-1 :class:`AutoencoderKL` (``checkpoints.load_vae(vae_ckpt)``).
        text_encoder: the frozen :class:`OpenCLIPTextEncoder` (any ``captions -> states``).
        optimizer / lr_scheduler: factories (``_partial_: true``); the scheduler steps per
            optimizer step.
        schedule: keyword arguments of :func:`~sd_lightning.diffusion.schedules.make_alphas_cumprod`.
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
    not_hyperparameters = NOT_HYPERPARAMETERS
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
        repa: dict[str, Any] | None = None,
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
        context_dim = getattr(text_encoder, "width", None)
        if context_dim is not None and context_dim != unet.config["context_dim"]:
            raise InputError(
                f"the text encoder's states are {context_dim}-d but unet.context_dim="
                f"{unet.config['context_dim']}; set unet.context_dim={context_dim}"
            )
        # plain containers (Hydra passes DictConfigs), so checkpoints load with weights_only=True
        schedule, val_sampler = _plain(schedule or {}), _plain(val_sampler or {})
        self.save_hyperparameters(ignore=self.not_hyperparameters)
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
        self.init_alignment(_plain(repa) if repa else None)  # repa=urepa: projector and encoder
        self.vae = vae.requires_grad_(False).eval()
        adapt_text = getattr(self.finetune, "adapt_text", None)
        text_tower = adapt_text(text_encoder) if adapt_text else None
        if text_tower is not None:  # its adapters train: held (and moved, saved) by the system
            self.text_tower = text_tower
        self.conditioner = Conditioner(
            text_encoder,
            caption_dropout=caption_dropout,
            offload=offload_text_encoder,
            embeddings=self.embeddings,
            trains_text=text_tower is not None,
            vector_dim=unet.config.get("adm_in_channels"),  # SDXL: pooled text and sizes
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.prediction = prediction
        self.sample_posterior = sample_posterior
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

    # -- frozen parts stay frozen ------------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusionSystem:
        super().train(mode)
        self.vae.eval()
        return self

    def checkpoint_extras(self) -> dict[str, Any]:
        extras = {"vae_config": self.vae.config}  # rebuilds the frozen VAE for sampling
        return {**extras, **self.partial_extras()}

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

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """The token states the U-Net attends to for ``captions`` (the conditioner's)."""
        return self.conditioner.encode(captions).crossattn

    # -- training ----------------------------------------------------------------------------------
    def diffusion_loss(self, net, z, conditions, t, noise, weight=None) -> torch.Tensor:
        return denoising_loss(
            net, z, conditions, t, noise, self.alphas_cumprod, self.prediction,
            self.min_snr_gamma, weight,
        )  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        rng = self.step_rng()  # timesteps, noise, posterior samples, caption dropout
        z = self.batch_latents(batch, rng)
        size = [n * self.vae.downsample_factor for n in z.shape[-2:]]  # where the batch has none
        conditions = self.conditioner(batch, rng, train=True, size=size)  # some captions dropped
        noise = offset_noise(z.shape, self.offset_noise, rng, device=z.device, dtype=z.dtype)
        n = len(self.alphas_cumprod)
        t = torch.randint(0, n, (z.shape[0],), generator=rng, device=z.device)
        with self.caught_middle() as middle:  # repa=urepa: the U-Net's middle block output
            loss = self.diffusion_loss(self.unet, z, conditions, t, noise, batch.get("loss_weight"))
        loss = loss + self.alignment_term(batch, middle)
        bs = z.shape[0]
        self.log("train/loss", loss, batch_size=bs)  # shown by callbacks.ProgressBar
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
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        z = self.batch_latents(batch)
        bs = z.shape[0]
        noise = torch.randn(z.shape, generator=generator).to(z)
        n = len(self.alphas_cumprod)
        t = ((torch.arange(bs) + 0.5) * n / bs).long().clamp(max=n - 1).to(z.device)  # stratified
        size = [n * self.vae.downsample_factor for n in z.shape[-2:]]
        loss = self.diffusion_loss(
            self.sampling_net, z, self.conditioner(batch, size=size), t, noise
        )
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)

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
