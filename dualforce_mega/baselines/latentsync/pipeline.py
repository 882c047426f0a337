"""LatentSync lip-sync inference (the official ``LipsyncPipeline``), built once and run per pair.

Per video: the face on every frame (the shared detector + one-face tracking of
``dualforce_mega.preprocess.face``; FaceMesh landmarks of ``preprocess.head_pose`` where mediapipe
is installed, as LatentSync 1.0 on CPU), three alignment points (brow centres, nose centre),
smoothed over time, and an affine map per frame (``align.py``).

Per pair: Whisper windows per video frame (``whisper.py``); the video is trimmed to the audio, or
looped forward / backward when the audio is longer; then window by window (``num_frames``
frames): aligned faces -> fixed mouth mask -> VAE latents of the masked and of the full faces ->
DDIM from one shared noise frame, classifier-free guidance against silent (zero) audio features
-> decode -> mouth region pasted into the aligned face -> face pasted back into the frame with a
feathered edge. A second stream shows the masked faces pasted back (the mask video).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from dualforce_mega.preprocess.face import FaceDetector, smooth_boxes, track_face
from dualforce_mega.preprocess.head_pose import estimate_head_pose

from . import align
from .mask import mouth_mask
from .scheduler import build_scheduler
from .unet import LatentSyncUNet
from .whisper import WhisperFeatures

log = logging.getLogger(__name__)

VAE_SCALING = 0.18215      # SD-VAE, as LatentSync sets it (shift 0)
VAE_SHIFT = 0.0
UINT8_MAX = 255.0


class NoFaceError(ValueError):
    pass


@dataclass
class LipSyncOptions:
    num_frames: int = 16          # frames per UNet window
    steps: int = 20
    resolution: int = 256
    smoothing: int = 5            # frames (odd) of the median filter on the alignment points
    landmarks: bool = True        # FaceMesh points where mediapipe is installed (else face-box points)
    fps: int = 25


@dataclass
class FaceAlignment:
    """Per-frame maps from frame pixels to the aligned face, for one video."""
    matrices: np.ndarray          # [T, 2, 3]
    detected: int                 # frames with a linked detection
    filled: int                   # frames without a face that hold the nearest box
    landmarked: int               # frames aligned on FaceMesh landmarks (the rest on the face box)


def loop_indices(num_video: int, num_out: int) -> np.ndarray:
    """Source frame per output frame: the video trimmed, or played forward, backward, forward, ...
    (LatentSync's ``loop_video``) until the audio ends."""
    if num_out <= num_video:
        return np.arange(num_out)
    fwd = np.arange(num_video)
    cycles = -(-num_out // num_video)
    return np.concatenate([fwd if i % 2 == 0 else fwd[::-1] for i in range(cycles)])[:num_out]


def fill_missing(boxes: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN rows take the nearest face box (frames the tracker could not bridge)."""
    ok = ~np.isnan(boxes[:, 0])
    if not ok.any():
        raise NoFaceError("no face found in any frame")
    idx = np.flatnonzero(ok)
    nearest = idx[np.abs(np.arange(len(boxes))[:, None] - idx[None]).argmin(1)]
    return boxes[nearest], int((~ok).sum())


class LipSyncPipeline:
    def __init__(self, unet: LatentSyncUNet, vae: AutoencoderKL, whisper: WhisperFeatures, detector: FaceDetector,
                 options: LipSyncOptions, device: torch.device, dtype: torch.dtype):
        self.unet, self.vae, self.whisper, self.detector = unet.eval(), vae.eval(), whisper, detector
        self.opt, self.device, self.dtype = options, device, dtype
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        r = options.resolution
        if r % self.vae_scale:
            raise ValueError(f"resolution: {r} is not a multiple of the VAE's downsampling {self.vae_scale}")
        cfg = unet.cfg
        if cfg.cross_attention_dim != whisper.dim:
            raise ValueError(f"UNet cross_attention_dim {cfg.cross_attention_dim} != Whisper width {whisper.dim} "
                             f"(384: whisper tiny, 768: whisper small)")
        if cfg.in_channels != 3 * vae.config.latent_channels + 1:
            raise ValueError(f"UNet in_channels {cfg.in_channels} != 3 x VAE latent channels + 1 mask")
        max_len = cfg.motion_module_kwargs.temporal_position_encoding_max_len
        if cfg.use_motion_module and options.num_frames > max_len:
            raise ValueError(f"num_frames: {options.num_frames} > the temporal modules' {max_len} positions")
        self.mask = mouth_mask(r).to(device, dtype)                              # [1, r, r], 1 = keep
        self.latent_mask = F.interpolate(self.mask[None], size=(r // self.vae_scale,) * 2)  # nearest, as official
        self.scheduler = build_scheduler(options.steps)

    # ---------------------------------------------------------------------------------------- faces
    def align_video(self, frames: np.ndarray) -> FaceAlignment:
        """uint8 RGB [T, H, W, 3] -> per-frame alignment (raises :class:`NoFaceError`)."""
        track = track_face(self.detector.detect(frames))
        boxes, filled = fill_missing(track.boxes)
        if filled:
            log.warning("%d of %d frames have no face; they hold the nearest frame's box", filled, len(frames))
        points = align.points_from_boxes(boxes)
        on_mesh = np.zeros(len(frames), bool)
        mesh = self._mesh_points(frames) if self.opt.landmarks else None
        if mesh is not None:
            nose = mesh[:, 2]
            # FaceMesh follows one face by itself: use it only where it is the tracked face
            on_mesh = ~np.isnan(nose[:, 0]) & (nose >= boxes[:, :2]).all(1) & (nose <= boxes[:, 2:]).all(1)
            points[on_mesh] = mesh[on_mesh]
        # the median filter of the box smoother, on the six point coordinates
        points = smooth_boxes(points.reshape(len(points), -1), self.opt.smoothing).reshape(points.shape)
        return FaceAlignment(align.align_matrices(points, self.opt.resolution), int(track.detected.sum()), filled,
                             int(on_mesh.sum()))

    @staticmethod
    def _mesh_points(frames: np.ndarray) -> Optional[np.ndarray]:
        try:
            landmarks = estimate_head_pose(frames).landmarks
        except ImportError as e:
            log.warning("no FaceMesh landmarks, aligning on face boxes (no head roll): %s", e)
            return None
        return align.points_from_mesh(landmarks)

    # ---------------------------------------------------------------------------------------- audio
    def audio_windows(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz audio -> Whisper windows [n, tokens, d], n = the output's frame count."""
        feats = self.whisper.features(wave)
        n = self.whisper.num_video_frames(len(feats), self.opt.fps)
        return self.whisper.windows(feats, self.opt.fps, n)

    # ---------------------------------------------------------------------------------------- model
    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return (z - VAE_SHIFT) * VAE_SCALING

    def _denoise(self, faces: torch.Tensor, audio: torch.Tensor, noise: torch.Tensor, guidance: float,
                 generator: torch.Generator) -> torch.Tensor:
        """Aligned faces [f, 3, r, r] in [-1, 1], audio windows [f, tokens, d], noise [1, c, 1, h, w]
        -> generated faces [f, 3, r, r] in [-1, 1] (mouth region generated, the rest kept)."""
        f = faces.shape[0]
        cfg = guidance > 1.0
        masked = self._encode(faces * self.mask, generator)
        ref = self._encode(faces, generator)
        cond = torch.cat([self.latent_mask.expand(f, -1, -1, -1), masked, ref], dim=1)    # [f, 9, h, w]
        cond = cond.transpose(0, 1)[None]                                                  # [1, 9, f, h, w]
        if cfg:
            cond = cond.expand(2, -1, -1, -1, -1)
            audio = torch.cat([torch.zeros_like(audio), audio])
        latents = noise.expand(-1, -1, f, -1, -1)
        for t in self.scheduler.timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = torch.cat([self.scheduler.scale_model_input(x, t), cond], dim=1)
            eps = self.unet(x, t, encoder_hidden_states=audio)
            if cfg:
                uncond, with_audio = eps.chunk(2)
                eps = uncond + guidance * (with_audio - uncond)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
        z = latents[0].transpose(0, 1) / VAE_SCALING + VAE_SHIFT
        decoded = self.vae.decode(z).sample
        return decoded * (1 - self.mask) + faces * self.mask

    @torch.no_grad()
    def run(self, frames: np.ndarray, faces: FaceAlignment, wave: torch.Tensor, guidance: float, seed: int,
            progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Lip-sync ``frames`` (uint8 RGB [T, H, W, 3], at ``options.fps``) to ``wave`` (mono 16 kHz).

        Yields per window (output frames, mask frames), both uint8 [n, H, W, 3]; the output has as
        many frames as the audio gives Whisper windows (LatentSync's count)."""
        audio = self.audio_windows(wave).to(self.device, self.dtype)
        order = loop_indices(len(frames), len(audio))
        r, h = self.opt.resolution, self.opt.resolution // self.vae_scale
        generator = torch.Generator(self.device).manual_seed(seed)
        c = self.vae.config.latent_channels
        noise = torch.randn((1, c, 1, h, h), generator=generator, device=self.device, dtype=self.dtype)
        noise = noise * self.scheduler.init_noise_sigma
        starts = range(0, len(order), self.opt.num_frames)
        for s in tqdm(starts, desc="windows", leave=False, disable=not progress):
            idx = order[s:s + self.opt.num_frames]
            src = torch.from_numpy(frames[idx]).to(self.device).permute(0, 3, 1, 2).float()   # [f, 3, H, W] 0..255
            m = torch.from_numpy(faces.matrices[idx]).to(self.device)
            aligned = align.warp(src, m, (r, r), fill=align.FILL) / UINT8_MAX * 2 - 1
            out = self._denoise(aligned.to(self.dtype), audio[s:s + len(idx)], noise, guidance, generator)
            yield (self._paste(src, out, m), self._paste(src, aligned * self.mask.float(), m))

    @staticmethod
    def _paste(src: torch.Tensor, faces: torch.Tensor, m: torch.Tensor) -> np.ndarray:
        faces = ((faces.float() + 1) / 2).clamp(0, 1) * UINT8_MAX
        out = align.paste_back(src, faces, m)
        return out.round().clamp(0, UINT8_MAX).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
