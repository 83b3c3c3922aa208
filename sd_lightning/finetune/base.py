"""The base weights a partial fine-tune (LoRA) trains on top of: its checkpoints hold only the
trained parameters and a reference to the base (path and SHA-256), checked when they are read
again, so an adapter is never silently applied to other weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch

from sd_lightning.core.errors import InputError

log = logging.getLogger(__name__)
CHUNK = 16 << 20


def _files(path: str) -> list[str]:
    """The file, or a diffusers folder's weight files (sorted, relative order fixed)."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            if name.endswith((".safetensors", ".bin")):
                found.append(os.path.join(root, name))
    return sorted(found)


def fingerprint(path: str) -> str:
    """SHA-256 of the weights (a file's bytes, as AUTOMATIC1111 and civitai hash models; a
    folder's weight files in name order)."""
    digest = hashlib.sha256()
    for name in _files(path):
        with open(name, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sd_lightning", "sha256.json")


def cached_fingerprint(path: str) -> str:
    """:func:`fingerprint`, remembered per user by path, sizes and modification times (as
    AUTOMATIC1111 caches model hashes): a LoRA checkpoint resumed or sampled again does not read
    its 4 GB base again. A changed file is hashed anew."""
    key = os.path.abspath(path)
    stamp = [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in _files(path)]
    cache_path = _cache_file()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = fingerprint(path)
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:  # best effort: a read-only home only costs the hash next time
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return digest


def base_reference(path: str) -> dict[str, Any]:
    return {"path": os.path.abspath(path), "sha256": cached_fingerprint(path)}


def check_base(
    saved: dict[str, Any] | None,
    current: dict[str, Any] | None,
    where: str,
    option: str = "pretrained",
) -> None:
    """A partial checkpoint's base must be the weights it is loaded onto; the error names the
    option that gives them (``pretrained=`` when resuming, ``base=`` when sampling)."""
    if not saved or not current:
        return
    if saved["sha256"] != current["sha256"]:
        raise InputError(
            f"{where} holds adapters trained on {saved['path']} (sha256 {saved['sha256'][:12]}), "
            f"but the base weights now are {current['path']} (sha256 "
            f"{current['sha256'][:12]}): give {option}= the weights it was trained on"
        )


def rebased(config: Any, old: str, new: str) -> Any:
    """``config`` (plain containers) with every path to the base ``old`` (its VAE, its text
    encoder, a part inside its folder) pointing to ``new`` instead."""
    if isinstance(config, dict):
        return {k: rebased(v, old, new) for k, v in config.items()}
    if isinstance(config, list):
        return [rebased(v, old, new) for v in config]
    if isinstance(config, str) and (
        config == old or config.startswith(old.rstrip(os.sep) + os.sep)
    ):
        return new + config[len(old) :]
    return config


def trained_state(
    system: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (the system's) that a partial checkpoint keeps: the trainable
    parameters, their EMA copies, the EMA's count and the latent scale."""
    trained = {n for n, p in system.named_parameters() if p.requires_grad}
    ema = {"ema.net." + n[len("unet.") :] for n in trained if n.startswith("unet.")}
    keep = trained | ema | {"ema.num_updates", "latent_scale"}
    return {k: v for k, v in state.items() if k in keep}
