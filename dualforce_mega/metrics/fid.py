"""FID on video frames: FID Inception pool3 features of RGB frames in [0, 1] (``inception.py``), then
the Fréchet distance of the real and the generated feature sets (``frechet.py``), as pytorch-fid."""
from __future__ import annotations

import numpy as np
import torch

from .inception import FIDInception


class FrameFeatures:
    """``__call__(frames uint8 [N, H, W, 3])`` -> float64 [N, feature_dim]."""

    def __init__(self, net: FIDInception, device: torch.device, batch: int = 32):
        self.net, self.device, self.batch = net.to(device).eval(), device, batch

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(frames), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[i:i + self.batch])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out.append(self.net(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.net.feature_dim))

