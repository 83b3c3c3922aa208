"""A batch's conditions for the U-Net: its captions through the text encoder(s), as SGM's
``GeneralConditioner`` does for its embedders, with the dropout beside the condition it drops.

- Captions are replaced by "" with probability ``caption_dropout`` in training (the
  unconditional model classifier-free guidance needs), drawn from the step's generator.
- Token states come from the batch where ``data=latents`` stored them (``text_states``, and
  ``text_pooled`` for SDXL), from a cache on the device when the text encoder is offloaded to the
  CPU, or from the encoder. Where something trains through the encoder (textual inversion's
  vectors, LoRA adapters on the tower), stored states would starve it: captions are then always
  encoded.
- A U-Net with a vector condition (``adm_in_channels``, SDXL) also gets ``vector``: the pooled
  text and the size embeddings (:mod:`.sizes`) of the batch's original size, crop and target
  size. Such models learn the unconditional as zeros (SGM zeroes a dropped caption's states and
  pooled vector; diffusers' ``force_zeros_for_empty_prompt``): "" is zeros there, in training
  and in sampling alike.
- The outputs are named by where they go (:class:`~sd_lightning.diffusion.conditions.Conditions`):
  ``crossattn`` for the U-Net's cross-attention, ``vector`` for its time embedding (none for
  SD 1/2); the system that asks knows nothing of how many encoders there are.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch
from torch import nn

from sd_lightning.conditioning.sizes import sampling_ids, size_embedding, size_ids
from sd_lightning.core.errors import InputError
from sd_lightning.diffusion.conditions import Conditions
from sd_lightning.models.frozen import Frozen

log = logging.getLogger(__name__)

TEXT_CACHE = 4096  # captions whose states an offloaded text encoder keeps


class Conditioner(nn.Module):
    """``conditioner(batch, generator, train) -> Conditions``; ``conditioner.encode(prompts)``
    for sampling.

    Args:
        text_encoder: the frozen text encoder (``captions -> (batch, tokens, width)``).
        caption_dropout: probability of replacing a training caption by "".
        offload: keep the text encoder on the CPU, its states cached per caption on the device.
        embeddings: trained vectors of new words (textual inversion), passed to the encoder; held
            (registered, saved) by the caller, not here.
        trains_text: the encoder's own adapters train (LoRA on the text tower).
        vector_dim: the width of the U-Net's vector condition (``adm_in_channels``; SDXL: 2816 =
            the encoder's pooled 1280 + 6 size embeddings of 256), ``None`` for none.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        caption_dropout: float = 0.1,
        offload: bool = False,
        embeddings: nn.Module | None = None,
        trains_text: bool = False,
        vector_dim: int | None = None,
    ):
        super().__init__()
        self.size_dim = _size_dim(text_encoder, vector_dim)
        self.vector = vector_dim is not None
        if not 0.0 <= caption_dropout < 1.0:
            raise InputError(f"model.caption_dropout must be in [0, 1), got {caption_dropout}")
        trained = "textual inversion trains through it" if embeddings is not None else None
        trained = trained or (
            "its LoRA trains (finetune.text_encoder=true)" if trains_text else None
        )
        if offload and trained:
            raise InputError(
                f"model.offload_text_encoder=true keeps the text encoder on the CPU, but {trained}:"
                " set model.offload_text_encoder=false"
            )
        self.text = Frozen(text_encoder, offload=offload)
        self.caption_dropout = caption_dropout
        object.__setattr__(self, "embeddings", embeddings)  # the caller's parameter, not ours
        self.trains_text = trains_text
        self._cache: dict[str, torch.Tensor] = {}
        self._said_states = False
        # follows .to() as the U-Net does (the offloaded encoder stays): where states belong
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder itself (its tokenizer, added words, tower)."""
        return self.text.net

    @property
    def width(self) -> int:
        """The token states' width: what the U-Net's ``context_dim`` must be."""
        return self.text.net.width

    @property
    def through_encoder(self) -> bool:
        """Something trains through the encoder: captions must be encoded every step."""
        return self.embeddings is not None or self.trains_text

    # -- prompts ------------------------------------------------------------------------------
    def encode(
        self,
        captions: Sequence[str],
        size: Sequence[int] | None = None,
        original: Sequence[int] | None = None,
        crop: Sequence[int] = (0, 0),
    ) -> Conditions:
        """The conditions of ``captions`` for sampling (and the unconditional ""): a vector
        condition's sizes are those of an image of ``size`` (height, width), or ``original``
        and ``crop`` where given (see :func:`~.sizes.sampling_ids`)."""
        if not self.vector:
            return Conditions(self._states(list(captions))[0])
        if size is None:
            raise ValueError("this model conditions on image sizes: give size=(height, width)")
        ids = sampling_ids(len(captions), size, original, crop, self._device())
        return self._conditions(list(captions), ids)

    def _conditions(self, captions: list[str], ids: torch.Tensor | None, stored=None):
        """Conditions from captions (or their ``stored`` states and pooled vectors) and, for a
        vector condition, the ``(n, 6)`` size ids."""
        states, pooled = stored if stored is not None else self._states(captions)
        if not self.vector:
            return Conditions(states)
        empty = torch.tensor([c == "" for c in captions], device=states.device)
        if empty.any():  # the unconditional of a pooled-text model: zeros
            states = torch.where(empty[:, None, None], 0.0, states)
            pooled = torch.where(empty[:, None], 0.0, pooled)
        sizes = size_embedding(ids.to(pooled.device), self.size_dim).to(pooled)
        return Conditions(states, torch.cat([pooled, sizes], dim=1))

    def _states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.embeddings is not None:  # the trained word's vectors, with gradients
            states, pooled = self.text.net.encode(captions, extra=self.embeddings.weight)
            return states.float(), pooled
        if not self.text.offload:
            return self._encoded(captions)
        # on the CPU: each caption encoded once (a folder fine-tune has a few), kept on the device
        new = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if len(self._cache) + len(new) > TEXT_CACHE:
            self._cache.clear()
            new = list(dict.fromkeys(captions))
        if new:
            device = self._device()
            states, pooled = self._encoded(new)
            pooled = [None] * len(new) if pooled is None else pooled.to(device)
            self._cache.update(zip(new, zip(states.to(device), pooled)))
        cached = [self._cache[c] for c in captions]
        pooled = None if cached[0][1] is None else torch.stack([p for _, p in cached])
        return torch.stack([s for s, _ in cached]), pooled

    def _encoded(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = self.text.net.encode(captions)
        return states.float(), None if pooled is None else pooled.float()

    def _device(self) -> torch.device:
        """Where the U-Net runs (this module follows ``.to()``; the offloaded encoder does not)."""
        return self._device_marker.device

    # -- batches ------------------------------------------------------------------------------
    def forward(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        train: bool = False,
        size: Sequence[int] | None = None,
    ) -> Conditions:
        """The conditions of a batch: its captions (in training some dropped to ""), their
        states stored with the batch (``text_states``) where they can serve; a vector
        condition's sizes from the batch, or those of a square ``size`` crop."""
        given = list(batch["caption"])
        captions = self.drop(given, generator) if train else given
        ids = None
        if self.vector:
            ids = size_ids(batch, len(given), size or (0, 0), self._device())
        if "text_states" not in batch:
            return self._conditions(captions, ids)
        if self.through_encoder:
            if not self._said_states:
                log.info(
                    "data=latents: the stored text_states are not used, the text encoder trains "
                    "(finetune.text_encoder=true or textual inversion): captions are encoded in "
                    "every step"
                )
                self._said_states = True
            return self._conditions(captions, ids)
        pooled = batch.get("text_pooled")
        if self.vector and pooled is None:
            raise InputError(
                "these latent shards store token states without SDXL's pooled text (text_pooled): "
                "write them again with stage=encode and this text encoder, or set "
                "data.text_states=false"
            )
        states = batch["text_states"].float().clone()
        pooled = None if pooled is None else pooled.float().clone()
        dropped = [i for i, (c, g) in enumerate(zip(captions, given)) if c == "" and g != ""]
        if dropped and not self.vector:  # (a vector model's "" is zeros: _conditions)
            states[dropped] = self._states([""])[0].to(states)
        return self._conditions(captions, ids, (states, pooled))

    def drop(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """Each caption replaced by "" with probability ``caption_dropout``."""
        if self.caption_dropout <= 0:
            return captions
        if generator is None:  # the global generator (outside a training step)
            draws = torch.rand(len(captions)).tolist()
        else:  # on the host, from the step's seed: a GPU draw read back makes the host wait
            host = random.Random(generator.initial_seed())
            draws = [host.random() for _ in captions]
        return ["" if d < self.caption_dropout else c for c, d in zip(captions, draws)]


def _size_dim(text_encoder: nn.Module, vector_dim: int | None) -> int:
    """The width of each size embedding: what the U-Net's vector condition leaves after the
    pooled text, in six equal parts (SDXL: (2816 - 1280) / 6 = 256)."""
    if vector_dim is None:
        return 0
    pooled = getattr(text_encoder, "pooled_dim", None)
    if not pooled:
        raise InputError(
            f"the U-Net takes a {vector_dim}-d vector condition (unet.adm_in_channels, SDXL's "
            "pooled text and sizes) but the text encoder gives no pooled vector: use "
            "text_encoder=sdxl (or sdxl_tiny), or unet.adm_in_channels=null"
        )
    rest = vector_dim - pooled
    if rest <= 0 or rest % 6 or (rest // 6) % 2:
        raise InputError(
            f"unet.adm_in_channels={vector_dim} is the pooled text ({pooled}) + 6 size "
            f"embeddings of one even width: {vector_dim} - {pooled} = {rest} is not 6 x an even "
            f"number (SDXL: 2816 = 1280 + 6 x 256)"
        )
    return rest // 6
