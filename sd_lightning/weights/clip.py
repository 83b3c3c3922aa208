"""SD 1.x's text encoder: transformers' ``CLIPTextModel`` weights (CLIP ViT-L/14, as single files
hold them under ``cond_stage_model.transformer.`` and diffusers folders in ``text_encoder/``) in
OpenCLIP's ``TextTransformer`` names, which our text encoder runs: q, k and v fused into one
input projection, the rest renamed."""

from __future__ import annotations

import torch

from sd_lightning.core.errors import InputError

HF_PREFIX = "text_model."
# transformers -> OpenCLIP, inside one layer
_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def openclip_from_hf(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` weights (``text_model.*`` as single files and transformers 4 store
    them, or without the prefix as transformers 5 does) -> OpenCLIP ``TextTransformer`` weights;
    every key accounted for."""
    state = {k[len(HF_PREFIX) :] if k.startswith(HF_PREFIX) else k: v for k, v in state.items()}
    p = ""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if p + key not in state:
            raise InputError(f"{where} is not a CLIP text model: {p + key} is missing")
        used.add(p + key)
        return state[p + key]

    out = {
        "token_embedding.weight": take("embeddings.token_embedding.weight"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "ln_final.weight": take("final_layer_norm.weight"),
        "ln_final.bias": take("final_layer_norm.bias"),
    }
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [take(f"{hf}self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in _LAYER.items():
                out[f"{oc}{b}{kind}"] = take(f"{hf}{a}{kind}")
    if "text_projection.weight" in state:  # CLIPTextModelWithProjection (SDXL's second)
        out["text_projection"] = take("text_projection.weight").T
    ignored = {"embeddings.position_ids"}  # a buffer older transformers saved
    left = [k for k in state if k not in used and k not in ignored]
    if left:
        raise InputError(f"{where}: {len(left)} keys of no CLIP text layer: {sorted(left)[:5]}")
    return out


def hf_from_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The way back (``text_model.*`` names, as SD 1.x single files hold them; a projection as
    ``CLIPTextModelWithProjection``'s ``text_projection.weight``)."""
    p = HF_PREFIX
    out = {
        p + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        p + "embeddings.position_embedding.weight": state["positional_embedding"],
        p + "final_layer_norm.weight": state["ln_final.weight"],
        p + "final_layer_norm.bias": state["ln_final.bias"],
    }
    if state.get("text_projection") is not None:  # OpenCLIP's (width, dim) is x @ P
        out["text_projection.weight"] = state["text_projection"].T
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    for i in sorted(layers):
        hf, oc = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{oc}attn.in_proj_{kind}"].chunk(3)
            for name, t in zip("qkv", (q, k, v)):
                out[f"{hf}self_attn.{name}_proj.{kind}"] = t
            for a, b in _LAYER.items():
                out[f"{hf}{a}{kind}"] = state[f"{oc}{b}{kind}"]
    return out
