"""Learnable synthetic talking-head clips in the shard schema (DESIGN §5), for tests and CPU demos.

A clip is driven by a handful of smooth latent factors per video frame (sums of sinusoids with
per-clip random frequencies and phases):

  mouth (3: open / round / stretch)   fast, speech-rate
  blink (1)                           sparse bumps
  pose (3: yaw / pitch / roll)        slow

Every modality is a fixed function of these factors, shared by all clips (the "world", drawn once
from ``WORLD_SEED``), which is what makes the data learnable:

  struct [N, 70]   expression = world map of mouth + blink (+ a little pose); pose dims = pose;
                   translation = world map of pose; scale = per-subject constant
  flame [N, 56]    world linear map of struct (+ small noise)
  audio [2N, D_a]  world projection of the mouth factors at audio rate (+ speaker timbre, noise)
  video [16, F, h, w]  a per-subject appearance field living in a fixed low-rank channel subspace
                   (like real VAE latents, whose channels are strongly correlated), translated by
                   yaw/pitch, with mouth and eye blobs driven by the mouth / blink factors, averaged
                   over each latent frame's video frames (frame 0 alone, t >= 1: 4t-3..4t)
  kp_canonical [63]  world mean face + per-subject offset
  text_emb [L, D_t]  (if model.text_dim > 0) world embeddings of the clip's attribute tokens
  ref_latent [F, 16, h, w], ref_positions [F]  single-image encodings of video frame 4*t0 at every latent
                   frame t0 (one video frame alone, where latent frame t0 >= 1 averages four), as the
                   data pipeline stores them for the loader's reference frames

Deterministic in (index, seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from ..config import ModelConfig
from ..seeding import mix_seed
from ..timeline import Timeline

WORLD_SEED = 0x5EED_D0A1          # the fixed global maps every clip shares
MOUTH, BLINK, POSE = 3, 1, 3       # latent factors per video frame
APPEARANCE_RANK = 3                # video latent channels live in a subspace of this rank
APPEARANCE_WAVES = 4               # 2-D cosines per appearance channel
MAX_SPATIAL_FREQ = 2               # cycles per latent width / height (smooth fields)
CLIPS_PER_SUBJECT = 4              # consecutive clip indices share a subject (identity, voice)
# frequency ranges in Hz: speech syllable rate for the mouth, slow head motion, occasional blinks
MOUTH_HZ, POSE_HZ, BLINK_HZ = (0.8, 2.5), (0.1, 0.5), (0.2, 0.5)
BLINK_SHARPNESS = 8                # blink = max(0, sin)^k: short bumps
SHIFT_FRACTION = 1 / 8             # head translation per unit yaw/pitch, as a fraction of latent size
STRUCT_NOISE, FLAME_NOISE, AUDIO_NOISE = 0.02, 0.01, 0.1
# text attribute tokens: gender (2), speaking-rate bucket (3), head-motion bucket (3)
TEXT_VOCAB = (2, 3, 3)


@dataclass
class World:
    expr_map: torch.Tensor         # [MOUTH + BLINK + POSE, kp_dim]
    trans_map: torch.Tensor        # [POSE, 3]
    flame_map: torch.Tensor        # [motion_dim, flame_dim]
    audio_map: torch.Tensor        # [MOUTH, audio_dim]
    channels: torch.Tensor         # [in_channels, APPEARANCE_RANK] orthogonal columns
    mouth_colour: torch.Tensor     # [MOUTH, APPEARANCE_RANK]
    eye_colour: torch.Tensor       # [APPEARANCE_RANK]
    mean_face: torch.Tensor        # [kp_dim]
    text_table: Optional[torch.Tensor]  # [sum(TEXT_VOCAB), text_dim]


@lru_cache(maxsize=8)
def _world(kp_dim: int, motion_dim: int, flame_dim: int, audio_dim: int, channels: int, text_dim: int) -> World:
    g = torch.Generator().manual_seed(WORLD_SEED)
    factors = MOUTH + BLINK + POSE
    rank = min(APPEARANCE_RANK, channels)
    q, _ = torch.linalg.qr(torch.randn(channels, rank, generator=g))
    return World(
        expr_map=torch.randn(factors, kp_dim, generator=g) / math.sqrt(factors),
        trans_map=torch.randn(POSE, 3, generator=g) / math.sqrt(POSE),
        flame_map=torch.randn(motion_dim, flame_dim, generator=g) / math.sqrt(motion_dim),
        audio_map=torch.randn(MOUTH, audio_dim, generator=g) / math.sqrt(MOUTH),
        # scaled so that each channel has about unit variance
        channels=q * math.sqrt(channels / rank),
        mouth_colour=torch.randn(MOUTH, rank, generator=g),
        eye_colour=torch.randn(rank, generator=g),
        mean_face=torch.randn(kp_dim, generator=g),
        text_table=torch.randn(sum(TEXT_VOCAB), text_dim, generator=g) if text_dim > 0 else None,
    )


@dataclass
class Sinusoids:
    """``count`` smooth unit-variance signals, each the sum of two sinusoids."""
    freq: torch.Tensor    # [count, 2] Hz
    phase: torch.Tensor   # [count, 2]
    amp: torch.Tensor     # [count, 2]

    @staticmethod
    def draw(g: torch.Generator, count: int, hz: tuple[float, float]) -> "Sinusoids":
        lo, hi = hz
        freq = lo + (hi - lo) * torch.rand(count, 2, generator=g)
        phase = 2 * math.pi * torch.rand(count, 2, generator=g)
        # split unit variance between the two (a sinusoid of amplitude sqrt(2) has variance 1)
        mix = torch.rand(count, 1, generator=g)
        amp = torch.cat([mix, 1 - mix], dim=1).sqrt() * math.sqrt(2.0)
        return Sinusoids(freq, phase, amp)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Values [T, count] at times ``t`` [T] in seconds."""
        arg = 2 * math.pi * self.freq[None] * t[:, None, None] + self.phase[None]
        return (self.amp[None] * torch.sin(arg)).sum(-1)


def _periodic_blobs(h: int, w: int, cy: torch.Tensor, cx: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian bumps [N, K, h, w] centred at (cy, cx) [N, K] on the periodic latent grid."""
    y = torch.arange(h, dtype=torch.float32)[None, None, :, None]
    x = torch.arange(w, dtype=torch.float32)[None, None, None, :]
    dy = torch.remainder(y - cy[..., None, None] + h / 2, h) - h / 2
    dx = torch.remainder(x - cx[..., None, None] + w / 2, w) - w / 2
    return torch.exp(-(dy ** 2 + dx ** 2) / (2 * radius ** 2))


def _video(world: World, g: torch.Generator, h: int, w: int, dy: torch.Tensor, dx: torch.Tensor,
           mouth: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
    """Per video frame latents [C, N, h, w]: the subject's appearance seen at offsets (dy, dx) [N]."""
    rank = world.channels.shape[1]
    fy = torch.randint(0, MAX_SPATIAL_FREQ + 1, (rank, APPEARANCE_WAVES), generator=g).float()
    fx = torch.randint(-MAX_SPATIAL_FREQ, MAX_SPATIAL_FREQ + 1, (rank, APPEARANCE_WAVES), generator=g).float()
    phase = 2 * math.pi * torch.rand(rank, APPEARANCE_WAVES, generator=g)
    amp = math.sqrt(2.0 / APPEARANCE_WAVES)
    # [N, 1, h, 1] / [N, 1, 1, w] coordinates relative to the moving face
    y = (torch.arange(h, dtype=torch.float32)[None, :] - dy[:, None])[:, None, :, None] / h
    x = (torch.arange(w, dtype=torch.float32)[None, :] - dx[:, None])[:, None, None, :] / w
    field = torch.zeros(dy.shape[0], rank, h, w)
    for k in range(APPEARANCE_WAVES):   # one wave at a time keeps memory at [N, rank, h, w]
        # integer frequencies make the field periodic, so any shift is exact
        arg = 2 * math.pi * (fy[None, :, k, None, None] * y + fx[None, :, k, None, None] * x)
        field += amp * torch.cos(arg + phase[None, :, k, None, None])

    # mouth and eyes move with the head: fixed face positions (fractions of the grid) plus the offset
    centres = torch.tensor([[0.7, 0.5], [0.35, 0.3], [0.35, 0.7]])
    cy = centres[None, :, 0] * h + dy[:, None]
    cx = centres[None, :, 1] * w + dx[:, None]
    blobs = _periodic_blobs(h, w, cy, cx, radius=max(min(h, w) / 8, 0.5))      # [N, 3, h, w]
    mouth_part = (mouth @ world.mouth_colour)[:, :, None, None] * blobs[:, None, 0]
    eye_part = blink[:, None, None, None] * world.eye_colour[None, :, None, None] * blobs[:, None, 1:].sum(2)
    field = field + mouth_part - eye_part
    return torch.einsum("cr,nrhw->cnhw", world.channels, field)


def _pool_latent(per_frame: torch.Tensor, num_latent: int, stride: int) -> torch.Tensor:
    """[C, N, h, w] video frames -> [C, F, h, w]: each latent frame averages its video frames."""
    spans = Timeline(stride=stride).spans(torch.arange(num_latent)).tolist()
    return torch.stack([per_frame[:, s:e + 1].mean(1) for s, e in spans], dim=1)


def make_synthetic_clip(index: int, num_latent_frames: int, latent_hw: tuple[int, int], model_cfg: ModelConfig,
                        seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One clip: tensors in the shard schema (unbatched, float32) and its metadata."""
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames: {num_latent_frames} must be >= 1")
    h, w = latent_hw
    m = model_cfg
    if m.motion_dim <= m.kp_dim + 2 * POSE:
        raise ValueError(f"model.motion_dim={m.motion_dim} leaves no scale dims after expression "
                         f"(model.kp_dim={m.kp_dim}), pose ({POSE}) and translation ({POSE})")
    world = _world(m.kp_dim, m.motion_dim, m.flame_dim, m.audio_dim, m.in_channels, m.text_dim)
    subject = index // CLIPS_PER_SUBJECT
    gs = torch.Generator().manual_seed(mix_seed(seed, subject, 1))   # identity: appearance, voice, face
    gc = torch.Generator().manual_seed(mix_seed(seed, index, 0))     # this clip's motion and noise

    tl = Timeline.of(m)
    n = tl.video_frames(num_latent_frames)
    audio_per_frame = tl.audio_per_video_frame
    t_video = torch.arange(n, dtype=torch.float32) / m.fps
    t_audio = torch.arange(n * audio_per_frame, dtype=torch.float32) / m.audio_rate

    # factors at video rate, and the mouth also at audio rate (same sinusoids, finer time grid)
    mouth_sig = Sinusoids.draw(gc, MOUTH, MOUTH_HZ)
    mouth, mouth_audio = mouth_sig(t_video), mouth_sig(t_audio)
    pose = Sinusoids.draw(gc, POSE, POSE_HZ)(t_video)
    blink_raw = Sinusoids.draw(gc, BLINK, BLINK_HZ)(t_video)
    blink = blink_raw.clamp_min(0).div(math.sqrt(2.0)).pow(BLINK_SHARPNESS)

    # struct: LivePortrait layout [expression kp_dim | pitch, yaw, roll | translation 3 | scale 1]
    factors = torch.cat([mouth, blink, pose], dim=1)
    scale = 1.0 + 0.1 * torch.randn(1, generator=gs)
    rest = m.motion_dim - m.kp_dim - 2 * POSE
    struct = torch.cat([factors @ world.expr_map, pose, pose @ world.trans_map,
                        scale.expand(n, rest)], dim=1)
    struct = struct + STRUCT_NOISE * torch.randn(struct.shape, generator=gc)
    flame = struct @ world.flame_map + FLAME_NOISE * torch.randn(n, m.flame_dim, generator=gc)

    timbre = 0.3 * torch.randn(m.audio_dim, generator=gs)
    audio = mouth_audio @ world.audio_map + timbre + AUDIO_NOISE * torch.randn(
        t_audio.numel(), m.audio_dim, generator=gc)

    g_app = torch.Generator().manual_seed(mix_seed(seed, subject, 3))
    dy = SHIFT_FRACTION * h * pose[:, 0]   # pitch moves the face vertically
    dx = SHIFT_FRACTION * w * pose[:, 1]   # yaw horizontally
    frames = _video(world, g_app, h, w, dy, dx, mouth, blink[:, 0])
    video = _pool_latent(frames, num_latent_frames, m.vae_temporal_stride)
    ref_positions = torch.arange(num_latent_frames)
    ref_latent = torch.stack([frames[:, tl.reference_video_frame(int(t0))] for t0 in ref_positions])

    kp = world.mean_face + 0.3 * torch.randn(m.kp_dim, generator=gs)
    tensors = {"video_latent": video.contiguous(), "struct": struct.contiguous(), "kp_canonical": kp,
               "audio": audio.contiguous(), "flame": flame.contiguous(), "ref_latent": ref_latent.contiguous(),
               "ref_positions": ref_positions}

    gender = int(torch.randint(0, TEXT_VOCAB[0], (1,), generator=gs))
    rate_bucket = min(int((float(mouth_sig.freq.mean()) - MOUTH_HZ[0]) / (MOUTH_HZ[1] - MOUTH_HZ[0]) * TEXT_VOCAB[1]),
                      TEXT_VOCAB[1] - 1)
    pose_std = float(pose.std()) if n > 1 else 0.0
    motion_bucket = min(int(pose_std * TEXT_VOCAB[2] / 2), TEXT_VOCAB[2] - 1)
    if world.text_table is not None:
        offsets = [0, TEXT_VOCAB[0], TEXT_VOCAB[0] + TEXT_VOCAB[1]]
        ids = torch.tensor([offsets[0] + gender, offsets[1] + rate_bucket, offsets[2] + motion_bucket])
        tensors["text_emb"] = world.text_table[ids].clone()

    meta = {
        "key": f"synthetic_{seed}_{index:08d}",
        "source": "synthetic",
        "source_dataset": "synthetic",
        "subject": f"synthetic_subject_{subject:06d}",
        "split": "train",
        "gender": ("female", "male")[gender],
        "fps": m.fps,
        "audio_rate": m.audio_rate,
        "num_video_frames": n,
        "num_latent_frames": num_latent_frames,
        "num_audio_frames": int(audio.shape[0]),
        "latent_hw": [h, w],
        "quality": {"mouth_std": float(mouth[:, 0].std()) if n > 1 else 0.0, "pose_std": pose_std},
        "source_file": f"synthetic://seed={seed}/index={index}",
        "time_range": [0.0, n / m.fps],
    }
    return tensors, meta
