"""LoRA files other tools load, and LoRA files of any of them applied to our U-Net.

Two formats, both safetensors, named by diffusers' module paths (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``), which ``layouts.unet_blocks`` maps to ours:

- kohya's, which AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read:
  ``lora_unet_<path with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``;
- diffusers' (peft's names): ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``, with
  ``alpha / rank`` folded into B (the format keeps no alpha).

Applying one (``stage=sample lora=[...]``, ``stage=export lora=[...]``) merges
``scale * alpha / rank * B A`` into the weights it names: sampling then costs nothing extra.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sd_lightning.errors import InputError
from sd_lightning.weights import layouts

KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = "lora_te_"
DIFFUSERS_UNET = "unet."
FAMILY_VERSION = {768: "sd_v1", 1024: "sd_v2"}


def diffusers_names(unet: nn.Module) -> dict[str, str]:
    """Our Linear/Conv2d module names -> diffusers' module paths."""
    blocks = layouts.unet_blocks(unet.config)
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or ".lora_" in name:
            continue
        name = name.removesuffix(".base_layer")  # an adapted layer (peft) keeps its weight there
        theirs = layouts.rename(name + ".weight", blocks, to_diffusers=True)
        if theirs is not None:
            out[name] = theirs.removesuffix(".weight")
    return out


def lora_files(
    adapters: dict[str, torch.Tensor], unet: nn.Module, rank: int, alpha: float
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """``{"lora": kohya's file, "pytorch_lora_weights": diffusers'}``: tensors and metadata,
    from ``adapter_state``'s ``<module>.lora_A`` / ``.lora_B``."""
    names = diffusers_names(unet)
    kohya, diff = {}, {}
    for key, a in adapters.items():
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        b = adapters[module + ".lora_B"]
        path = names[module]
        stem = KOHYA_UNET + path.replace(".", "_")
        kohya[stem + ".lora_down.weight"] = a
        kohya[stem + ".lora_up.weight"] = b
        kohya[stem + ".alpha"] = torch.tensor(float(alpha))
        diff[f"{DIFFUSERS_UNET}{path}.lora_A.weight"] = a
        diff[f"{DIFFUSERS_UNET}{path}.lora_B.weight"] = b * (alpha / rank)
    context = unet.config["context_dim"]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": FAMILY_VERSION.get(context, f"context_{context}"),
        "ss_training_comment": "sd_lightning",
    }
    contiguous = {k: v.detach().float().cpu().contiguous() for k, v in kohya.items()}
    return {
        "lora": (contiguous, meta),
        "pytorch_lora_weights": (
            {k: v.detach().float().cpu().contiguous() for k, v in diff.items()},
            {"format": "pt"},
        ),
    }


def _pairs(state: dict[str, torch.Tensor], path: str) -> dict[str, tuple]:
    """``{diffusers module path: (A, B, alpha or None)}`` of a LoRA file in either format."""
    text = [k for k in state if k.startswith((KOHYA_TEXT, "text_encoder."))]
    if text:
        raise InputError(
            f"lora={path!r} also adapts the text encoder ({text[0]}...), which is not applied "
            "yet: give a U-Net-only LoRA"
        )
    out: dict[str, tuple] = {}
    for key, down in state.items():
        if key.startswith(KOHYA_UNET) and key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            alpha = state.get(stem + ".alpha")
            out[stem[len(KOHYA_UNET) :]] = (down, state[stem + ".lora_up.weight"], alpha)
        elif key.startswith(DIFFUSERS_UNET) and key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            out[stem[len(DIFFUSERS_UNET) :]] = (down, state[stem + ".lora_B.weight"], None)
    if not out:
        raise InputError(
            f"lora={path!r} has no U-Net LoRA weights (neither kohya's lora_unet_*.lora_down "
            "nor diffusers' unet.*.lora_A keys)"
        )
    return out


@torch.no_grad()
def merge_lora(unet: nn.Module, path: str, scale: float = 1.0) -> int:
    """Add ``scale * alpha / rank * B A`` of the LoRA file at ``path`` to ``unet``'s weights;
    returns how many layers changed. Every adapter must name a layer of ``unet``."""
    from sd_lightning.files import read_weight_file

    found = read_weight_file(path, "lora", "a LoRA .safetensors file (kohya's or diffusers')")
    if found.kind != "safetensors":
        raise InputError(f"lora={path!r}: give the .safetensors file of a LoRA")
    pairs = _pairs(found.tensors(), path)
    ours = {theirs: mine for mine, theirs in diffusers_names(unet).items()}
    kohya = {theirs.replace(".", "_"): mine for theirs, mine in ours.items()}
    modules = dict(unet.named_modules())
    missing = [k for k in pairs if k not in ours and k not in kohya]
    if missing:
        raise InputError(
            f"lora={os.fspath(path)!r} names {len(missing)} layers this U-Net lacks (another "
            f"family or size?): {', '.join(sorted(missing)[:3])}"
        )
    for name, (a, b, alpha) in pairs.items():
        module = modules[ours.get(name) or kohya[name]]
        rank = a.shape[0]
        factor = scale * (float(alpha) / rank if alpha is not None else 1.0)
        delta = (b.flatten(1).float() @ a.flatten(1).float()).reshape(module.weight.shape)
        module.weight.add_(delta.to(module.weight) * factor)
    return len(pairs)
