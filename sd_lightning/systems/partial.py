"""Checkpoints of partial fine-tunes (LoRA, textual inversion, a DreamBooth LoRA): they hold what
trains (and its EMA copy, the latent scale), and the base weights' path and SHA-256, checked
when the checkpoint is resumed onto a base (``pretrained=``)."""

from __future__ import annotations

from typing import Any

from sd_lightning.core.errors import InputError
from sd_lightning.finetune.base import check_base, trained_state


class PartialCheckpointMixin:
    """For the stage-2 system: ``partial`` (the method trains a part) and ``base_reference``
    (set from ``pretrained=``); before the stage mixin in the bases, so its hooks run first."""

    partial: bool = False
    base_reference: dict[str, Any] | None = None

    def partial_extras(self) -> dict[str, Any]:
        return {"base": self.base_reference} if self.partial else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.partial:  # the adapters only: the base weights are pretrained='s
            checkpoint["state_dict"] = trained_state(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if not self.partial:
            return
        check_base(checkpoint["sd_lightning"].get("base"), self.base_reference, "ckpt_path")
        expected = trained_state(self, self.state_dict())
        missing = sorted(set(expected) - set(checkpoint["state_dict"]))
        if missing:
            raise InputError(
                f"ckpt_path lacks {len(missing)} of this fine-tune's trained tensors "
                f"({missing[0]}...): it was written by another finetune= setting"
            )
