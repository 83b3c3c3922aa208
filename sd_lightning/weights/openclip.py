"""OpenCLIP's text towers by name (``ViT-L-14``, ``ViT-H-14``) and their released weights.

The architecture is open_clip's own model config plus the activation the weights were trained with:
open_clip's ``ViT-L-14`` config says GELU, and only its ``openai`` tag records QuickGELU (which
``create_model`` merely warns about), so the activation is read from the tag's record, or given.
Only the text tower is built (the vision tower, 300M+ parameters, is never made) and only its
tensors are read, from a local file or from the Hugging Face cache, which is looked up before any
download: offline, a missing file is one error at once, not a minute of hub retries.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
from torch import nn

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)
PREFIXES = ("", "text.", "module.")  # CLIP's top-level names, CustomTextCLIP's, a DDP checkpoint's


def text_config(name: str) -> dict[str, Any]:
    """open_clip's ``text_cfg`` of the model ``name`` (``ViT-H-14``), and its ``embed_dim``."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise InputError(
            f"text_encoder.name={name!r} is not an OpenCLIP model (e.g. ViT-L-14, ViT-H-14, "
            "ViT-bigG-14)"
        )
    if "hf_model_name" in cfg["text_cfg"]:
        raise InputError(f"text_encoder.name={name!r} has a Hugging Face text tower, not read")
    return {**cfg["text_cfg"], "embed_dim": cfg["embed_dim"], "quick_gelu": cfg.get("quick_gelu")}


def tag_quick_gelu(name: str, tag: str | None) -> bool:
    """Whether the weights of ``tag`` were trained with QuickGELU (OpenAI's: yes), or the model
    config says so."""
    import open_clip

    record = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    return bool((record or {}).get("quick_gelu") or text_config(name)["quick_gelu"])


def text_tower(name: str, quick_gelu: bool) -> nn.Module:
    """open_clip's ``TextTransformer`` of the model ``name`` with that activation, random
    weights (build it under ``torch.device("meta")`` to allocate nothing)."""
    from open_clip.model import _build_text_tower

    cfg = text_config(name)
    cfg.pop("quick_gelu")
    embed_dim = cfg.pop("embed_dim")
    return _build_text_tower(embed_dim, cfg, quick_gelu=quick_gelu)


def activation(tower: nn.Module) -> str:
    """``quick_gelu`` or ``gelu``: what a text tower's MLP runs (transformers' ``hidden_act``)."""
    from open_clip.transformer import QuickGELU

    mlp = tower.transformer.resblocks[0].mlp
    return "quick_gelu" if isinstance(getattr(mlp, "gelu", None), QuickGELU) else "gelu"


# -- weights ----------------------------------------------------------------------------------------
def weights_file(
    name: str, pretrained: str, cache_dir: str | None, option: str = "text_encoder.pretrained"
) -> str:
    """The file of ``pretrained`` (a path, or a tag whose file is in the cache or downloaded
    now); one clear error when it cannot be had, before any retry."""
    import open_clip

    if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise InputError(
                f"{option}={pretrained!r}: no such file. Point it at an OpenCLIP "
                f"weights file (open_clip_pytorch_model.bin or open_clip_model.safetensors of "
                f"{name})"
            )
        return pretrained
    record = open_clip.get_pretrained_cfg(name, pretrained)
    if not record:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise InputError(
            f"{option}={pretrained!r} is not an OpenCLIP tag of {name} (its tags: "
            f"{tags}) nor a weights file"
        )
    hub = record.get("hf_hub", "")  # "org/model/" (open_clip's default file names) or ".../file"
    repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
    if filename:
        candidates = [f"{filename[:-4]}.safetensors"] if filename.endswith((".bin", ".pth")) else []
        candidates.append(filename)
    else:
        candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    cached = _cached(repo, candidates, cache_dir) if repo else None
    if cached:
        return cached
    fix = (
        f'download them where there is network (python -c "import open_clip; '
        f"open_clip.create_model('{name}', pretrained='{pretrained}')\" fills the Hugging Face "
        f"cache; copy ~/.cache/huggingface or set {option.rsplit('.', 1)[0]}.cache_dir), or set "
        f"{option}=/path/to/open_clip_pytorch_model.bin"
    )
    if not _hub_reachable():
        raise InputError(
            f"OpenCLIP {name} weights {pretrained!r} are not in the cache "
            f"({repo or record.get('url')}) and the hub cannot be reached: {fix}"
        )
    try:
        return open_clip.pretrained.download_pretrained(record, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - the hub's reasons vary; the fix does not
        raise InputError(
            f"could not download OpenCLIP {name} weights {pretrained!r} ({e}): {fix}"
        ) from None


def _cached(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline clusters: no, at once)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_text_weights(tower: nn.Module, path: str, where: str) -> None:
    """The text tower's tensors of an OpenCLIP weights file (a whole CLIP's; the vision tower's
    are not read) into ``tower``, every one of its keys found with its shape."""
    from sd_lightning.weights.files import identify, read_weight_file
    from sd_lightning.weights.read import check_keys

    found = read_weight_file(path, where, "an OpenCLIP weights file", mmap=True)
    state = found.lazy_tensors()
    if "state_dict" in state:  # a training checkpoint
        state = state["state_dict"]
    own = tower.state_dict()
    prefix = next((p for p in PREFIXES if p + "token_embedding.weight" in state), None)
    if prefix is None:
        what = identify(list(state), found.stage) or "a file without an OpenCLIP text tower"
        raise InputError(
            f"{where}={path!r} is {what}, not OpenCLIP weights (no token_embedding): give an "
            "OpenCLIP weights file, a tag, or SD weights"
        )
    picked = {k: state[prefix + k] for k in own if prefix + k in state}
    check_keys(tower, picked, f"{where}={path!r}")
    tower.load_state_dict({k: v.float() for k, v in picked.items()})


def pretrained_tower(
    name: str, pretrained: str, cache_dir: str | None, quick_gelu: bool | None
) -> nn.Module:
    """The text tower of OpenCLIP ``name`` with the weights ``pretrained`` (a tag or a file);
    ``quick_gelu``: the activation (``None``: what the tag records)."""
    path = weights_file(name, pretrained, cache_dir)
    if quick_gelu is None:
        quick_gelu = tag_quick_gelu(name, pretrained)
    with torch.device("meta"):
        tower = text_tower(name, quick_gelu)
    tower = tower.to_empty(device="cpu")
    load_text_weights(tower, path, "text_encoder.pretrained")
    if tower.attn_mask is not None:  # a buffer outside the weights, empty after to_empty
        tower.attn_mask = tower.build_causal_mask()
    log.info(
        "text encoder: OpenCLIP %s (%s), %s, from %s",
        name,
        pretrained,
        activation(tower),
        path,
    )
    return tower
