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
DIFFUSERS_TEXT = "text_encoder."
TEXT_PARTS = {  # our text tower's adapted layers -> transformers' CLIP names in a block
    **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
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


def text_pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """The text tower's adapters (``adapter_state`` of it) under transformers' CLIP module paths
    (``text_model.encoder.layers.<i>.self_attn.q_proj``...): ``{path: (A, B)}``."""
    out = {}
    for key, a in adapters.items():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            block, _, part = module.removeprefix("transformer.resblocks.").partition(".")
            path = f"text_model.encoder.layers.{block}.{TEXT_PARTS[part]}"
            out[path] = (a, adapters[module + ".lora_B"])
    return out


def lora_files(
    adapters: dict[str, torch.Tensor],
    unet: nn.Module,
    rank: int,
    alpha: float,
    text: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """``{"lora": kohya's file, "pytorch_lora_weights": diffusers'}``: tensors and metadata,
    from ``adapter_state``'s ``<module>.lora_A`` / ``.lora_B`` of the U-Net (and of the text
    tower: ``text``)."""
    names = diffusers_names(unet)
    pairs = {}
    for key, a in adapters.items():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            pairs[(KOHYA_UNET, DIFFUSERS_UNET, names[module])] = (a, adapters[module + ".lora_B"])
    for path, ab in text_pairs(text or {}).items():
        pairs[(KOHYA_TEXT, DIFFUSERS_TEXT, path)] = ab
    kohya, diff = {}, {}
    for (kohya_prefix, diffusers_prefix, path), (a, b) in pairs.items():
        stem = kohya_prefix + path.replace(".", "_")
        kohya[stem + ".lora_down.weight"] = a
        kohya[stem + ".lora_up.weight"] = b
        kohya[stem + ".alpha"] = torch.tensor(float(alpha))
        diff[f"{diffusers_prefix}{path}.lora_A.weight"] = a
        diff[f"{diffusers_prefix}{path}.lora_B.weight"] = b * (alpha / rank)
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


def _pairs(state: dict[str, torch.Tensor], path: str) -> tuple[dict, dict]:
    """``({diffusers U-Net module path: (A, B, alpha or None)}, {transformers CLIP text path:
    (A, B, alpha or None)})`` of a LoRA file in either format."""
    unet: dict[str, tuple] = {}
    text: dict[str, tuple] = {}
    for key, down in state.items():
        for kohya, diffusers, into in (
            (KOHYA_UNET, DIFFUSERS_UNET, unet),
            (KOHYA_TEXT, DIFFUSERS_TEXT, text),
        ):
            if key.startswith(kohya) and key.endswith(".lora_down.weight"):
                stem = key[: -len(".lora_down.weight")]
                alpha = state.get(stem + ".alpha")
                name = stem[len(kohya) :]
                into[name] = (down, state[stem + ".lora_up.weight"], alpha)
            elif key.startswith(diffusers) and key.endswith(".lora_A.weight"):
                stem = key[: -len(".lora_A.weight")]
                into[stem[len(diffusers) :].replace(".", "_")] = (
                    down,
                    state[stem + ".lora_B.weight"],
                    None,
                )
    if not unet and not text:
        raise InputError(
            f"lora={path!r} has no LoRA weights (neither kohya's lora_unet_/lora_te_*.lora_down "
            "nor diffusers' unet./text_encoder.*.lora_A keys)"
        )
    return unet, text


def _text_weights(tower: nn.Module) -> dict[str, tuple[torch.Tensor, slice | None]]:
    """transformers' CLIP text module paths (with _ for .) -> (our tower's weight, rows)."""
    out = {}
    for i, block in enumerate(tower.transformer.resblocks):
        layer = f"text_model_encoder_layers_{i}_"
        width = block.attn.embed_dim
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{layer}self_attn_{name}"] = (
                block.attn.in_proj_weight,
                slice(j * width, (j + 1) * width),
            )
        out[f"{layer}self_attn_out_proj"] = (block.attn.out_proj.weight, None)
        out[f"{layer}mlp_fc1"] = (block.mlp.c_fc.weight, None)
        out[f"{layer}mlp_fc2"] = (block.mlp.c_proj.weight, None)
    return out


@torch.no_grad()
def merge_lora(
    unet: nn.Module, path: str, scale: float = 1.0, tower: nn.Module | None = None
) -> int:
    """Add ``scale * alpha / rank * B A`` of the LoRA file at ``path`` to ``unet``'s weights (and
    the text ``tower``'s, for a file that adapts the text encoder too); returns how many layers
    changed. Every adapter must name a layer."""
    from sd_lightning.files import read_weight_file

    found = read_weight_file(path, "lora", "a LoRA .safetensors file (kohya's or diffusers')")
    if found.kind != "safetensors":
        raise InputError(f"lora={path!r}: give the .safetensors file of a LoRA")
    unet_pairs, text_pairs_ = _pairs(found.tensors(), path)
    ours = {theirs.replace(".", "_"): mine for mine, theirs in diffusers_names(unet).items()}
    modules = dict(unet.named_modules())
    targets = {name: (modules[mine].weight, None) for name, mine in ours.items()}
    if text_pairs_:
        if tower is None:
            raise InputError(f"lora={path!r} also adapts the text encoder, which this model lacks")
        targets.update(_text_weights(tower))
    pairs = {**unet_pairs, **text_pairs_}
    missing = [k for k in pairs if k not in targets]
    if missing:
        raise InputError(
            f"lora={os.fspath(path)!r} names {len(missing)} layers this model lacks (another "
            f"family or size?): {', '.join(sorted(missing)[:3])}"
        )
    for name, (a, b, alpha) in pairs.items():
        weight, rows = targets[name]
        target = weight if rows is None else weight[rows]
        rank = a.shape[0]
        factor = scale * (float(alpha) / rank if alpha is not None else 1.0)
        delta = (b.flatten(1).float() @ a.flatten(1).float()).reshape(target.shape)
        target.add_(delta.to(target) * factor)  # a view of the fused q/k/v rows adds in place
    return len(pairs)
