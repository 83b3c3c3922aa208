"""``stage=eval``'s checks, before a network is built: which model (``ckpt=`` or ``vae_ckpt=``),
every number of ``eval.``, the guidance list, and that the prompts, the reference set and the
metric weights' files are there. Each error names the option, the value and the fix."""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, ListConfig

from sd_lightning.commands.options import choice, whole
from sd_lightning.commands.preflight import check_sampling_source, check_seed
from sd_lightning.core.errors import InputError

DIMS = (64, 192, 768, 2048)  # evaluation.inception.DIMS, without importing torch here


def guidance_values(value: Any) -> list[float]:
    """``eval.guidance``: a number or a list of numbers >= 0."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    example = "eval.guidance=[1.5,2,3,4,5,6,7,8]"
    if not values:
        raise InputError(f"eval.guidance is empty: give one value or a list, e.g. {example}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(
                f"eval.guidance={list(values)!r}: {v!r} is not a number >= 0 (1: no guidance); "
                f"give numbers, e.g. {example}"
            )
    values = [float(v) for v in values]
    if len(set(values)) != len(values):
        raise InputError(
            f"eval.guidance={values}: a value is given twice; give each guidance value once"
        )
    return values


def check_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    ckpt, vae = cfg.get("ckpt"), cfg.get("vae_ckpt")
    if (ckpt is None) == (vae is None):
        raise InputError(
            "stage=eval evaluates one model: give ckpt=<stage-2 checkpoint, SD file or diffusers "
            "folder> (FID, KID, CLIP score) or vae_ckpt=<stage-1 checkpoint or SD VAE> (rFID, "
            "PSNR, SSIM, LPIPS)"
            + (f"; both are given (ckpt={ckpt!r}, vae_ckpt={vae!r})" if ckpt is not None else "")
        )
    for option in ("batch_size", "kid_subsets", "kid_subset_size"):
        whole(e.get(option), f"eval.{option}", 1)
    whole(e.get("grid_images"), "eval.grid_images", 0)
    if e.get("reference_count") is not None:
        whole(e.reference_count, "eval.reference_count", 2)
    if e.get("feature_dim") not in DIMS:
        raise InputError(
            f"eval.feature_dim={e.get('feature_dim')!r}: choose 2048 (the FID papers report), or "
            "64, 192, 768 (Inception's earlier poolings, for small sets)"
        )
    choice(e.get("resize"), "eval.resize", ("clean", "legacy_tensorflow", "legacy_pytorch"))
    choice(e.get("reference_crop"), "eval.reference_crop", ("centre", "none"))
    if e.get("fid_size") is not None:
        whole(e.fid_size, "eval.fid_size", 8, "256")
    if cfg.get("image_size") is not None:
        whole(cfg.image_size, "image_size", 8, "512")
    if not e.get("reference"):
        raise InputError(
            "eval.reference is not set: give the real images to compare with (shards, e.g. "
            "'/data/coco/{00000..00059}.tar', or a folder of images)"
        )
    _exists(str(e.reference), "eval.reference")
    if e.inception not in (None, "random") and not os.path.isfile(str(e.inception)):
        raise InputError(
            f"eval.inception={e.inception!r}: no such file. Point it at "
            "weights-inception-2015-12-05-6726825d.pth (docs/evaluation.md), or leave it null "
            "for torch hub's cache"
        )
    if vae is not None:
        return
    whole(e.get("num_images"), "eval.num_images", 2, "30000")
    for option, low in (("steps", 1),):
        whole(cfg.get(option), option, low)
    guidance_values(e.get("guidance"))
    if cfg.seed is None:
        raise InputError("seed=null: evaluation needs a seed (image i starts from seed + i)")
    check_seed(cfg.seed)
    if e.get("prompt_seed") is not None:
        check_seed(e.prompt_seed, "eval.prompt_seed")
    if not e.get("prompts"):
        raise InputError(
            "eval.prompts is not set: give a text file with one caption a line, or shards whose "
            "captions are used"
        )
    _exists(str(e.prompts), "eval.prompts")
    check_sampling_source(str(ckpt))


def _exists(path: str, option: str) -> None:
    """A local file, folder or shard pattern (a pattern is expanded later)."""
    if "{" in path or "::" in path or "://" in path or path.startswith("pipe:"):
        return
    if not os.path.exists(path) and not any(c in path for c in "*?["):
        raise InputError(f"{option}={path!r}: no such file or folder")
