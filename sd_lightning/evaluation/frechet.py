"""FID and KID from features: the statistics of a set, the Frechet distance between two (scipy's
matrix square root with clean-fid's handling of a singular or complex product) and the kernel distance (the
unbiased MMD with the cubic polynomial kernel over random subsets, clean-fid's defaults)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Mean and covariance (float64) of ``count`` feature rows."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> Stats:
        x = np.asarray(features, dtype=np.float64)
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); a singular product is offset by
    ``eps`` on the diagonal first (pytorch-fid's and clean-fid's rule)."""
    from scipy import linalg

    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):  # clean-fid's rule: the real part (pytorch-fid would stop)
        imaginary = float(np.abs(np.diagonal(covmean).imag).max())
        if imaginary > 1e-3:
            log.warning(
                "FID: the matrix square root has an imaginary part of %.3g (few images for the "
                "feature width?); its real part is used, as clean-fid does",
                imaginary,
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def kernel_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation over ``subsets`` random subsets (of at most
    ``subset_size`` rows of each set) of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dims = a.shape[1]
    m = min(len(a), len(b), subset_size)
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / dims + 1) ** 3
        kyy = (y @ y.T / dims + 1) ** 3
        kxy = (x @ y.T / dims + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())
