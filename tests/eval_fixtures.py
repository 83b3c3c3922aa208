"""Metric weights for evaluation tests, made here in the files' real formats with random values:
Inception-v3's FID weights (a plain state dict, as torch-fidelity publishes it) and an OpenCLIP
folder as the Hugging Face hub holds one (``open_clip_config.json`` beside
``open_clip_model.safetensors``). The tiny CLIP differs from ViT-L/14's defaults where a reader
could assume: QuickGELU, 3 text layers of 6 heads of width 8, an odd embedding width, a
non-default image mean and std and 40 px images."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 40,
            "layers": 2,
            "width": 40,
            "head_width": 10,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 48,
            "heads": 6,
            "layers": 3,
        },
    },
    "preprocess_cfg": {
        "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.26, 0.27],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def inception_file(folder: Path, seed: int = 0) -> Path:
    import torch

    from sd_lightning.evaluation.inception import random_state

    path = folder / "weights-inception-random.pth"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(random_state(seed), path)
    return path


def clip_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random OpenCLIP model in the hub's folder layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    if (folder / "open_clip_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
