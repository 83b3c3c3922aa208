"""Textual-inversion embeddings in the files other tools load, and back.

Written: AUTOMATIC1111's ``<name>.safetensors`` (one tensor ``emb_params``, ``(vectors, width)``;
the prompt word is the file's name) and diffusers' ``learned_embeds.safetensors``
(``{token: (vectors, width)}``, what ``pipe.load_textual_inversion`` reads). For SDXL's two text
encoders: ``<name>.safetensors`` with ``clip_l`` and ``clip_g`` (what AUTOMATIC1111, ComfyUI and
kohya's scripts write and read), and diffusers' ``learned_embeds.safetensors`` and
``learned_embeds_2.safetensors`` (one per encoder, as its SDXL script saves them).
Read (``stage=sample embeddings=[...]``): any of these, the word being diffusers' key or the
file's name; pickled ``.pt``/``.bin`` embeddings are refused with how to convert them.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from sd_lightning.core.errors import InputError


def file_name(token: str) -> str:
    """A file name for ``token`` that AUTOMATIC1111 turns back into a prompt word."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "embedding"


SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's embeddings: CLIP ViT-L's vectors, OpenCLIP bigG's


def embedding_files(
    token: str, vectors: torch.Tensor, widths: list[int] | None = None
) -> dict[str, Any]:
    """``{stem: (tensors, metadata)}`` of the formats; ``widths``: the vectors are SDXL's two
    encoders' side by side (CLIP-L's, then bigG's)."""
    meta = {"token": token, "vectors": str(vectors.shape[0]), "format": "textual_inversion"}
    vectors = vectors.contiguous()
    name = file_name(token)
    if widths is not None:
        parts = [v.contiguous() for v in vectors.split(list(widths), dim=1)]
        return {
            name: (dict(zip(SDXL_KEYS, parts)), {**meta, "name": name}),
            "learned_embeds": ({token: parts[0].clone()}, meta),
            "learned_embeds_2": ({token: parts[1].clone()}, meta),
        }
    return {
        name: ({"emb_params": vectors}, {**meta, "name": name}),
        "learned_embeds": ({token: vectors.clone()}, meta),
    }


def read_embedding(path: str, option: str = "embeddings") -> tuple[str, torch.Tensor]:
    """``(word, vectors (n, width))`` from an A1111 or diffusers embedding file."""
    if not os.path.isfile(path):
        raise InputError(f"{option}: {path!r} does not exist (a .safetensors embedding)")
    if not path.endswith(".safetensors"):
        raise InputError(
            f"{option}: {path!r} is not a .safetensors file; pickled embeddings (.pt, .bin) are "
            'not read. Convert it where you trust it: python -c "import torch, safetensors.torch '
            "as s; d = torch.load('x.pt'); p = d['string_to_param'] if 'string_to_param' in d "
            "else d; s.save_file({'emb_params': next(iter(p.values())).float().contiguous()}, "
            "'x.safetensors')\""
        )
    from sd_lightning.weights.files import read_weight_file

    found = read_weight_file(path, option, "a textual-inversion embedding (.safetensors)")
    if found.kind != "safetensors":
        raise InputError(f"{option}: {path!r} is not a safetensors file (a torch checkpoint)")
    state, meta = found.tensors(), found.metadata
    stem = os.path.splitext(os.path.basename(path))[0]
    # the word is the file's name (AUTOMATIC1111); ours keep the token it was trained as
    token = meta.get("token")
    named = token if token and file_name(token) == stem else stem
    if set(SDXL_KEYS) <= set(state):  # SDXL's: both encoders' vectors, side by side
        parts = [state[k].float() for k in SDXL_KEYS]
        parts = [p[None] if p.dim() == 1 else p for p in parts]
        if parts[0].dim() != 2 or parts[1].dim() != 2 or len(parts[0]) != len(parts[1]):
            raise InputError(
                f"{option}: {path!r}: clip_l {tuple(parts[0].shape)} and clip_g "
                f"{tuple(parts[1].shape)} are not the same number of vectors"
            )
        word, vectors = named, torch.cat(parts, dim=1)
    elif "emb_params" in state:
        word, vectors = named, state["emb_params"]
    elif len(state) == 1:
        word, vectors = next(iter(state.items()))
    else:
        raise InputError(
            f"{option}: {path!r} holds {len(state)} tensors ({', '.join(list(state)[:4])}): an "
            "embedding file holds one (emb_params, or the token's name), or SDXL's clip_l and "
            "clip_g"
        )
    vectors = vectors.float()
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    if vectors.dim() != 2 or not len(vectors) or not vectors.shape[1]:
        raise InputError(
            f"{option}: {path!r} holds a tensor of shape {tuple(vectors.shape)}: an embedding "
            "is (vectors, width) with at least one vector"
        )
    if not torch.isfinite(vectors).all():
        raise InputError(f"{option}: {path!r}: the vectors hold NaN or infinite values")
    return word, vectors


def load_embeddings(text_encoder: torch.nn.Module, paths: Any) -> list[str]:
    """Add every embedding of ``paths`` to ``text_encoder``; returns their words."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    words = []
    for path in paths:
        word, vectors = read_embedding(str(path))
        width = getattr(text_encoder, "width", vectors.shape[1])
        if vectors.shape[1] != width:
            family = {768: " (SD 1's)", 1024: " (SD 2's)", 2048: " (SDXL's clip_l + clip_g)"}
            raise InputError(
                f"embeddings: {path}: {len(vectors)} vector(s) of {vectors.shape[1]} numbers"
                f"{family.get(vectors.shape[1], '')}, but this text encoder's width is {width}"
                f"{family.get(width, '')}: an embedding of another family, which this model "
                "cannot read"
            )
        try:
            text_encoder.add_embedding(word, len(vectors), vectors)
        except ValueError as e:
            raise InputError(
                f"embeddings: {path}: {e}; rename the file (AUTOMATIC1111's: the word is its "
                "name) or its tensor (diffusers': the word is its key)"
            ) from e
        words.append(word.lower())
    return words
