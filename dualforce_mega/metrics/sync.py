"""Sync-C / Sync-D / AV offset exactly as joonson/syncnet_python ``SyncNetInstance.evaluate``.

Audio: 16 kHz mono at 16-bit PCM scale (the reference reads an int16 wav), 13 MFCCs at 100 Hz from
``python_speech_features.mfcc`` with its defaults (25 ms windows, 10 ms hop, 26 filters, c0 = log energy).
Video: 25 fps face crops, 224², BGR float 0..255. With ``n = min(frames, samples // 640)`` there are
``n - 5`` windows; window i is video frames [i, i+5) and MFCC columns [4i, 4i+20). For each window the
L2 distance (``F.pairwise_distance``, eps 1e-6) of its video embedding to the audio embeddings of windows
i-15 .. i+15 (zero-padded) gives ``dists [n-5, 31]``; ``mdist`` is its mean over windows,
Sync-D = min(mdist), offset = 15 - argmin, Sync-C = median(mdist) - min(mdist); the per-window
confidence median(mdist) - dists[:, argmin] is the reference's framewise ``fconf``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import python_speech_features
import torch
import torch.nn.functional as F

from .syncnet import MFCC_DIM, VIDEO_WINDOW, SyncNet

FPS = 25
SAMPLE_RATE = 16000
MFCC_RATE = 100                                   # python_speech_features' 10 ms hop
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS            # 640
MFCC_PER_FRAME = MFCC_RATE // FPS                 # 4
AUDIO_WINDOW = VIDEO_WINDOW * MFCC_PER_FRAME      # 20
PCM16_SCALE = 32768.0                             # float [-1, 1] -> int16 scale (ffmpeg's flt -> s16)
VSHIFT = 15


def mfcc(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Float audio in [-1, 1] -> [13, M] MFCCs on the int16 scale the reference reads."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"SyncNet audio must be {SAMPLE_RATE} Hz, got {sample_rate}")
    pcm = np.clip(np.round(np.asarray(wave, dtype=np.float64) * PCM16_SCALE), -PCM16_SCALE, PCM16_SCALE - 1)
    return python_speech_features.mfcc(pcm, sample_rate).T


def num_windows(n_frames: int, n_samples: int) -> int:
    return max(0, min(n_frames, n_samples // SAMPLES_PER_FRAME) - VIDEO_WINDOW)


def window_starts(n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """First video frame and first MFCC column of each window."""
    i = np.arange(n_windows)
    return i, i * MFCC_PER_FRAME


def video_windows(frames: torch.Tensor, n_windows: int) -> torch.Tensor:
    """[T, 3, H, W] -> [n_windows, 3, 5, H, W]."""
    starts, _ = window_starts(n_windows)
    idx = torch.as_tensor(starts[:, None] + np.arange(VIDEO_WINDOW)[None], device=frames.device)
    return frames[idx].permute(0, 2, 1, 3, 4)


def audio_windows(cc: torch.Tensor, n_windows: int) -> torch.Tensor:
    """[13, M] -> [n_windows, 1, 13, 20]."""
    _, starts = window_starts(n_windows)
    idx = torch.as_tensor(starts[:, None] + np.arange(AUDIO_WINDOW)[None], device=cc.device)
    return cc[:, idx].permute(1, 0, 2).unsqueeze(1)


@dataclass
class SyncResult:
    offset: int            # frames; positive: audio leads (the reference's sign)
    sync_d: float          # min over offsets of the mean distance
    sync_c: float          # median - min
    mdist: np.ndarray      # [2 * vshift + 1] mean distance per offset
    window_conf: np.ndarray  # [n_windows] confidence of each window at the chosen offset


def sync_scores(video_feats: torch.Tensor, audio_feats: torch.Tensor, vshift: int = VSHIFT) -> SyncResult:
    """Embeddings [N, D] of the N windows -> offset, Sync-D, Sync-C (``calc_pdist`` + ``evaluate``)."""
    if video_feats.shape != audio_feats.shape or video_feats.ndim != 2:
        raise ValueError(f"video / audio embeddings must both be [N, D]: {tuple(video_feats.shape)} vs "
                         f"{tuple(audio_feats.shape)}")
    win = 2 * vshift + 1
    v, a = video_feats.float().cpu(), audio_feats.float().cpu()
    padded = F.pad(a, (0, 0, vshift, vshift))
    shifted = padded.unfold(0, win, 1).permute(0, 2, 1)                  # [N, win, D]: padded[i + w]
    dists = F.pairwise_distance(v[:, None, :].expand_as(shifted), shifted)  # [N, win]
    mdist = dists.mean(0)
    minval, minidx = torch.min(mdist, 0)
    median = torch.median(mdist)
    return SyncResult(offset=int(vshift - minidx), sync_d=float(minval), sync_c=float(median - minval),
                      mdist=mdist.numpy(), window_conf=(median - dists[:, minidx]).numpy())


class SyncScorer:
    """SyncNet over face crops + audio of one video."""

    def __init__(self, net: SyncNet, device: torch.device, batch: int = 20, vshift: int = VSHIFT):
        self.net, self.device, self.batch, self.vshift = net.to(device).eval(), device, batch, vshift

    @torch.no_grad()
    def __call__(self, crops_bgr: torch.Tensor, wave: np.ndarray) -> SyncResult:
        """crops_bgr [T, 3, 224, 224] float 0..255; wave float [-1, 1] at 16 kHz."""
        n = num_windows(len(crops_bgr), len(wave))
        if n < 1:
            raise ValueError(f"too short for SyncNet: {len(crops_bgr)} frames, {len(wave)} samples "
                             f"(needs > {VIDEO_WINDOW} frames of both)")
        cc = torch.from_numpy(mfcc(wave)).float()
        if cc.shape[0] != MFCC_DIM:
            raise ValueError(f"expected {MFCC_DIM} MFCCs, got {cc.shape[0]}")
        vids, auds = [], []
        for s in range(0, n, self.batch):
            m = min(n, s + self.batch)
            frames = crops_bgr[s:m + VIDEO_WINDOW - 1].to(self.device, torch.float32)
            vids.append(self.net.forward_lip(video_windows(frames, m - s)).cpu())
            cols = cc[:, s * MFCC_PER_FRAME:(m - 1) * MFCC_PER_FRAME + AUDIO_WINDOW].to(self.device)
            auds.append(self.net.forward_aud(audio_windows(cols, m - s)).cpu())
        return sync_scores(torch.cat(vids), torch.cat(auds), self.vshift)
