"""DreamBooth (Ruiz et al. 2022): a subject from a few photos bound to a rare word
(``a photo of sks dog``), the whole U-Net or a LoRA trained on them, with prior preservation.

Prior preservation: before the first step, the base model itself generates ``num_class_images``
images of the class (``class_prompt``, ``a photo of a dog``) through our own sampler, cached on
disk under a key of the base weights, the prompt, the size and the sampler (a second run, or a
resumed one, reuses them). They join the folder's epoch as often as the instance images, their
loss weighted by ``prior_loss_weight``, so the class keeps its look while the subject is learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
from torch import nn

from sd_lightning.core import stopping
from sd_lightning.core.errors import InputError
from sd_lightning.data.images import to_uint8
from sd_lightning.finetune.lora import LoRA
from sd_lightning.models.parallel import is_sharded

log = logging.getLogger(__name__)

SAMPLER = {"sampler": "ddim", "steps": 25, "guidance": 7.5}


class DreamBooth:
    """``finetune=dreambooth``.

    Args:
        instance_prompt: the caption of the subject's photos, with the rare word
            (``a photo of sks dog``).
        class_prompt: the class without the word (``a photo of a dog``); ``None``: no prior
            preservation.
        prior_loss_weight: the class images' loss weight (1.0 as in the paper; 0: no prior).
        num_class_images: class images to generate once and reuse.
        class_dir: where they are cached (a subfolder per base, prompt, size and sampler).
        base: the base weights' path (``pretrained=``), part of the cache key.
        sampler: how class images are sampled (``sampler``, ``steps``, ``guidance``...).
        lora: ``None`` trains the whole U-Net; LoRA's options (``{rank: 16}``) train a LoRA.
    """

    def __init__(
        self,
        instance_prompt: str = "a photo of sks dog",
        class_prompt: str | None = None,
        prior_loss_weight: float = 1.0,
        num_class_images: int = 100,
        class_dir: str = "data/dreambooth",
        base: str | None = None,
        sampler: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ):
        if not instance_prompt:
            raise InputError("finetune.instance_prompt is empty: give e.g. 'a photo of sks dog'")
        if prior_loss_weight < 0:
            raise InputError(f"finetune.prior_loss_weight={prior_loss_weight} must be >= 0")
        if class_prompt and num_class_images < 1:
            raise InputError(
                f"finetune.num_class_images={num_class_images}: give at least 1, or "
                "finetune.class_prompt=null for no prior preservation"
            )
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt or None
        self.prior_loss_weight, self.num_class_images = float(prior_loss_weight), num_class_images
        self.class_dir, self.base = class_dir, base
        self.sampler = {**SAMPLER, **dict(sampler or {})}
        self.lora = LoRA(**dict(lora)) if lora else None
        self.partial = self.lora is not None  # a LoRA's checkpoints hold the adapters only
        self.rank = self.lora.rank if self.lora else None
        self.alpha = self.lora.alpha if self.lora else None
        self.readers = self.lora.readers if self.lora else {}

    @property
    def prior(self) -> bool:
        return self.class_prompt is not None and self.prior_loss_weight > 0

    def apply(self, unet: nn.Module) -> nn.Module:
        what = f"a LoRA (rank {self.lora.rank})" if self.lora else "the whole U-Net"
        prior = (
            f"prior preservation with {self.num_class_images} images of {self.class_prompt!r} "
            f"(weight {self.prior_loss_weight:g})"
            if self.prior
            else "no prior preservation"
        )
        log.info("finetune: DreamBooth of %r, training %s; %s", self.instance_prompt, what, prior)
        return self.lora.apply(unet) if self.lora else unet

    def adapt_text(self, text_encoder: nn.Module) -> nn.Module | None:
        """A LoRA with ``text_encoder: true`` adapts the text encoder too."""
        return self.lora.adapt_text(text_encoder) if self.lora else None

    @property
    def unshardable(self) -> str | None:
        return getattr(self.lora, "unshardable", None)

    def files(self, system: nn.Module, net: nn.Module, state: dict) -> dict[str, Any] | None:
        return self.lora.files(system, net, state) if self.lora else None

    # -- class images --------------------------------------------------------------------------
    def class_folder(self, image_size: int) -> str:
        base = os.path.abspath(self.base) if self.base else "none"
        stat = os.stat(self.base) if self.base and os.path.exists(self.base) else None
        key = [base, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0]
        key += [self.class_prompt, image_size, self.sampler]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        slug = "".join(c if c.isalnum() else "_" for c in self.class_prompt.lower())[:40]
        return os.path.join(self.class_dir, f"{slug}-{digest}")

    def prepare(self, system: Any) -> None:
        """Class images generated (the missing ones) and given to the data as its prior set."""
        if not self.prior:
            return
        trainer = system.trainer
        data = trainer.datamodule
        if not hasattr(data, "set_prior"):
            raise InputError(
                "finetune=dreambooth with prior preservation needs data=folder (the instance "
                "photos); or set finetune.class_prompt=null"
            )
        folder = self.class_folder(int(data.image_size))
        names = [f"{i:05d}.png" for i in range(self.num_class_images)]
        # rank 0 decides what is missing and tells the others: every rank then agrees on the
        # split and meets the same barrier
        missing = [i for i, n in enumerate(names) if not os.path.isfile(os.path.join(folder, n))]
        missing = trainer.strategy.broadcast(missing, src=0)
        if missing and trainer.ckpt_path is not None:
            raise InputError(
                f"{len(missing)} class images are missing from {folder} in a resumed run: they "
                "come from the base model before training; restore them or start the run again"
            )
        if missing:
            self._generate(system, folder, names, missing, int(data.image_size))
        absent = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if absent:
            raise InputError(
                f"{len(absent)} class images ({absent[0]}...) are not in {folder} on this node: "
                "the ranks split the generation, so finetune.class_dir must be a folder every "
                "node shares"
            )
        data.set_prior(folder, self.class_prompt, self.prior_loss_weight)

    def _generate(self, system, folder: str, names: list[str], missing: list[int], size: int):
        from PIL import Image

        trainer = system.trainer
        os.makedirs(folder, exist_ok=True)
        sharded = is_sharded(system.unet)  # every rank runs every forward, rank 0 writes
        mine = missing if sharded else missing[trainer.global_rank :: trainer.world_size]
        write = trainer.is_global_zero or not sharded
        log.info(
            "dreambooth: %d class images of %r with the base model (%s, %d steps) into %s",
            len(missing),
            self.class_prompt,
            self.sampler["sampler"],
            self.sampler["steps"],
            folder,
        )
        cuda = system.device.type == "cuda"
        batch = int(self.sampler.get("batch_size", 8))
        for start in range(0, len(mine), batch):
            if start and trainer.is_global_zero:
                log.info("dreambooth: %d of %d class images", start, len(mine))
            chunk = mine[start : start + batch]
            with torch.autocast(system.device.type, torch.bfloat16, enabled=cuda):
                images = system.sample_images(
                    [self.class_prompt] * len(chunk),
                    seeds=chunk,
                    image_size=size,
                    callback=lambda _: stopping.check("DreamBooth's class images"),
                    **self.sampler,
                )
            if write:
                for i, image in zip(chunk, images):
                    path = os.path.join(folder, names[i])
                    pixels = to_uint8(image.float()).permute(1, 2, 0).cpu().numpy()
                    Image.fromarray(pixels).save(path + ".part", format="PNG")
                    os.replace(path + ".part", path)  # a crash leaves no half image
        trainer.strategy.barrier("dreambooth-class-images")
