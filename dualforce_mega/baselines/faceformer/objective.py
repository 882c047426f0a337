"""FaceFormer's loss: mean squared distance between the FLAME vertices of the predicted and the ground-truth
motion over the real (unpadded) frames, in (``model.vertex_scale`` x FLAME units)^2 -- mm^2 by default
(the reference's MSE is in m^2, where gradients of ~1e-7 sit near Adam's epsilon)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...models.flame import FlameModel


class VertexLoss(nn.Module):
    def __init__(self, flame: FlameModel, vertex_scale: float):
        super().__init__()
        self.flame = flame
        self.scale = vertex_scale

    def sums(self, pred: torch.Tensor, motion: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squared scaled vertex errors, number of vertex coordinates) over the masked frames."""
        pred, motion = pred.float()[mask], motion.float()[mask]        # [N, D]
        diff = (self.flame.motion_vertices(pred) - self.flame.motion_vertices(motion)) * self.scale
        return (diff * diff).sum(), torch.tensor(diff.numel(), dtype=torch.float32, device=diff.device)

    def forward(self, pred: torch.Tensor, motion: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, count = self.sums(pred, motion, mask)
        loss = total / count.clamp_min(1)
        motion_mse = ((pred.float() - motion.float()) ** 2)[mask].mean()
        return loss, {"loss": loss.detach(), "loss_vertex": loss.detach(), "motion_mse": motion_mse.detach()}
