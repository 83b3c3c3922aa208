"""LoRA files other tools load, and LoRA files of any of them applied to our U-Net.

Two files, both safetensors, named by diffusers' module paths (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``), which ``layouts.unet_blocks`` maps to ours:

- ``lora.safetensors``, kohya's names, which AUTOMATIC1111, ComfyUI, kohya's scripts and
  diffusers' ``load_lora_weights`` read: ``lora_unet_<path with _>.lora_down.weight`` (A),
  ``.lora_up.weight`` (B), ``.alpha``; kohya's metadata (``ss_v2``, ``ss_base_model_version``,
  ``sd_v2_v`` for v-prediction) and SAI's ``modelspec.*``, by which A1111 files it under SD 1/2;
- ``pytorch_lora_weights.safetensors``, diffusers' names (``unet.<path>``, ``text_encoder.<path>``),
  ``alpha / rank`` folded into B (the format keeps no alpha), in the spellings that diffusers'
  loader and ComfyUI's key map (``comfy/lora.py``: attention only as ``processor.to_q``) both take:
  attention as diffusers' attention processors wrote it (``attn1.processor.to_q_lora.down.weight``),
  other layers as diffusers' training scripts do (``.lora.down.weight``), the text encoder in peft's
  names (``lora_A``).

Applying one (``stage=sample lora=[...]``, ``stage=export lora=[...]``) merges
``scale * alpha / rank * B A`` into the weights it names, from any spelling :mod:`.lora_keys`
reads: sampling then costs nothing extra.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from sd_lightning.core.errors import InputError
from sd_lightning.weights import layouts
from sd_lightning.weights.configs import NAMES

KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = "lora_te_"
DIFFUSERS_UNET = "unet."
DIFFUSERS_TEXT = "text_encoder."
TEXT_PARTS = {  # our text tower's adapted layers -> transformers' CLIP names in a block
    **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' record of peft's LoraConfig (rank, alpha)
ATTENTION = re.compile(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")


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


def _diffusers_unet_name(path: str) -> str:
    """``unet.<path>`` as both diffusers and ComfyUI read it: attention in the processors'
    spelling (``attn1.processor.to_out_lora``), other layers in the training scripts'."""
    m = ATTENTION.search(path)
    if m:
        module = m.group(2).removesuffix(".0")
        return f"{DIFFUSERS_UNET}{path[: m.start()]}.{m.group(1)}.processor.{module}_lora"
    return f"{DIFFUSERS_UNET}{path}.lora"


def kohya_metadata(
    rank: int, alpha: float, context: int, prediction: str, image_size: int, sdxl: bool = False
) -> dict[str, str]:
    """kohya's ``ss_*`` keys (``train_network.py``: ``ss_v2``, ``ss_base_model_version`` as
    ``get_model_version_str_for_sd1_sd2`` spells it, ``sdxl_base_v1-0`` for SDXL) and SAI's
    ``modelspec.*``; AUTOMATIC1111 files a LoRA under SD 2 by ``ss_v2 == "True"``
    (``network.py``), under SDXL by its SGM layer names."""
    v2, v = context == 1024 and not sdxl, prediction == "v_prediction"
    version = ("sd_v2" if v2 else "sd_v1" if context == 768 else f"context_{context}") + (
        "_v" if v else ""
    )
    architecture = "stable-diffusion-v1"
    if v2:
        architecture = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
    if sdxl:  # kohya writes sdxl_base_v1-0 for any SDXL base
        version, architecture = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_v2": str(v2),
        "ss_base_model_version": version,
        "ss_training_comment": "sd_lightning",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers"
        ),
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.resolution": f"{image_size}x{image_size}",
    }


def lora_files(
    adapters: dict[str, torch.Tensor],
    unet: nn.Module,
    rank: int,
    alpha: float,
    text: dict[str, torch.Tensor] | None = None,
    prediction: str = "epsilon",
    image_size: int = 512,
    text_2: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """``{"lora": kohya's file, "pytorch_lora_weights": diffusers'}``: tensors and metadata,
    from ``adapter_state``'s ``<module>.lora_A`` / ``.lora_B`` of the U-Net (and of the text
    tower: ``text``, and SDXL's second: ``text_2``). kohya names an SD 1/2 U-Net's layers by
    diffusers' paths and an SDXL U-Net's by SGM's (``lora_unet_input_blocks_4_1_...``), which
    are ours."""
    names = diffusers_names(unet)
    sdxl = unet.config.get("adm_in_channels") is not None
    kohya, diff = {}, {}

    def add(kohya_stem: str, diffusers_stem: str, a, b, down: str, up: str) -> None:
        kohya[kohya_stem + ".lora_down.weight"] = a
        kohya[kohya_stem + ".lora_up.weight"] = b
        kohya[kohya_stem + ".alpha"] = torch.tensor(float(alpha))
        diff[diffusers_stem + down] = a
        diff[diffusers_stem + up] = b * (alpha / rank)

    for key, a in adapters.items():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            path, b = names[module], adapters[module + ".lora_B"]
            stem = _diffusers_unet_name(path)
            kohya_path = (module if sdxl else path).replace(".", "_")
            add(KOHYA_UNET + kohya_path, stem, a, b, ".down.weight", ".up.weight")
    # SDXL's two encoders: kohya's lora_te1_/lora_te2_, diffusers' text_encoder./text_encoder_2.
    prefixes = [(KOHYA_TEXT, DIFFUSERS_TEXT)] if text_2 is None else [
        ("lora_te1_", DIFFUSERS_TEXT), ("lora_te2_", "text_encoder_2.")]  # fmt: skip
    for (kohya_prefix, diffusers_prefix), adapters in zip(prefixes, [text, text_2]):
        for path, (a, b) in text_pairs(adapters or {}).items():
            stem = diffusers_prefix + path
            add(
                kohya_prefix + path.replace(".", "_"),
                stem,
                a,
                b,
                ".lora_A.weight",
                ".lora_B.weight",
            )
    meta = kohya_metadata(rank, alpha, unet.config["context_dim"], prediction, image_size, sdxl)

    def plain(state):
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    return {"lora": (plain(kohya), meta), "pytorch_lora_weights": (plain(diff), {"format": "pt"})}


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


def _scales(found, path: str) -> dict[str, float]:
    """``alpha / rank`` per network from diffusers' ``lora_adapter_metadata`` (peft's
    LoraConfig per prefix); files without it fold alpha into B (scale 1)."""
    meta = found.metadata.get(ADAPTER_METADATA)
    if not isinstance(meta, dict):
        return {}
    out = {}
    for prefix, network in (
        ("unet", "unet"),
        ("text_encoder", "text"),
        ("text_encoder_2", "text_2"),
    ):
        r, alpha = meta.get(f"{prefix}.r"), meta.get(f"{prefix}.lora_alpha")
        if meta.get(f"{prefix}.rank_pattern") or meta.get(f"{prefix}.alpha_pattern"):
            raise InputError(
                f"lora={path!r}: per-layer ranks or alphas (peft's rank_pattern/alpha_pattern) "
                "are not read; save the LoRA with one rank and alpha"
            )
        if r and alpha is not None:
            out[network] = float(alpha) / float(r)
    return out


def _targets(unet: nn.Module, towers: list[nn.Module]) -> dict[str, dict]:
    """Layer names (kohya's ``_`` spelling of diffusers' and of our CompVis paths, and
    transformers' CLIP paths) -> (weight, rows of it or None), per network."""
    modules = dict(unet.named_modules())
    unet_targets = {}
    for mine, theirs in diffusers_names(unet).items():
        weight = (modules[mine].weight, None)
        unet_targets[theirs.replace(".", "_")] = weight
        unet_targets[mine.replace(".", "_")] = weight  # the original (CompVis) names
    out = {"unet": unet_targets}
    for network, tower in zip(("text", "text_2"), towers):
        out[network] = _text_weights(tower)
    return out


def lora_family(found, pairs: dict[str, dict]) -> str | None:
    """``sd1``, ``sd2``, ``sdxl`` or ``None``: the family a LoRA file was trained on, from its
    metadata (kohya's ``ss_base_model_version``, SAI's ``modelspec.architecture``), its
    networks (SDXL's second text encoder) and its cross-attention keys' width."""
    meta = found.metadata
    said = str(meta.get("ss_base_model_version") or meta.get("modelspec.architecture") or "")
    for mark, family in (("sdxl", "sdxl"), ("xl", "sdxl"), ("v2", "sd2"), ("v1", "sd1")):
        if mark in said:
            return family
    if pairs["text_2"]:
        return "sdxl"
    widths = {parts["down"].shape[-1] for layer, parts in pairs["unet"].items()
              if re.search(r"attn2_to_[kv]$", layer)}  # fmt: skip
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(widths.pop()) if len(widths) == 1 else None


@torch.no_grad()
def merge_lora(
    unet: nn.Module,
    path: str,
    scale: float = 1.0,
    towers: list[nn.Module] | tuple = (),
    family: str | None = None,
) -> int:
    """Add ``scale * alpha / rank * B A`` of the LoRA file at ``path`` to ``unet``'s weights (and
    the text ``towers``', for a file that adapts the text encoders too: SDXL's two in order);
    returns how many layers changed. Every tensor must be a LoRA of a layer this model has,
    finite and of its shape; a LoRA of another ``family`` than the model's is named as such."""
    from sd_lightning.finetune.lora_keys import read_pairs
    from sd_lightning.weights.files import read_weight_file

    path = os.fspath(path)
    if not math.isfinite(scale):
        raise InputError(f"lora_scale={scale} for {path!r}: give a finite number (e.g. 0.8)")
    found = read_weight_file(path, "lora", "a LoRA .safetensors file (kohya's or diffusers')")
    if found.kind != "safetensors":
        raise InputError(f"lora={path!r}: give the .safetensors file of a LoRA")
    pairs = read_pairs(found.tensors(), path)
    theirs = lora_family(found, pairs)
    if family and theirs and theirs != family:
        raise InputError(
            f"lora={path!r} is a LoRA of {NAMES[theirs]}, but this model is {NAMES[family]}: "
            f"give a LoRA trained on {NAMES[family]}"
        )
    for network, tower_count in (("text", 1), ("text_2", 2)):
        if pairs[network] and len(towers) < tower_count:
            which = "SDXL's second text encoder" if tower_count == 2 else "the text encoder"
            raise InputError(f"lora={path!r} also adapts {which}, which this model lacks")
    targets, scales = _targets(unet, list(towers)), _scales(found, path)
    updates = []
    for network, layers in pairs.items():
        missing = [k for k in layers if k not in targets[network]]
        if missing:
            raise InputError(
                f"lora={path!r} names {len(missing)} {network} layers this model lacks (another "
                f"family or size?): {', '.join(sorted(missing)[:3])}"
            )
        for name, parts in layers.items():
            weight, rows = targets[network][name]
            target = weight if rows is None else weight[rows]
            down, up = parts["down"], parts["up"]
            for part, t in parts.items():
                if not torch.isfinite(t).all():
                    raise InputError(
                        f"lora={path!r}: {name} ({part}) holds NaN or infinite values: the file "
                        "is damaged or its training diverged"
                    )
            _check_shapes(path, network, name, down, up, target)
            rank = down.shape[0]
            alpha = parts.get("alpha")
            factor = float(alpha) / rank if alpha is not None else scales.get(network, 1.0)
            updates.append((target, down, up, scale * factor))
    for target, down, up, factor in updates:  # checked first: a bad file changes nothing
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(target.shape)
        target.add_(delta.to(target) * factor)  # a view of the fused q/k/v rows adds in place
    return sum(len(layers) for layers in pairs.values())


def _check_shapes(path: str, network: str, name: str, down, up, target) -> None:
    """``up @ down`` has the target weight's shape, or an error with the likely cause."""
    rows, cols = target.shape[0], math.prod(target.shape[1:])
    if up.shape[0] == rows and math.prod(down.shape[1:]) == cols and up.shape[1] == down.shape[0]:
        return
    found = (up.shape[0], math.prod(down.shape[1:]))
    cause = "a LoRA of another family or size"
    if network == "unet" and 1024 in found and 768 in (rows, cols):
        cause = "an SD 2 LoRA on an SD 1 model (1024-d text context against 768)"
    elif network == "unet" and 768 in found and 1024 in (rows, cols):
        cause = "an SD 1 LoRA on an SD 2 model (768-d text context against 1024)"
    raise InputError(
        f"lora={path!r}: {network} layer {name} is {found[0]}x{found[1]} (up {tuple(up.shape)}, "
        f"down {tuple(down.shape)}) but this model's weight is {rows}x{cols} "
        f"{tuple(target.shape)}: {cause}"
    )
