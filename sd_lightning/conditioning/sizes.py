"""SDXL's micro-conditioning: the image's original size, the crop's top-left corner and the target
size, six numbers per image, each through a sinusoidal embedding and concatenated (SGM's three
``ConcatTimestepEmbedderND``; diffusers' ``add_time_ids`` in the same order: original height and
width, crop top and left, target height and width), then appended to the pooled text vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sd_lightning.models.unet_blocks import timestep_embedding

FIELDS = ("original_size", "crop_top_left", "target_size")  # as the data pipelines name them


def size_ids(batch: dict, n: int, size: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(n, 6)``: the batch's original size, crop and target size where it has them (buckets,
    shards, latent shards), else what a square crop of ``size`` (height, width) would have:
    original = target = ``size``, crop (0, 0)."""
    h, w = int(size[0]), int(size[1])
    defaults = {"original_size": (h, w), "crop_top_left": (0, 0), "target_size": (h, w)}
    parts = []
    for field in FIELDS:
        value = batch.get(field)
        if value is None:
            value = torch.tensor(defaults[field]).expand(n, 2)
        parts.append(torch.as_tensor(value).reshape(n, 2).to(device=device, dtype=torch.float32))
    return torch.cat(parts, dim=1)


def sampling_ids(
    n: int,
    size: Sequence[int],
    original: Sequence[int] | None = None,
    crop: Sequence[int] = (0, 0),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(n, 6)`` for sampling at ``size`` (height, width): original = target = the image size,
    crop (0, 0), as diffusers' SDXL pipeline does, unless ``original``/``crop`` say otherwise."""
    original = tuple(size) if original is None else tuple(original)
    row = torch.tensor([*original, *crop, *size], dtype=torch.float32, device=device)
    return row.expand(n, 6)


def size_embedding(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """``(n, 6 * dim)``: each of the six numbers embedded like a timestep (cosines first)."""
    n = ids.shape[0]
    return timestep_embedding(ids.reshape(-1), dim).reshape(n, -1)
