"""Fine-tuning methods applied inside the stage-2 system (``finetune=`` config group): what
trains, what the optimizer sees, what a checkpoint holds and what is exported.

- ``none``: the whole U-Net trains.
- ``lora`` (:mod:`.lora`): adapters on the U-Net, saved and exported on their own
  (:mod:`.lora_files`: kohya's and diffusers' files).
- ``dreambooth`` (:mod:`.dreambooth`): a subject from a folder of photos, the whole U-Net or a
  LoRA, with prior preservation from class images the base model generates once.
- ``textual_inversion`` (:mod:`.textual_inversion`): a new word's vectors in the frozen text
  encoder (:mod:`.embedding_files`: AUTOMATIC1111's and diffusers' embeddings).

Partial methods (LoRA, textual inversion) keep a reference to the base weights (:mod:`.base`).
A method is a plain object: ``apply(unet)``, optionally ``embeddings(text_encoder)``,
``prepare(system)`` (before the first batch), ``files(system, net, state)`` (the export).
"""

from sd_lightning.finetune.dreambooth import DreamBooth
from sd_lightning.finetune.lora import LoRA
from sd_lightning.finetune.textual_inversion import TextualInversion

__all__ = ["DreamBooth", "LoRA", "TextualInversion"]
