"""Stable Diffusion's text encoders as OpenCLIP ``TextTransformer`` weights and shape:
SD 1.x's CLIP ViT-L/14 (transformers names: ``cond_stage_model.transformer.text_model.*`` in single
files, ``text_encoder/`` in diffusers folders; quick-GELU, prompts padded with the end-of-text
token) and SD 2.x's OpenCLIP ViT-H/14 (``cond_stage_model.model.*``; GELU, padded with 0)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sd_lightning.errors import InputError
from sd_lightning.weights.clip import openclip_from_hf
from sd_lightning.weights.read import Part, _component_weights, _tensors, _under

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
_OPENCLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def tower_config(state: dict[str, torch.Tensor], quick_gelu: bool, layer: str) -> dict[str, Any]:
    """The ``TextTransformer`` size of OpenCLIP-named text weights (64-wide heads, as in every
    CLIP text tower SD uses), the activation, the padding and the layer SD reads."""
    width = state["token_embedding.weight"].shape[1]
    layers = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
    return {
        "context_length": state["positional_embedding"].shape[0],
        "vocab_size": state["token_embedding.weight"].shape[0],
        "width": width,
        "heads": width // 64,
        "layers": len(layers),
        "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        "quick_gelu": quick_gelu,
        "pad": "eot" if quick_gelu else "zero",  # SD 1's tokenizer pads with end-of-text
        "layer": layer,
    }


def read_sd_text(path: str, option: str, expected: str) -> Part:
    """The text encoder of a single file or a diffusers pipeline / ``text_encoder/`` folder:
    ``config`` is :func:`tower_config`'s, ``state`` OpenCLIP-named."""
    where = f"{option}={path!r}"
    if os.path.isdir(path):
        sub = os.path.join(path, "text_encoder")
        folder = sub if os.path.isdir(sub) else path
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise InputError(f"{where} has no text_encoder/config.json: give {expected}")
        with open(config_path) as f:
            hf = json.load(f)
        state = openclip_from_hf(_component_weights(folder, option, expected), where)
        quick = hf.get("hidden_act") == "quick_gelu"
        family = "sd1" if quick else "sd2"
        layer = "last"  # diffusers' SD 2 text_encoder/ already ends at the penultimate layer
    else:
        raw = _tensors(path, option, expected)
        if any(k.startswith(SD1_PREFIX) for k in raw):
            hf = _under(raw, SD1_PREFIX)
            state, quick, family, layer = openclip_from_hf(hf, where), True, "sd1", "last"
        elif any(k.startswith(SD2_PREFIX) for k in raw):
            text = [k for k in raw if k.startswith(tuple(SD2_PREFIX + t for t in _OPENCLIP_TEXT))]
            state = {k[len(SD2_PREFIX) :]: raw[k] for k in text}
            quick, family, layer = False, "sd2", "penultimate"
        else:
            raise InputError(
                f"{where} holds no SD text encoder (no {SD1_PREFIX}* or {SD2_PREFIX}* keys): "
                f"give {expected}, or choose one with text_encoder=..."
            )
    return Part(tower_config(state, quick, layer), state, family, path)


def is_sd_source(path: str) -> bool:
    """A diffusers folder, or a file with SD's text-encoder keys (not an OpenCLIP weights file)."""
    if os.path.isdir(path):
        return any(
            os.path.exists(os.path.join(path, n))
            for n in ("model_index.json", "text_encoder", "config.json")
        )
    if not os.path.isfile(path):
        return False
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not ours to judge: OpenCLIP's loader reports it
            return False
        keys = list(content.get("state_dict", content)) if isinstance(content, dict) else []
    return any(k.startswith((SD1_PREFIX, SD2_PREFIX)) for k in keys)


def has_sd_text(path: str) -> bool:
    """Whether SD weights (a single file or a diffusers folder) hold a text encoder (an export of
    a model trained with a random tower does not)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "text_encoder", "config.json"))
    return is_sd_source(path)
