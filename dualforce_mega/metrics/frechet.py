"""Fréchet distance between two Gaussians fitted to feature sets (FID, FVD).

Matches mseitzer/pytorch-fid ``calculate_frechet_distance``: d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 sqrtm(S1 S2)),
covariances from ``np.cov(rowvar=False)`` in float64; when sqrtm is not finite, eps·I is added to both
covariances; an imaginary part above 1e-3 on the diagonal is an error.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

SQRTM_EPS = 1e-6
IMAG_TOL = 1e-3


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]), both float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features for a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    return scipy.linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = SQRTM_EPS) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: sqrtm(S1 S2) is singular; adding %g to the covariance diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > IMAG_TOL:
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))
