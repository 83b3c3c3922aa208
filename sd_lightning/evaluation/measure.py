"""The work of one rank in a generator's evaluation, and the scores of the gathered features.

``generate(captions, seeds)`` is any callable that returns images in [-1, 1] (the stage-2
system's sampler with a guidance value bound); image ``i`` gets caption ``prompts[i]`` and seed
``seed + i``, so the images do not depend on how the indices are split over ranks or batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sd_lightning.evaluation import frechet
from sd_lightning.evaluation.clip_score import torchmetrics_score
from sd_lightning.evaluation.gather import PAD

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as uint8 on their own device (the features are made there)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def measure(
    generate: Callable[[list[str], list[int]], torch.Tensor],
    inception: Callable[[torch.Tensor], torch.Tensor],
    clip: Callable[[torch.Tensor, list[str]], torch.Tensor],
    prompts: Sequence[str],
    indices: Sequence[int],
    seed: int,
    batch_size: int,
    keep: int = 0,
    stop: Callable[[], bool] | None = None,
    adaptive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]] | None:
    """Rows ``[Inception features | CLIP cosine]`` of the images of ``indices`` (``PAD``s
    generated and dropped), their indices, and the uint8 images of indices below ``keep`` (for
    grids). ``stop()`` is asked before each batch; ``None`` when it says yes. Out of GPU memory,
    the batch is halved and tried again where ``adaptive`` (batches as large as fit)."""
    rows, kept, shown = [], [], []
    start = 0
    while start < len(indices):
        if stop is not None and stop():
            return None
        index = list(indices[start : start + batch_size])
        real = [i if i != PAD else 0 for i in index]
        captions = [prompts[i] for i in real]
        try:
            images = to_uint8(generate(captions, [seed + i for i in real]))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1 or not adaptive:  # a sharded U-Net: the ranks stay in step
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            log.warning("eval: out of GPU memory; generating %d images at a time", batch_size)
            continue
        start += len(index)
        mine = [j for j, i in enumerate(index) if i != PAD]
        images, captions = images[mine], [captions[j] for j in mine]
        if not mine:
            continue
        cosines = clip(images, captions)
        rows.append(torch.cat([inception(images).cpu(), cosines.float().cpu()[:, None]], dim=1))
        kept += [index[j] for j in mine]
        shown += [(i, im.cpu()) for i, im in zip(kept[-len(mine) :], images) if i < keep]
    return (
        torch.cat(rows) if rows else torch.zeros((0, 0)),
        torch.tensor(kept, dtype=torch.long),
        shown,
    )


def scores(
    guidance: float,
    features: np.ndarray,
    cosines: np.ndarray,
    real: np.ndarray,
    real_stats: frechet.Stats,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID and CLIP score (torchmetrics' 100 x cosine, and MLPerf's raw cosine)."""
    kid, kid_std = frechet.kernel_distance(features, real, kid_subsets, kid_subset_size, seed)
    return {
        "guidance": float(guidance),
        "fid": frechet.frechet_distance(frechet.Stats.of(features), real_stats),
        "kid": kid,
        "kid_std": kid_std,
        "clip_score": torchmetrics_score(torch.from_numpy(cosines)),
        "clip_cosine": float(cosines.mean()),
        "images": len(features),
    }
