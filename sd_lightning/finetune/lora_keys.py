"""The names LoRA files give their tensors, in every spelling the tools people use write, reduced
to one: ``(network, layer, part)``, the layer with ``_`` for ``.`` as kohya writes it.

Spellings read (the tools that write them; ComfyUI's ``comfy/lora.py`` and
``comfy/weight_adapter/lora.py`` read the same set):

- kohya's ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the path in
  diffusers' module names (kohya's SD 1/2 files) or the original CompVis ones (kohya's SDXL
  files, SGM's, ComfyUI's own and some converters'); ``lora_te_text_model_encoder_layers_<i>_...``
  for the text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's two;
- peft's ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (diffusers' ``save_lora_weights`` of
  a peft state), ``text_encoder.<path>.lora_A.weight`` (``text_encoder_2.`` for SDXL's second);
- diffusers' training scripts (``convert_state_dict_to_diffusers``): ``unet.<path>.lora.down.weight``
  and ``text_encoder.<path>.q_proj.lora_linear_layer.down.weight``;
- diffusers' attention processors: ``unet.<path>.attn1.processor.to_q_lora.down.weight``,
  ``...processor.to_out_lora...`` (``to_out.0``), with or without the ``unet.`` prefix.

Text paths with or without transformers' ``text_model.`` level (transformers 5 drops it).
"""

from __future__ import annotations

import re

from sd_lightning.core.errors import InputError

# suffix -> part, longest first so ".lora.down.weight" is not read as ".down.weight"
SUFFIXES = {
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
UNET_PATHS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
UNET_PATHS += ("input_blocks.", "middle_block.", "output_blocks.")
# tensors of other adapter kinds (patterns on the name), which a merge of B A would drop
NOT_LORA = {
    r"\.dora_scale$": "DoRA (weight-decomposed LoRA)",
    r"\.lora_mid\.weight$": "LoCon's CP decomposition (lora_mid)",
    r"\.hada_": "LyCORIS LoHa",
    r"\.lokr_": "LyCORIS LoKr",
    r"\.oft_": "OFT",
    r"\.diff(_b)?$": "a full weight difference (diff)",
}
# network -> the name prefixes of its text encoder's layers ("text_2": SDXL's second)
TEXT_PREFIXES = {
    "text": ("lora_te_", "lora_te1_", "text_encoder."),
    "text_2": ("lora_te2_", "text_encoder_2."),
}


def split(key: str) -> tuple[str, str]:
    """``(stem, part)`` of a LoRA tensor name; ``part`` is ``""`` for no LoRA spelling."""
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, ""


def _dotted(stem: str) -> str:
    """A diffusers module path as old attention processors wrote it, as a module path."""
    stem = stem.replace(".processor.", ".")
    return stem + ".0" if stem.endswith(".to_out") else stem


def network_of(stem: str) -> tuple[str, str] | None:
    """``("unet" | "text" | "text_2", layer with _ for .)`` of a stem, or ``None`` when no
    prefix fits."""
    if stem.startswith("lora_unet_"):
        return "unet", stem[len("lora_unet_") :]
    for network, prefixes in TEXT_PREFIXES.items():
        for prefix in prefixes:
            if stem.startswith(prefix):
                path = stem[len(prefix) :]
                if prefix.endswith("."):  # diffusers' dotted paths
                    path = path if path.startswith("text_model.") else "text_model." + path
                    path = path.replace(".", "_")
                return network, path
    path = stem.removeprefix("unet.")
    if path != stem or path.startswith(UNET_PATHS):
        return "unet", _dotted(path).replace(".", "_")
    return None


def read_pairs(state: dict, path: str) -> dict[str, dict[str, dict]]:
    """``{"unet": {layer: {"down", "up", "alpha"?}}, "text": {...}, "text_2": {...}}`` of a
    LoRA file's tensors; anything that is not a LoRA of an SD U-Net or text encoder is an error
    naming it."""
    where = f"lora={path!r}"
    out: dict[str, dict[str, dict]] = {"unet": {}, "text": {}, "text_2": {}}
    for key, tensor in state.items():
        stem, part = split(key)
        other = next((what for mark, what in NOT_LORA.items() if re.search(mark, key)), None)
        if other is not None:
            raise InputError(
                f"{where} holds {other} tensors ({key}), which are not applied: only plain LoRA "
                "(down/up and alpha) is read"
            )
        found = network_of(stem) if part else None
        if found is None:
            raise InputError(
                f"{where}: {key} is no LoRA tensor of an SD U-Net or text encoder (kohya's "
                "lora_unet_/lora_te_/lora_te1_/lora_te2_ names, or diffusers' unet./text_encoder./"
                "text_encoder_2. ones)"
            )
        network, layer = found
        out[network].setdefault(layer, {})[part] = tensor
    for network, layers in out.items():
        for layer, parts in layers.items():
            lacking = [p for p in ("down", "up") if p not in parts]
            if lacking:
                raise InputError(
                    f"{where}: the {network} layer {layer} has no {lacking[0]} matrix (a "
                    "damaged or partly written file?)"
                )
    if not any(out.values()):
        raise InputError(f"{where} has no LoRA weights")
    return out
