"""Textual-inversion embeddings in the files other tools load, and back.

Written: AUTOMATIC1111's ``<name>.safetensors`` (one tensor ``emb_params``, ``(vectors, width)``;
the prompt word is the file's name) and diffusers' ``learned_embeds.safetensors``
(``{token: (vectors, width)}``, what ``pipe.load_textual_inversion`` reads).
Read (``stage=sample embeddings=[...]``): either, the word being diffusers' key or A1111's file
name; pickled ``.pt``/``.bin`` embeddings are refused with how to convert them.
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


def embedding_files(token: str, vectors: torch.Tensor) -> dict[str, Any]:
    """``{stem: (tensors, metadata)}`` of the two formats."""
    meta = {"token": token, "vectors": str(vectors.shape[0]), "format": "textual_inversion"}
    vectors = vectors.contiguous()
    return {
        file_name(token): ({"emb_params": vectors}, {**meta, "name": file_name(token)}),
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
    if "emb_params" in state:
        # the word is the file's name (AUTOMATIC1111); ours keep the token it was trained as
        token = meta.get("token")
        word = token if token and file_name(token) == stem else stem
        vectors = state["emb_params"]
    elif len(state) == 1:
        word, vectors = next(iter(state.items()))
    else:
        raise InputError(
            f"{option}: {path!r} holds {len(state)} tensors ({', '.join(list(state)[:4])}): an "
            "embedding file holds one (emb_params, or the token's name). SDXL's two-encoder "
            "embeddings (clip_l, clip_g) are not supported yet"
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
    if paths and not hasattr(text_encoder, "add_embedding"):
        raise InputError(
            f"embeddings={[str(p) for p in paths]}: this model's text encoders "
            f"({type(text_encoder).__name__}, SDXL's two) take no embeddings yet"
        )
    words = []
    for path in paths:
        word, vectors = read_embedding(str(path))
        width = getattr(text_encoder, "width", vectors.shape[1])
        if vectors.shape[1] != width:
            family = {768: " (SD 1's)", 1024: " (SD 2's)"}
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
