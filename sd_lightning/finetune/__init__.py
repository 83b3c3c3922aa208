"""Fine-tuning methods applied inside the stage-2 system (``finetune=`` config group): what
trains, what the optimizer sees, what a checkpoint holds. ``finetune=none`` trains the whole
U-Net; ``finetune=lora`` adapters on it (:mod:`.lora`), saved and exported on their own
(:mod:`.lora_files`), with a reference to the base weights (:mod:`.base`)."""

from sd_lightning.finetune.lora import LoRA

__all__ = ["LoRA"]
