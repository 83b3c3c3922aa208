"""DINOv2 (or another ViT) through timm, from a weights file: the layout timm's hub folders hold
(``timm/vit_base_patch14_dinov2.lvd142m``'s ``model.safetensors``) or the original release's
(``dinov2_vitb14_pretrain.pth``, with its ``mask_token``), read without pickle.

The architecture is a timm model name (``repa.timm_model``; registers: ``..._reg4_dinov2``)
built at the alignment's resolution; the file's position embeddings are resampled to that grid
by timm's own loader filter (bicubic, antialiased: what REPA does with timm's
``resample_abs_pos_embed``). Every weight of the network must come from the file.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sd_lightning.core.errors import InputError
from sd_lightning.weights.files import identify, read_weight_file

DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"
OPTION = "repa.encoder"
EXPECTED = (
    "a DINOv2 weights file for timm (timm/vit_base_patch14_dinov2.lvd142m's model.safetensors, or "
    "the original dinov2_vitb14_pretrain.pth), or a DINOv2 folder for transformers"
)
VIT_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def check_vit_file(path: str) -> None:
    """Refuse, from the header alone, a file that holds no ViT (a VAE, a U-Net, a LoRA...)."""
    found = read_weight_file(path, OPTION, EXPECTED, mmap=True)
    keys = list(found.lazy_tensors(meta=True))
    if not all(key in keys for key in VIT_KEYS):
        what = identify(keys, found.stage) or f"{len(keys)} tensors without a ViT's {VIT_KEYS[1]}"
        raise found.error(f"holds {what}, not a ViT's weights")


def timm_vit(path: str, model: str, resolution: int, overrides: dict[str, Any] | None) -> nn.Module:
    """``model`` built by timm at ``resolution`` with the file's weights, frozen, in eval mode."""
    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    except ImportError:
        raise InputError(
            f"{OPTION}={path!r} is a weights file, read through timm: pip install timm"
        ) from None
    check_vit_file(path)
    try:
        net = timm.create_model(
            model, pretrained=False, num_classes=0, img_size=resolution, **(overrides or {})
        )
    except (RuntimeError, TypeError) as exn:
        raise InputError(
            f"repa.timm_model={model!r}: timm cannot build it ({exn}); give a timm ViT name, "
            f"e.g. {DEFAULT_MODEL}"
        ) from None
    if not isinstance(net, VisionTransformer):
        raise InputError(f"repa.timm_model={model!r} is a {type(net).__name__}, not a ViT")
    found = read_weight_file(path, OPTION, EXPECTED)
    state = found.tensors() if found.kind == "safetensors" else dict(found.content)
    state = checkpoint_filter_fn(state, net)
    fix = f"give the weights of {model} (or name their architecture in repa.timm_model)"
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exn:  # sizes that differ: another width or patch
        first = next((ln.strip() for ln in str(exn).splitlines() if "size mismatch" in ln), "")
        raise InputError(f"{OPTION}={path!r} does not fit {model}: {first[:200]}; {fix}") from None
    unexpected = [k for k in unexpected if not k.startswith("head.")]  # a classifier: unused
    if missing or unexpected:
        shown = ", ".join([*missing, *unexpected][:3])
        raise InputError(
            f"{OPTION}={path!r} does not fit {model}: {len(missing)} weights missing, "
            f"{len(unexpected)} left over ({shown}); {fix}"
        )
    return net.eval().requires_grad_(False)
