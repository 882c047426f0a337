"""S3FD face detector (the detector of the SyncNet reference pipeline and of face-alignment) loading
the official ``s3fd-619a316812.pth`` state dict strictly, batched on any device.

Network and decoding follow 1adrianb/face-alignment ``detection/sfd`` (``net_s3fd.py``,
``detect.py``, ``bbox.py``): VGG16 trunk + fc6/fc7 + conv6/conv7, L2-normalised conv3_3 / 4_3 / 5_3
(scales 10 / 8 / 5), six (conf, loc) heads at strides 4..128 with square anchors of 4x the stride,
max-out background on the first head; input RGB float minus (104, 117, 123); boxes decoded SSD
style with variances (0.1, 0.2), candidates above 0.05, NMS at IoU 0.3, kept above ``threshold``
(0.5 in face-alignment, 0.9 in syncnet_python).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .face import Faces, _check_frames, box_iou

MEAN_RGB = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
CANDIDATE_SCORE = 0.05
NMS_IOU = 0.3
ANCHOR_PER_STRIDE = 4
FIRST_STRIDE = 4
# (name, in, out) of the VGG16 trunk; a 2x2 max-pool follows the last conv of each stage
_TRUNK = [[("conv1_1", 3, 64), ("conv1_2", 64, 64)], [("conv2_1", 64, 128), ("conv2_2", 128, 128)],
          [("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)],
          [("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)],
          [("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]]
# detection sources: (feature name, channels, conf channels)
_HEADS = [("conv3_3_norm", 256, 4), ("conv4_3_norm", 512, 2), ("conv5_3_norm", 512, 2), ("fc7", 1024, 2),
          ("conv6_2", 512, 2), ("conv7_2", 256, 2)]


class L2Norm(nn.Module):
    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """Outputs [cls_1, loc_1, ..., cls_6, loc_6]: cls [B, 2, h, w] logits, loc [B, 4, h, w]."""

    def __init__(self):
        super().__init__()
        for stage in _TRUNK:
            for name, cin, cout in stage:
                setattr(self, name, nn.Conv2d(cin, cout, 3, 1, 1))
        self.fc6 = nn.Conv2d(512, 1024, 3, 1, padding=3)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.conv6_1, self.conv6_2 = nn.Conv2d(1024, 256, 1), nn.Conv2d(256, 512, 3, 2, 1)
        self.conv7_1, self.conv7_2 = nn.Conv2d(512, 128, 1), nn.Conv2d(128, 256, 3, 2, 1)
        self.conv3_3_norm, self.conv4_3_norm, self.conv5_3_norm = L2Norm(256, 10), L2Norm(512, 8), L2Norm(512, 5)
        for name, ch, conf in _HEADS:
            setattr(self, f"{name}_mbox_conf", nn.Conv2d(ch, conf, 3, 1, 1))
            setattr(self, f"{name}_mbox_loc", nn.Conv2d(ch, 4, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = {}
        h = x
        for stage in _TRUNK:
            for name, _, _ in stage:
                h = F.relu(getattr(self, name)(h))
            feats[stage[-1][0]] = h
            h = F.max_pool2d(h, 2, 2)
        h = F.relu(self.fc7(F.relu(self.fc6(h))))
        feats["fc7"] = h
        h = F.relu(self.conv6_2(F.relu(self.conv6_1(h))))
        feats["conv6_2"] = h
        feats["conv7_2"] = F.relu(self.conv7_2(F.relu(self.conv7_1(h))))
        for name in ("conv3_3", "conv4_3", "conv5_3"):
            feats[f"{name}_norm"] = getattr(self, f"{name}_norm")(feats.pop(name))
        out = []
        for name, _, _ in _HEADS:
            cls = getattr(self, f"{name}_mbox_conf")(feats[name])
            if cls.shape[1] == 4:      # max-out background label
                c = cls.chunk(4, dim=1)
                cls = torch.cat([torch.max(torch.max(c[0], c[1]), c[2]), c[3]], dim=1)
            out += [cls, getattr(self, f"{name}_mbox_loc")(feats[name])]
        return out


def decode_level(cls: torch.Tensor, loc: torch.Tensor, stride: int) -> tuple[torch.Tensor, ...]:
    """One head's (logits [B, 2, h, w], loc [B, 4, h, w]) -> (frame index, x0 y0 x1 y1, score) of the
    anchors scoring above CANDIDATE_SCORE."""
    score = cls.float().softmax(dim=1)[:, 1]
    b, yy, xx = torch.nonzero(score > CANDIDATE_SCORE, as_tuple=True)
    prior_c = torch.stack([stride / 2 + xx * stride, stride / 2 + yy * stride], dim=1).float()
    size = float(stride * ANCHOR_PER_STRIDE)
    d = loc.float()[b, :, yy, xx]                                        # [K, 4]
    centre = prior_c + d[:, :2] * VARIANCES[0] * size
    wh = size * torch.exp(d[:, 2:] * VARIANCES[1])
    return b, torch.cat([centre - wh / 2, centre + wh / 2], dim=1), score[b, yy, xx]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first."""
    order = np.argsort(-scores)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        order = order[1:][box_iou(boxes[i:i + 1], boxes[order[1:]])[0] <= iou]
    return np.asarray(keep, dtype=np.int64)


class S3FDDetector:
    """S3FD over frames in batches of ``batch``; ``scale`` resizes frames first (syncnet_python: 0.25)."""
    name = "s3fd"

    def __init__(self, net: S3FD, device: Union[str, torch.device] = "cpu", threshold: float = 0.5,
                 scale: float = 1.0, batch: int = 16):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.threshold, self.scale, self.batch = threshold, scale, batch

    @classmethod
    def from_path(cls, weights: Union[str, Path], device: Union[str, torch.device] = "cpu", **kwargs) -> "S3FDDetector":
        from ..metrics.weights import load_state_dict_strict
        return cls(load_state_dict_strict(S3FD(), weights, "S3FD (s3fd-619a316812.pth)"), device, **kwargs)

    @torch.no_grad()
    def detect(self, frames: np.ndarray) -> list[Faces]:
        _check_frames(frames)
        out: list[Faces] = []
        mean = torch.tensor(MEAN_RGB, device=self.device).view(1, 3, 1, 1)
        for s in range(0, len(frames), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[s:s + self.batch])).to(self.device)
            x = x.permute(0, 3, 1, 2).float()
            if self.scale != 1.0:
                x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
            heads = self.net(x - mean)
            found = [decode_level(heads[2 * i], heads[2 * i + 1], FIRST_STRIDE * 2 ** i) for i in range(len(heads) // 2)]
            fidx = torch.cat([f[0] for f in found]).cpu().numpy()
            boxes = (torch.cat([f[1] for f in found]) / self.scale).cpu().numpy()
            scores = torch.cat([f[2] for f in found]).cpu().numpy()
            for j in range(x.shape[0]):
                sel = fidx == j
                b, sc = boxes[sel], scores[sel]
                keep = nms(b, sc, NMS_IOU) if len(b) else np.zeros(0, np.int64)
                keep = keep[sc[keep] > self.threshold]
                out.append(Faces(b[keep].astype(np.float32), sc[keep].astype(np.float32)))
        return out


__all__ = ["S3FD", "S3FDDetector", "decode_level", "nms"]
