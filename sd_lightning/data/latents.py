"""Precomputed latents: the sample format ``stage=encode`` writes and ``data=latents`` reads.

One sample per image: ``<key>.mean.npy`` and ``<key>.logvar.npy`` (the frozen VAE's posterior,
unscaled, ``(C, h, w)``), ``<key>.txt`` (the caption), optionally ``<key>.text.npy`` (the frozen
text encoder's token states, ``(L, D)``) and ``<key>.pooled.npy`` (SDXL's pooled text vector),
and ``<key>.json`` (source key; the original size, crop and target size the image was cropped
with, SDXL's micro-conditioning). Arrays are ``.npy`` written and read with
``allow_pickle=False``: nothing is unpickled from data.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from sd_lightning.core.errors import InputError
from sd_lightning.data.datamodule import WebDataModule
from sd_lightning.data.pipeline import Skip, caption_of


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


FIELDS = ("original_size", "crop_top_left", "target_size")  # the crop's geometry, kept


class LatentSampleDecoder:
    """A latent sample -> ``{"latent_mean", "latent_logvar", "caption"[, "text_states",
    "text_pooled", "repa_features"]}`` and the crop's geometry where the shard kept it."""

    def __init__(self, text_states: bool = True):
        self.text_states = text_states

    def __call__(self, sample: dict, rng: Any = None) -> dict[str, Any]:
        if "mean.npy" not in sample or "logvar.npy" not in sample:
            raise Skip("no_image")
        out = {
            "latent_mean": load_npy(sample["mean.npy"]),
            "latent_logvar": load_npy(sample["logvar.npy"]),
            "caption": caption_of(sample),
        }
        if self.text_states:
            if "text.npy" not in sample:
                raise InputError(
                    "latent shard has no text.npy: encode with encode_text=true, or train with "
                    "data.text_states=false (the text encoder then runs on the captions)"
                )
            out["text_states"] = load_npy(sample["text.npy"])
            if "pooled.npy" in sample:
                out["text_pooled"] = load_npy(sample["pooled.npy"])
        if "repa.npy" in sample:  # stage=encode repa=urepa: the aligned encoder's features
            out["repa_features"] = load_npy(sample["repa.npy"])
        if "json" in sample:
            record = json.loads(sample["json"])
            out.update({f: torch.tensor(record[f]) for f in FIELDS if f in record})
        return out


class LatentDataModule(WebDataModule):
    """:class:`WebDataModule` over latent shards (``stage=encode`` output): the same URL forms,
    modes, weights, epoch lengths and skip counting; batches hold latents instead of images.

    Args:
        text_states: use the precomputed text states (``False``: encode the captions online).
        image_size: the image size the latents were encoded at (validation sample grids).
        Others as :class:`WebDataModule`.
    """

    def __init__(self, urls: str | list[str], text_states: bool = True, **kwargs: Any):
        if urls is None:
            raise InputError(
                "data=latents needs data.urls: the shards written by stage=encode "
                "(e.g. data.urls='/data/latents/{000000..000099}.tar')"
            )
        super().__init__(urls=urls, **kwargs)
        self.text_states = text_states

    def sample_decoder(self, train: bool) -> LatentSampleDecoder:
        return LatentSampleDecoder(self.text_states)
