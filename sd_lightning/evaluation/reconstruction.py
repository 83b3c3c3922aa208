"""A VAE's reconstructions of the reference set, measured as VAE papers (and REPA-E) report them:
rFID against the set's own features, and PSNR, SSIM and LPIPS per image on the uint8
reconstruction in [0, 1], averaged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from sd_lightning.core import stopping
from sd_lightning.evaluation import frechet
from sd_lightning.evaluation.measure import to_uint8
from sd_lightning.evaluation.reference import batches


@torch.no_grad()
def reconstruction_scores(
    vae: nn.Module,
    lpips: nn.Module,
    inception: nn.Module,
    items: Iterator[tuple[int, torch.Tensor, str]],
    real: np.ndarray,
    gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """rFID, PSNR, SSIM and LPIPS of this rank's ``items`` gathered with the other ranks'; the
    first ``len(real)`` images (``real``: their Inception features) in key order count."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    rows, keys = [], []
    for batch_keys, images, _ in batches(items, batch_size):
        stopping.check("reconstructing images for eval")
        x = images.to(device).float() / 127.5 - 1
        recon = to_uint8(vae.decode(vae.encode(x).mode()))
        a, b = images.to(device).float() / 255, recon.to(device).float() / 255
        mse = ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        per_image = [
            inception(recon).cpu(),
            (10 * torch.log10(1 / mse)).cpu()[:, None],
            ssim(b, a, data_range=1.0, reduction="none").cpu()[:, None],
            lpips(b * 2 - 1, a * 2 - 1).flatten().cpu()[:, None],
        ]
        rows.append(torch.cat(per_image, dim=1))
        keys += batch_keys
    local = torch.cat(rows) if rows else torch.zeros((0, inception.dims + 3))
    found, _ = gather(local, torch.tensor(keys, dtype=torch.long))
    found = found.numpy()[: len(real)]
    fakes = found[:, : inception.dims]
    return {
        "rfid": frechet.frechet_distance(frechet.Stats.of(fakes), frechet.Stats.of(real)),
        "psnr": float(found[:, -3].mean()),
        "ssim": float(found[:, -2].mean()),
        "lpips": float(found[:, -1].mean()),
        "images": len(found),
    }
