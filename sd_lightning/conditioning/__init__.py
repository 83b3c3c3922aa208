"""What the U-Net is conditioned on: the text encoders (tokenizers, padding, the layer read,
added words), and the conditioner that turns a batch into its conditions (caption dropout,
stored or cached text states, trained embeddings), token states for cross-attention and an
optional vector added to the time embedding."""

from sd_lightning.conditioning.conditioner import Conditioner
from sd_lightning.conditioning.text_encoder import OpenCLIPTextEncoder
from sd_lightning.conditioning.text_encoders import TextEncoders

__all__ = ["Conditioner", "OpenCLIPTextEncoder", "TextEncoders"]
