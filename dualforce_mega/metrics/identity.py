"""Identity metrics on ArcFace embeddings.

* CSIM: mean over generated frames of the cosine similarity between the reference image's embedding
  and the frame's embedding (the per-frame values are the identity-drift curve).
* ACD (Average Content Distance, Tulyakov et al., MoCoGAN, CVPR 2018, "ACD-I"): the mean L2 distance
  between the identity embeddings of all pairs of frames of one video, with L2-normalised ArcFace
  embeddings (MoCoGAN used OpenFace features); lower = a more consistent identity.
"""
from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def csim_per_frame(reference: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """reference [D], frames [T, D] -> cosine similarity [T]."""
    return _unit(frames) @ _unit(reference)


def csim(reference: np.ndarray, frames: np.ndarray) -> float:
    return float(csim_per_frame(reference, frames).mean())


def acd(frames: np.ndarray) -> float:
    """frames [T >= 2, D] -> mean over the T(T-1)/2 frame pairs of |e_i - e_j| (unit embeddings)."""
    e = _unit(frames)
    if len(e) < 2:
        raise ValueError("ACD needs at least 2 frames")
    d = np.linalg.norm(e[:, None, :] - e[None, :, :], axis=-1)
    i, j = np.triu_indices(len(e), k=1)
    return float(d[i, j].mean())
