"""Stable Diffusion's text encoders as OpenCLIP ``TextTransformer`` weights and shape:
SD 1.x's CLIP ViT-L/14 (transformers names: ``cond_stage_model.transformer.text_model.*`` in single
files, ``text_encoder/`` in diffusers folders; quick-GELU, prompts padded with the end-of-text
token), SD 2.x's OpenCLIP ViT-H/14 (``cond_stage_model.model.*``; GELU, padded with 0) and
SDXL's two: CLIP ViT-L/14 (``conditioner.embedders.0.transformer.*``, ``text_encoder/``) and
OpenCLIP ViT-bigG/14 with its projection (``conditioner.embedders.1.model.*``,
``text_encoder_2/``), both read at their penultimate block without the final layer norm."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sd_lightning.core.errors import InputError
from sd_lightning.weights.clip import openclip_from_hf
from sd_lightning.weights.files import identify, identify_folder, read_weight_file
from sd_lightning.weights.read import Part, _component_weights, _under

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
SDXL_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
COMPONENTS = ("text_encoder", "text_encoder_2")  # diffusers' folders; SGM's embedders 0 and 1
_OPENCLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


ACTIVATIONS = ("quick_gelu", "gelu")  # transformers' hidden_act values a CLIP tower runs
TEXT_META = "sd_lightning_text_encoder"  # our single files: what the tensors do not show


def tower_config(
    state: dict[str, torch.Tensor],
    heads: int | None,
    activation: str,
    pad: str,
    layer: int,
    layer_norm_eps: float = 1e-5,
    final_norm: bool = True,
    pool: str = "argmax",
) -> dict[str, Any]:
    """The ``TextTransformer`` size of OpenCLIP-named text weights with what they do not show:
    the heads (``None``: 64 wide, as in every CLIP text tower SD releases use), the activation,
    the padding, ``layer``, the final blocks SD skips, whether the states pass the final layer
    norm (SDXL: no), and where a pooling tower pools: ``argmax`` (the highest token id, as
    OpenCLIP, SGM and transformers' configs with ``eos_token_id: 2``, SDXL's, do) or ``eot``
    (the first end-of-text, transformers' newer configs)."""
    width = state["token_embedding.weight"].shape[1]
    layers = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
    heads = heads or width // 64
    if activation not in ACTIVATIONS or not heads or width % heads:
        raise InputError(
            f"a text encoder of width {width} with {heads} heads and {activation!r} is not a CLIP "
            "text tower we run (quick_gelu or gelu, heads dividing the width)"
        )
    return {
        "context_length": state["positional_embedding"].shape[0],
        "vocab_size": state["token_embedding.weight"].shape[0],
        "width": width,
        "heads": heads,
        "layers": len(layers),
        "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        "quick_gelu": activation == "quick_gelu",
        "layer_norm_eps": float(layer_norm_eps),
        "pad": pad,
        "layer": layer,
        "final_norm": bool(final_norm),
        "pool": pool,
        "projection_dim": (
            state["text_projection"].shape[1] if state.get("text_projection") is not None else None
        ),
    }


def _folder_pad(folder: str) -> str | None:
    """``eot`` or ``zero``: what a diffusers pipeline's ``tokenizer/`` pads with (SD 1:
    ``<|endoftext|>``, SD 2: ``!``, id 0); ``None`` without one."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                pad = json.load(f).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                return "eot" if pad == "<|endoftext|>" else "zero" if pad == "!" else pad
    return None


def is_sdxl_folder(path: str) -> bool:
    """A diffusers SDXL pipeline folder (two text encoders)."""
    return os.path.isdir(os.path.join(path, "text_encoder_2"))


def _read_folder(path: str, option: str, expected: str, component: str) -> Part:
    """A diffusers pipeline's (or a bare) ``text_encoder/`` or ``text_encoder_2/`` folder: every
    size its config.json records, the padding its tokenizer records."""
    where = f"{option}={path!r}"
    sub = os.path.join(path, component)
    xl = is_sdxl_folder(path)
    if component != "text_encoder" and not os.path.isdir(sub):
        raise InputError(
            f"{where} has no {component}/ (SDXL's second text encoder): give {expected}"
        )
    folder = sub if os.path.isdir(sub) else path
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{where} has no {component}/config.json: give {expected}")
    with open(config_path) as f:
        hf = json.load(f)
    if "_class_name" in hf:  # diffusers' (a unet/ or vae/ folder), not transformers'
        raise InputError(
            f"{where} is {identify_folder(folder)}, not a text encoder: give {expected}"
        )
    hf = hf.get("text_config", hf)  # a whole CLIPModel's config holds the text part
    state = openclip_from_hf(_component_weights(folder, option, expected), where)
    activation = hf.get("hidden_act", "quick_gelu")  # transformers' CLIPTextConfig default
    words = "tokenizer" + component[len("text_encoder") :]
    pad = _folder_pad(os.path.join(os.path.dirname(folder), words)) if folder == sub else None
    if pad not in (None, "eot", "zero"):
        raise InputError(f"{where}: the tokenizer pads with {pad!r}, not <|endoftext|> or '!'")
    ours = hf.get(TEXT_META) or {}  # our exports say how the tower is read
    config = tower_config(
        state,
        hf.get("num_attention_heads"),
        activation,
        pad or ("eot" if activation == "quick_gelu" else "zero"),
        # SDXL reads hidden_states[-2]; diffusers' SD 2 text_encoder/ already ends there
        int(ours.get("layer", 1 if xl else 0)),
        hf.get("layer_norm_eps", 1e-5),
        final_norm=ours.get("final_norm", not xl),
        pool="argmax" if hf.get("eos_token_id", 49407) == 2 else "eot",
    )
    recorded = {
        "num_hidden_layers": config["layers"],
        "hidden_size": config["width"],
        "max_position_embeddings": config["context_length"],
        "vocab_size": config["vocab_size"],
        "intermediate_size": int(config["mlp_ratio"] * config["width"]),
    }
    wrong = {k: (hf[k], v) for k, v in recorded.items() if k in hf and hf[k] != v}
    if wrong:
        k, (said, found) = next(iter(wrong.items()))
        raise InputError(f"{where}: config.json says {k}={said} but the weights hold {found}")
    family = "sdxl" if xl else "sd1" if activation == "quick_gelu" else "sd2"
    return Part(config, state, family, path)


def read_sd_text(path: str, option: str, expected: str, component: str = "text_encoder") -> Part:
    """A text encoder of a single file or a diffusers pipeline / ``text_encoder/`` folder
    (``component``: ``text_encoder_2`` for SDXL's second): ``config`` is :func:`tower_config`'s,
    ``state`` OpenCLIP-named. A single file's sizes come from our metadata where it has it (our
    exports), else SD's conventions: 64-wide heads, SD 1's CLIP at its last layer, SD 2's
    OpenCLIP at its penultimate, SDXL's both at their penultimate without the final norm."""
    where = f"{option}={path!r}"
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if os.path.isdir(path):
        return _read_folder(path, option, expected, component)
    found = read_weight_file(path, option, expected, mmap=True)
    raw = found.lazy_tensors()
    recorded = found.metadata.get(TEXT_META) or {}
    meta = recorded.get(component, {}) if "text_encoder" in recorded else recorded
    second = component == "text_encoder_2"
    xl = any(k.startswith(SDXL_PREFIXES) for k in raw)
    if xl and not second:
        state = openclip_from_hf(_under(raw, SDXL_PREFIXES[0]), where)
        family, activation, pad, layer = "sdxl", "quick_gelu", "eot", 1
    elif xl:
        keep = (*_OPENCLIP_TEXT, "text_projection")
        prefix = SDXL_PREFIXES[1]
        state = {k[len(prefix) :]: raw[k] for k in raw if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if k.startswith(keep) and not _buffer(k)}
        family, activation, pad, layer = "sdxl", "gelu", "zero", 1
    elif second:
        raise InputError(
            f"{where} holds one text encoder (SD 1.x or 2.x), not SDXL's two: give SDXL weights"
        )
    elif any(k.startswith(SD1_PREFIX) for k in raw):
        state = openclip_from_hf(_under(raw, SD1_PREFIX), where)
        family, activation, pad, layer = "sd1", "quick_gelu", "eot", 0
    elif any(k.startswith(SD2_PREFIX) for k in raw):
        text = [k for k in raw if k.startswith(tuple(SD2_PREFIX + t for t in _OPENCLIP_TEXT))]
        text = [k for k in text if not _buffer(k)]
        state = {k[len(SD2_PREFIX) :]: raw[k] for k in text}
        family, activation, pad, layer = "sd2", "gelu", "zero", 1
    else:
        what = identify(list(raw)) or "a file without SD text-encoder keys"
        raise InputError(
            f"{where} is {what}, with no SD text encoder (no {SD1_PREFIX}*, {SD2_PREFIX}* or "
            f"conditioner.embedders.* keys): give {expected}, or choose one with text_encoder=..."
        )
    config = tower_config(
        state,
        meta.get("heads"),
        meta.get("activation", activation),
        meta.get("pad", pad),
        int(meta.get("layer", layer)),
        meta.get("layer_norm_eps", 1e-5),
        final_norm=meta.get("final_norm", family != "sdxl"),
        pool=meta.get("pool", "argmax"),
    )
    return Part(config, state, family, path)


def _buffer(key: str) -> bool:
    """Buffers some writers saved beside the weights (older ComfyUI's ``position_ids``, an
    ``attn_mask``; kohya drops them too): not weights, not read."""
    return key.endswith(("position_ids", "attn_mask"))


def _file_keys(path: str) -> list[str]:
    """The tensor names of a weight file (none for what is not one)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to judge: OpenCLIP's loader reports it
        return []
    return list(content.get("state_dict", content)) if isinstance(content, dict) else []


def is_sd_source(path: str) -> bool:
    """A diffusers folder, or a file with SD's text-encoder keys (not an OpenCLIP weights file)."""
    if os.path.isdir(path):
        return any(
            os.path.exists(os.path.join(path, n))
            for n in ("model_index.json", "text_encoder", "config.json")
        )
    if not os.path.isfile(path):
        return False
    return any(k.startswith((SD1_PREFIX, SD2_PREFIX, *SDXL_PREFIXES)) for k in _file_keys(path))


def text_components(path: str) -> list[str]:
    """The text encoders SD weights hold, by diffusers' folder names: none (an export of a
    model trained with a random tower), ``["text_encoder"]`` (SD 1/2) or SDXL's two."""
    if os.path.isdir(path):
        return [c for c in COMPONENTS if os.path.isfile(os.path.join(path, c, "config.json"))]
    if not os.path.isfile(path):
        return []
    keys = _file_keys(path)
    if any(k.startswith(SDXL_PREFIXES) for k in keys):
        return [c for c, p in zip(COMPONENTS, SDXL_PREFIXES) if any(k.startswith(p) for k in keys)]
    return ["text_encoder"] if any(k.startswith((SD1_PREFIX, SD2_PREFIX)) for k in keys) else []
