"""A batch's conditions for the U-Net: its captions through the text encoder, as SGM's
``GeneralConditioner`` does for its embedders, with the dropout beside the condition it drops.

- Captions are replaced by "" with probability ``caption_dropout`` in training (the
  unconditional model classifier-free guidance needs), drawn from the step's generator.
- Token states come from the batch where ``data=latents`` stored them (``text_states``), from
  a cache on the device when the text encoder is offloaded to the CPU, or from the encoder.
  Where something trains through the encoder (textual inversion's vectors, LoRA adapters on the
  tower), stored states would starve it: captions are then always encoded.
- The outputs are named by where they go (:class:`~sd_lightning.diffusion.conditions.Conditions`):
  ``crossattn`` for the U-Net's cross-attention, ``vector`` for its time embedding (none for
  SD 1/2); the system that asks knows nothing of how many encoders there are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

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
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        caption_dropout: float = 0.1,
        offload: bool = False,
        embeddings: nn.Module | None = None,
        trains_text: bool = False,
    ):
        super().__init__()
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
    def encode(self, captions: Sequence[str]) -> Conditions:
        """The conditions of ``captions`` (sampling, the unconditional "", the training steps)."""
        return Conditions(self._states(list(captions)))

    def _states(self, captions: list[str]) -> torch.Tensor:
        if self.embeddings is not None:  # the trained word's vectors, with gradients
            return self.text(captions, extra=self.embeddings.weight).float()
        if not self.text.offload:
            return self.text(captions).float()
        # on the CPU: each caption encoded once (a folder fine-tune has a few), kept on the device
        new = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if len(self._cache) + len(new) > TEXT_CACHE:
            self._cache.clear()
            new = list(dict.fromkeys(captions))
        if new:
            device = self._device()
            states = self.text(new).float().to(device)
            self._cache.update(zip(new, states))
        return torch.stack([self._cache[c] for c in captions])

    def _device(self) -> torch.device:
        """Where the U-Net runs (this module follows ``.to()``; the offloaded encoder does not)."""
        return self._device_marker.device

    # -- batches ------------------------------------------------------------------------------
    def forward(
        self, batch: dict, generator: torch.Generator | None = None, train: bool = False
    ) -> Conditions:
        """The conditions of a batch: its captions (in training some dropped to ""), their
        states stored with the batch (``text_states``) where they can serve."""
        given = list(batch["caption"])
        captions = self.drop(given, generator) if train else given
        if "text_states" not in batch:
            return self.encode(captions)
        if self.through_encoder:
            if not self._said_states:
                log.info(
                    "data=latents: the stored text_states are not used, the text encoder trains "
                    "(finetune.text_encoder=true or textual inversion): captions are encoded in "
                    "every step"
                )
                self._said_states = True
            return self.encode(captions)
        states = batch["text_states"].float().clone()
        dropped = [i for i, (c, g) in enumerate(zip(captions, given)) if c == "" and g != ""]
        if dropped:
            states[dropped] = self.encode([""]).crossattn.to(states)
        return Conditions(states)

    def drop(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """Each caption replaced by "" with probability ``caption_dropout``."""
        if self.caption_dropout <= 0:
            return captions
        device = generator.device if generator is not None else "cpu"
        drop = torch.rand(len(captions), generator=generator, device=device) < self.caption_dropout
        return ["" if d else c for c, d in zip(captions, drop.tolist())]
