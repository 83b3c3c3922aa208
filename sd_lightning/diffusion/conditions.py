"""What a denoiser is conditioned on, named by where it goes: ``crossattn``, the token states its
cross-attention reads, and ``vector``, one vector per sample that the U-Net adds to its time
embedding (SDXL's pooled text and size embeddings, a class label's), ``None`` where the model
takes none. The conditioner (:mod:`sd_lightning.conditioning`) makes them; the samplers and the
loss only pass them on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditions:
    crossattn: torch.Tensor  # (batch, tokens, width)
    vector: torch.Tensor | None = None  # (batch, adm_in_channels)

    def __len__(self) -> int:
        return len(self.crossattn)

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The U-Net's keyword arguments: ``context`` and, where there is one, ``y``."""
        out = {"context": self.crossattn}
        if self.vector is not None:
            out["y"] = self.vector
        return out

    def to(self, *args, **kwargs) -> Conditions:
        vector = self.vector.to(*args, **kwargs) if self.vector is not None else None
        return Conditions(self.crossattn.to(*args, **kwargs), vector)

    @staticmethod
    def cat(parts: list[Conditions]) -> Conditions:
        vectors = [p.vector for p in parts]
        vector = None if vectors[0] is None else torch.cat(vectors)
        return Conditions(torch.cat([p.crossattn for p in parts]), vector)


def as_conditions(value: torch.Tensor | Conditions) -> Conditions:
    """Token states alone (an encoder's output) as :class:`Conditions`."""
    return value if isinstance(value, Conditions) else Conditions(value)
