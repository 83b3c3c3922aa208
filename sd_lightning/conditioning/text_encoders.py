"""Several text encoders read side by side: SDXL's CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (SGM's
``GeneralConditioner`` with two text embedders). Each tokenizes and pads the caption its own way;
their token states are concatenated along the width (768 + 1280 = SDXL's 2048-d context), and the
one that pools gives the pooled vector (bigG's 1280).

``text_encoder=sdxl`` builds it from OpenCLIP's tags, ``pretrained=<SDXL weights>`` from the
file's or folder's own two (:func:`sd_text_encoder_config`), ``text_encoder=sdxl_tiny`` from two
small random towers (the demo and the tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sd_lightning.core.errors import InputError

TEXT_ENCODER = "sd_lightning.conditioning.OpenCLIPTextEncoder"


class TextEncoders(nn.Module):
    """``encoders(captions) -> (batch, tokens, sum of widths)``; :meth:`encode` adds the pooled
    vector of the one encoder built with ``pooled=True``. ``encoders``: in order, as a list or
    as named entries (``text_encoder.encoders.clip_g.pretrained=...`` on the command line)."""

    def __init__(self, encoders: Sequence[nn.Module] | Mapping[str, nn.Module]):
        super().__init__()
        encoders = list(encoders.values() if isinstance(encoders, Mapping) else encoders)
        if len(encoders) < 2:
            raise InputError("text_encoder.encoders: give two or more text encoders (SDXL: two)")
        lengths = {e.context_length for e in encoders}
        if len(lengths) != 1:
            raise InputError(
                f"text_encoder.encoders have context lengths {sorted(lengths)}: their token "
                "states are joined token by token, so they must agree (SDXL: 77)"
            )
        pooling = [i for i, e in enumerate(encoders) if getattr(e, "pooled", False)]
        if len(pooling) > 1:
            raise InputError(
                f"text_encoder.encoders {pooling} all pool: set pooled=true on one (SDXL: the "
                "second, OpenCLIP ViT-bigG/14)"
            )
        self.encoders = nn.ModuleList(encoders)
        self.pooling = pooling[0] if pooling else None
        self.width = sum(e.width for e in encoders)
        self.context_length = lengths.pop()
        self.pooled_dim = encoders[self.pooling].pooled_dim if pooling else None
        self.random = all(getattr(e, "random", False) for e in encoders)

    @property
    def trains(self) -> bool:
        return any(getattr(e, "trains", False) for e in self.encoders)

    @property
    def widths(self) -> list[int]:
        return [e.width for e in self.encoders]

    # -- new words (textual inversion): in every encoder, their vectors side by side ---------------
    @property
    def tokenizer(self):
        """The first encoder's tokenizer (SDXL's two share the BPE and the added words)."""
        return self.encoders[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.encoders[0].vocab_size

    def expand(self, captions: Sequence[str]) -> list[str]:
        return self.encoders[0].expand(captions)

    def add_embedding(self, name: str, count: int = 1, rows: torch.Tensor | None = None):
        """The word in every encoder; ``rows``: ``(count, sum of widths)``, each encoder's
        vectors side by side in order (SDXL: CLIP-L's 768, then bigG's 1280)."""
        parts = [None] * len(self.encoders) if rows is None else rows.split(self.widths, dim=1)
        ids = [e.add_embedding(name, count, part) for e, part in zip(self.encoders, parts)]
        return ids[0]

    def token_rows(self, ids: list[int]) -> torch.Tensor:
        """The embedding rows of token ``ids``, every encoder's side by side."""
        return torch.cat([e.token_rows(ids) for e in self.encoders], dim=1)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode(captions)[0]

    def encode(
        self, captions: Sequence[str], extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(token states, pooled vector or None)`` of ``captions``; ``extra``: trained words'
        vectors, ``(vectors, sum of widths)``, split among the encoders."""
        extras = [None] * len(self.encoders) if extra is None else extra.split(self.widths, 1)
        outputs = [e.encode(captions, x) for e, x in zip(self.encoders, extras)]
        states = torch.cat([s.float() for s, _ in outputs], dim=-1)
        pooled = None if self.pooling is None else outputs[self.pooling][1].float()
        return states, pooled


def sd_text_encoder_config(path: str, components: Sequence[str]) -> dict[str, Any]:
    """The ``text_encoder`` config of SD weights' own text encoder(s): one for SD 1/2, SDXL's
    two (``text_encoder``, and ``text_encoder_2`` pooled) joined."""
    one = [
        {
            "_target_": TEXT_ENCODER,
            "pretrained": path,
            "layer": "auto",
            "component": c,
            "pooled": c == "text_encoder_2",
        }
        for c in components
    ]
    if len(one) == 1:
        return {k: v for k, v in one[0].items() if k not in ("component", "pooled")}
    return {"_target_": "sd_lightning.conditioning.TextEncoders", "encoders": one}


def sd_text_encoder(path: str, components: Sequence[str]) -> nn.Module:
    """SD weights' own text encoder(s), built from :func:`sd_text_encoder_config`."""
    from sd_lightning.conditioning.text_encoder import OpenCLIPTextEncoder

    config = sd_text_encoder_config(path, components)
    nodes = config.get("encoders", [config])
    built = [OpenCLIPTextEncoder(**{k: v for k, v in n.items() if k != "_target_"}) for n in nodes]
    return built[0] if "encoders" not in config else TextEncoders(built)
