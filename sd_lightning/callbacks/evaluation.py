"""FID and CLIP score during training: every ``every_n_steps`` the stage-2 system generates a
fixed set of prompts (image ``i``: seed ``seed + i``, the EMA U-Net), every rank its share, and
the features are gathered once and scored against the reference set's (cached on disk, read once
at the start of fit). The numbers go to the loggers at the training step (``eval/fid``,
``eval/kid``, ``eval/clip_score``, ``eval/clip_cosine``), so wandb shows quality against compute,
and into ``callback_metrics`` on every rank (a ``ModelCheckpoint`` may monitor ``eval/fid``).

A stop request (preemption, Ctrl-C) is agreed between the batches of an evaluation and ends it
at once; the step that was due is evaluated when the run resumes, before its next step, and a
resumed run does not evaluate a step twice (the last evaluated step is in the checkpoint).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from sd_lightning.core import stopping
from sd_lightning.core.errors import InputError
from sd_lightning.evaluation import frechet, gather, measure
from sd_lightning.evaluation.clip_score import ClipScorer
from sd_lightning.evaluation.inception import DIMS, RESIZES, InceptionFeatures, weights_path
from sd_lightning.evaluation.prompts import read_prompts
from sd_lightning.evaluation.reference import ReferenceSet, reference_features

log = logging.getLogger(__name__)


class Evaluation(L.Callback):
    """FID-``num_images`` and CLIP score of the stage-2 system every ``every_n_steps`` steps."""

    def __init__(
        self,
        every_n_steps: int = 5000,
        prompts: str | None = None,
        reference: str | None = None,
        num_images: int = 1000,
        guidance: float = 7.5,
        sampler: str = "ddim",
        steps: int = 25,
        seed: int = 0,
        batch_size: int = 16,
        inception: str | None = None,
        resize: str = "clean",
        feature_dim: int = 2048,
        clip: dict[str, Any] | None = None,
        stats_dir: str = "fid_stats",
        reference_count: int | None = None,
        reference_crop: str = "centre",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> None:
        if not prompts or not reference:
            raise InputError(
                "callbacks.eval needs eval.prompts (a captions file or shards) and eval.reference "
                "(real images: shards or a folder)"
            )
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
            raise InputError(
                f"callbacks.eval.num_images={num_images!r}: give 2 or more (FID-1k: 1000)"
            )
        if resize not in RESIZES:
            raise InputError(f"eval.resize={resize!r}: choose {', '.join(RESIZES)}")
        if feature_dim not in DIMS:
            raise InputError(
                f"eval.feature_dim={feature_dim!r}: choose {', '.join(map(str, DIMS))}"
            )
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise InputError(
                f"callbacks.eval.every_n_steps={every_n_steps!r}: give a whole number >= 1"
            )
        self.every, self.prompts_source, self.reference_source = every_n_steps, prompts, reference
        self.num_images, self.guidance, self.sampler, self.steps = (
            num_images,
            guidance,
            sampler,
            steps,
        )
        self.seed, self.batch_size = seed, batch_size
        self.inception_option, self.resize, self.feature_dim = inception, resize, feature_dim
        self.clip_options = dict(clip or {})
        self.stats_dir, self.reference_count = stats_dir, reference_count
        self.crop = reference_crop == "centre"
        self.kid = (kid_subsets, kid_subset_size)
        self.last_step = -1  # the last evaluated step (in checkpoints)
        self.ready = False

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", -1))

    # -- hooks -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The metric networks, prompts and reference features: bad input stops before step 1."""
        import os

        device = pl_module.device
        self.inception = InceptionFeatures(
            weights_path(self.inception_option), int(self.feature_dim), self.resize
        ).to(device)
        self.clip = ClipScorer(**self.clip_options).to(device)
        self.prompts = read_prompts(self.prompts_source, int(self.num_images))
        reference = ReferenceSet.of(self.reference_source)
        self.size = int(pl_module._image_size())
        limit = int(self.reference_count) if self.reference_count else None
        key = reference.key(
            size=self.size,
            limit=limit,
            crop=self.crop,
            fid_size=None,
            resize=self.resize,
            dims=int(self.feature_dim),
            inception=self.inception.sha256,
        )
        self.real = reference_features(
            reference,
            self.inception,
            self._gatherer(trainer),
            trainer.global_rank,
            trainer.world_size,
            self.size,
            limit,
            int(self.batch_size),
            os.path.join(str(self.stats_dir), f"{key}.npz"),
            self.crop,
            agree=lambda answer: bool(trainer.strategy.broadcast(bool(answer), 0)),
        )
        if len(self.real) < self.num_images:
            raise InputError(
                f"eval.reference={self.reference_source!r} has {len(self.real)} usable images for "
                f"{self.num_images} generated ones: give more real images or fewer eval images"
            )
        self.real_stats = frechet.Stats.of(self.real)
        if trainer.is_global_zero and self.num_images < self.feature_dim:
            log.info(
                "eval: FID of %d images with %d-d features is a trend to follow, not a number "
                "to compare with papers (stage=eval for those)",
                self.num_images,
                self.feature_dim,
            )
        self.ready = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step  # a resumed run: the step that was due when it stopped
        if step > 0 and step % self.every == 0 and step != self.last_step:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step  # 0 through a first accumulation of gradients: nothing to see
        if step == 0 or step % self.every or step == self.last_step or trainer.should_stop:
            return
        self._evaluate(trainer, pl_module)

    # -- the evaluation ----------------------------------------------------------------------------
    @staticmethod
    def _gatherer(trainer: L.Trainer):
        def all_gather(rows: torch.Tensor, keys: torch.Tensor):
            device = trainer.strategy.root_device
            found, keys = gather.gather_rows(
                trainer.strategy.all_gather, rows.to(device), keys.to(device), trainer.world_size
            )
            return found.cpu(), keys.cpu()

        return all_gather

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.ready:
            return
        step, started = trainer.global_step, time.time()

        def generate(captions: list[str], seeds: list[int]) -> torch.Tensor:
            with trainer.precision_plugin.forward_context():
                return pl_module.sample_images(
                    captions,
                    seeds=seeds,
                    sampler=self.sampler,
                    steps=self.steps,
                    guidance=self.guidance,
                    batch_size=len(captions),
                )

        def stop() -> bool:
            asked = torch.tensor(stopping.requested() is not None, device=pl_module.device)
            return bool(trainer.strategy.reduce_boolean_decision(asked, all=False))

        mine = gather.padded_share(len(self.prompts), trainer.global_rank, trainer.world_size)
        done = measure.measure(
            generate,
            self.inception,
            self.clip,
            self.prompts,
            mine,
            self.seed,
            int(self.batch_size),
            stop=stop,
            adaptive=False,  # a sharded U-Net needs every rank in every forward
        )
        if done is None:
            log.warning(
                "eval at step %d stopped by a stop request; it runs when the run resumes", step
            )
            return
        rows, keys, _ = done
        if not len(rows):
            rows = torch.zeros((0, self.inception.dims + 1))
        found, _ = self._gatherer(trainer)(rows, keys)
        found = found.numpy()
        result = measure.scores(
            self.guidance,
            found[:, :-1],
            found[:, -1].astype(np.float64),
            self.real,
            self.real_stats,
            *self.kid,
            seed=self.seed,
        )
        metrics = {
            f"eval/{k}": float(result[k]) for k in ("fid", "kid", "clip_score", "clip_cosine")
        }
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            log.info(
                "eval at step %d: FID-%d %.3f, CLIP score %.3f (%.0f s)",
                step,
                len(found),
                result["fid"],
                result["clip_score"],
                time.time() - started,
            )
        self.last_step = step
