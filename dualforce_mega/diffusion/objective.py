"""The Diffusion Forcing training objective: batch -> noisy model inputs -> weighted losses.

```
obj = DiffusionForcingObjective(cfg)
inputs, targets = obj.prepare(batch, seeds)     # seeds: LongTensor [B], one per sample
out = model(**inputs, return_aux=True)
loss, metrics = obj.losses(out, targets)        # metrics as floats (reads the device)
loss, metrics = obj.loss_terms(out, targets)    # metrics as 0-dim device tensors (no host sync)
```
Which streams take part follows the config: the video stream always; struct (+ kp_canonical, FLAME)
when ``train.phase == 4`` and ``model.struct_tower``; audio when ``train.phase == 4`` and
``model.audio``. Phase 2 is video only. A loss with weight 0 is neither computed nor logged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

from ..config import Config, ConfigError
from ..timeline import Timeline
from .flow import add_noise, velocity_target
from .losses import (bucket_count_name, bucket_metric_name, info_nce, masked_mse_sum_count, mean_from_sum_count,
                     per_frame_mse, pool_blocks, sigma_bucket_edges, sigma_bucket_index)
from .noise import draw_batch_noise

LOSS_KEYS = ("video", "struct", "flame", "lipsync")


@dataclass
class Targets:
    """What ``losses`` needs besides the model output. ``.to(device)`` moves every tensor except the
    ``*_host`` copies, which stay on the host so that masks and bucket counts need no device read."""
    video: torch.Tensor                          # [B, C, F, H, W] velocity target
    sigma_video: torch.Tensor                    # [B, F]
    frame_valid: torch.Tensor                    # [F] bool: latent frames in the loss (not the reference)
    struct: Optional[torch.Tensor] = None        # [B, N, motion_dim] velocity target
    struct_valid: Optional[torch.Tensor] = None  # [N] bool: video frames in the loss
    flame: Optional[torch.Tensor] = None         # [B, N, flame_dim] ground truth
    flame_valid: Optional[torch.Tensor] = None   # [B] 1 where the clip has FLAME, 0 where it has none
    sigma_video_host: Optional[torch.Tensor] = None  # [B, F] on the host (sigma buckets)
    frame_valid_host: Optional[torch.Tensor] = None  # [F] bool on the host (lip-sync frame selection)

    def to(self, device: Any) -> "Targets":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Targets(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor)
                          and not k.endswith("_host") else v for k, v in moved.items()})


def _require_key(batch: dict, key: str, why: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch[{key!r}] is missing; it is needed because {why}")
    return batch[key]


class DiffusionForcingObjective:
    """``dp_group``: the data-parallel process group whose clips serve as lip-sync negatives
    (``diffusion.lipsync_negatives: dp``); None = this micro batch only."""

    def __init__(self, cfg: Config, dp_group: Optional[Any] = None):
        self.cfg = cfg
        self.dp_group = dp_group if cfg.diffusion.lipsync_negatives == "dp" else None
        d = cfg.diffusion
        self.weights = {k: float(getattr(d, f"loss_{k}")) for k in LOSS_KEYS}
        for k, w in self.weights.items():
            if w < 0:
                raise ConfigError(f"diffusion.loss_{k}: weight {w} must be >= 0 (0 switches the loss off)")
        if d.lipsync_temperature <= 0:
            raise ConfigError(f"diffusion.lipsync_temperature: {d.lipsync_temperature} must be > 0")
        full = cfg.train.phase == 4
        self.use_struct = full and cfg.model.struct_tower
        self.use_audio = full and cfg.model.audio
        self.use_text = cfg.model.text_dim > 0
        active = [k for k in LOSS_KEYS if self.weights[k] > 0 and self._loss_possible(k)]
        if not active:
            raise ConfigError("diffusion.loss_video: every loss weight usable in this configuration is 0 "
                              f"(train.phase={cfg.train.phase}, model.struct_tower={cfg.model.struct_tower}, "
                              f"model.audio={cfg.model.audio})")

    def _loss_possible(self, key: str) -> bool:
        if key == "video":
            return True
        if key == "lipsync":
            return self.use_struct and self.use_audio
        return self.use_struct

    # ------------------------------------------------------------------------------------
    def prepare(self, batch: dict, seeds: torch.Tensor) -> tuple[dict, Targets]:
        """Noisy model inputs (a dict of ``DualForceModel.forward`` kwargs) and the loss targets."""
        cfg = self.cfg
        x0 = _require_key(batch, "video_latent", "the video stream is always trained")
        b, _, f = x0.shape[:3]
        if seeds.numel() != b:
            raise ValueError(f"seeds: {seeds.numel()} seeds for a batch of {b} samples")
        device = x0.device
        struct0 = _require_key(batch, "struct", "train.phase=4 with model.struct_tower=true") \
            if self.use_struct else None
        noise = draw_batch_noise(seeds, x0.shape[1:], struct0.shape[1:] if struct0 is not None else None,
                                 cfg.diffusion, cfg.model.causal_block_size)

        sigma_v = noise.sigma_video.to(device)
        eps_v = noise.eps_video.to(device=device, dtype=x0.dtype)
        inputs: dict = {
            "video_latent": add_noise(x0, eps_v, sigma_v[:, None, :, None, None].to(x0.dtype)),
            "sigma_video": sigma_v,
        }
        frame_valid_host = torch.arange(f) > 0
        frame_valid = frame_valid_host.to(device)
        targets = Targets(video=velocity_target(x0, eps_v), sigma_video=sigma_v, frame_valid=frame_valid,
                          sigma_video_host=noise.sigma_video, frame_valid_host=frame_valid_host)
        if self.use_text and "text_emb" in batch:
            inputs["text_emb"] = batch["text_emb"]
            inputs["text_drop"] = noise.text_drop.to(device)

        if struct0 is not None:
            frame_of_token = Timeline.of(cfg.model).latent_of_video_frames(torch.arange(f)).to(device)
            if struct0.shape[1] != frame_of_token.numel():
                raise ValueError(f"batch['struct']: {struct0.shape[1]} frames, but a window of {f} latent frames "
                                 f"holds {frame_of_token.numel()} video frames")
            sigma_s = noise.sigma_struct.to(device)
            eps_s = noise.eps_struct.to(device=device, dtype=struct0.dtype)
            sig_tok = sigma_s[:, frame_of_token].unsqueeze(-1).to(struct0.dtype)
            inputs["struct"] = add_noise(struct0, eps_s, sig_tok)
            inputs["sigma_struct"] = sigma_s
            if "kp_canonical" in batch:
                inputs["kp_canonical"] = batch["kp_canonical"]
            targets.struct = velocity_target(struct0, eps_s)
            targets.struct_valid = frame_valid[frame_of_token]
            if self.weights["flame"] > 0:
                targets.flame = _require_key(batch, "flame", "diffusion.loss_flame > 0")
                targets.flame_valid = batch.get("flame_valid")
        if self.use_audio:
            inputs["audio"] = _require_key(batch, "audio", "train.phase=4 with model.audio=true")
            inputs["audio_drop"] = noise.audio_drop.to(device)
        return inputs, targets

    # ------------------------------------------------------------------------------------
    def losses(self, out: Any, targets: Targets) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total loss (scalar) and logged metrics (``loss``, ``loss_<term>``, sigma buckets) as
        floats. Reads the device once; the training step uses ``loss_terms`` and reads at log steps."""
        loss, metrics = self.loss_terms(out, targets)
        return loss, metrics_to_floats(metrics)

    def loss_terms(self, out: Any, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss (scalar) and the logged metrics as detached 0-dim tensors, computed without
        reading the device (masks and bucket counts come from the targets' host copies)."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["video"] > 0:
            valid = targets.frame_valid[None, None, :, None, None]
            terms["video"] = mean_from_sum_count(*masked_mse_sum_count(out.video, targets.video, valid))
        if w["struct"] > 0 and out.struct is not None and targets.struct is not None:
            valid = targets.struct_valid[None, :, None]
            terms["struct"] = mean_from_sum_count(*masked_mse_sum_count(out.struct, targets.struct, valid))
        if w["flame"] > 0 and out.flame is not None and targets.flame is not None:
            valid = targets.struct_valid[None, :, None]
            if targets.flame_valid is not None:   # clips without FLAME (has_flame false) are skipped
                valid = valid & (targets.flame_valid.to(valid.device)[:, None, None] > 0)
            terms["flame"] = mean_from_sum_count(*masked_mse_sum_count(out.flame, targets.flame, valid))
        lip_a, lip_s = getattr(out, "lip_audio", None), getattr(out, "lip_struct", None)
        if w["lipsync"] > 0 and lip_a is not None and lip_s is not None:
            # one positive per causal block: the block is what the model generates at once
            valid = targets.frame_valid_host if targets.frame_valid_host is not None else targets.frame_valid
            block = self.cfg.model.causal_block_size
            lip_a, valid_blocks = pool_blocks(lip_a, valid, block)
            lip_s, _ = pool_blocks(lip_s, valid, block)
            terms["lipsync"] = info_nce(lip_a, lip_s, valid_blocks, self.cfg.diffusion.lipsync_temperature,
                                        self.dp_group)
        if not terms:
            raise ValueError("losses: no loss term could be computed (model output lacks every weighted stream)")

        loss = sum(w[k] * v for k, v in terms.items())
        metrics = {"loss": loss.detach()}
        metrics.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        if "video" in terms:
            metrics.update(self._sigma_buckets(per_frame_mse(out.video.detach(), targets.video), targets))
        return loss, metrics

    def _sigma_buckets(self, frame_loss: torch.Tensor, targets: Targets) -> dict[str, Any]:
        """Mean video loss per sigma bin over the valid frames (empty bins omitted), as device tensors, and
        each bin's frame count (``frames_video_sigma_*``: the weight of its mean across micro batches);
        bin membership and counts come from the host copy of sigma (the same bins as ``sigma_bucket_stats``)."""
        nb = self.cfg.diffusion.sigma_buckets
        sigma = targets.sigma_video_host if targets.sigma_video_host is not None else targets.sigma_video.cpu()
        valid = targets.frame_valid_host if targets.frame_valid_host is not None else targets.frame_valid.cpu()
        member = torch.nn.functional.one_hot(sigma_bucket_index(sigma, nb), nb).float()   # [B, F, nb]
        member = member * valid.expand(sigma.shape).unsqueeze(-1)
        counts = member.sum((0, 1))
        sums = torch.einsum("bf,bfk->k", frame_loss.float(), member.to(frame_loss.device, non_blocking=True))
        edges = sigma_bucket_edges(nb).tolist()
        out: dict[str, Any] = {}
        for k in range(nb):
            if counts[k] > 0:
                name = bucket_metric_name(edges[k], edges[k + 1])
                out[name] = sums[k] / counts[k]
                out[bucket_count_name(name)] = float(counts[k])   # host: no device read
        return out


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """0-dim tensors (and numbers) -> floats, with one device read for all of them."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}
