"""Training windows: W latent frames and the struct / FLAME / audio rows that belong to them.

A window starting at latent frame t0 re-bases time so its first latent frame becomes frame 0
(the clean reference). That frame keeps a single video frame, the *last* of its original span
(4*t0), so the window's rows are video frames 4*t0 .. 4*(t0+W-1) — exactly N_w = 1 + 4(W-1) of
them, matching what the model expects for frame_ids 0..W-1 — and audio frames
r*4*t0 .. r*(4*(t0+W-1)+1) - 1 with r audio frames per video frame (``Timeline.window_slices``).

When the clip carries single-image reference encodings (``ref_latent`` / ``ref_positions``, schema.py),
windows start only at those positions and the window's frame 0 is the encoding of that one video
frame — the reference the model gets at inference, where frame 0 is one encoded image. With probability
``data.ref_elsewhere_prob`` frame 0 (image and motion) is instead the reference of another position of
the clip: once the sampler's sink moves along with its window, the reference image sits right before
frames it was not taken next to, and training shows that too.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from .schema import ShardSchema


def window_starts(latent_frames: int, window: int, ref_positions: Optional[Sequence[int]] = None) -> list[int]:
    """Latent frames a window may start at: every one that leaves room for the window, restricted to
    the positions that have a single-image reference encoding when the clip has them."""
    last = latent_frames - window
    if ref_positions is None:
        return list(range(last + 1))
    return sorted(int(p) for p in ref_positions if 0 <= int(p) <= last)


def window_start(seed: int, epoch: int, key: str, starts: Sequence[int]) -> int:
    """Window start for one clip in one epoch, one of ``starts``: a pure function of (seed, epoch, key).

    Keying on the sample (not on its position in the stream) keeps the choice identical however
    the stream is replayed or fast-forwarded; random.Random seeds strings through SHA-512, so it
    is stable across processes and Python hash randomisation.
    """
    if not starts:
        raise ValueError(f"sample {key!r}: no latent frame to start a window at")
    return starts[random.Random(f"window:{seed}:{epoch}:{key}").randrange(len(starts))]


def reference_position(seed: int, epoch: int, key: str, t0: int, positions: Sequence[int], prob: float) -> int:
    """Whose reference image a window starting at ``t0`` gets: its own (``t0``), or with probability
    ``prob`` another of the clip's reference positions — a pure function of (seed, epoch, key)."""
    others = [int(p) for p in positions if int(p) != t0]
    rng = random.Random(f"reference:{seed}:{epoch}:{key}")
    if not others or rng.random() >= prob:
        return t0
    return others[rng.randrange(len(others))]


def slice_window(tensors: dict[str, torch.Tensor], t0: int, window: int, schema: ShardSchema,
                 keep_text: bool, ref_position: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Cut one window out of a full clip; every tensor comes back float32 and contiguous. With reference
    encodings, frame 0 is the single-image encoding at ``ref_position`` (default ``t0``, one of
    ``ref_positions``), with the motion of that video frame."""
    s = schema.timeline.window_slices(t0, window)
    r = t0 if ref_position is None else ref_position
    video = tensors["video_latent"][:, s.latent]
    if "ref_latent" in tensors:
        hit = (tensors["ref_positions"] == r).nonzero()
        if hit.numel() != 1:
            raise ValueError(f"latent frame {r} has no single-image reference encoding "
                             f"(ref_positions {tensors['ref_positions'].tolist()})")
        video = video.clone()
        video[:, 0] = tensors["ref_latent"][int(hit[0, 0])]
    elif r != t0:
        raise ValueError("ref_position: the clip has no reference encodings")
    out = {"video_latent": video}
    if "struct" in tensors:      # talking-head clip (video-only clips carry the video stream alone)
        rows = list(range(s.video_frames.start, s.video_frames.stop))
        rows[0] = schema.timeline.reference_video_frame(r)       # frame 0's motion: the reference image's
        out.update(struct=tensors["struct"][rows], kp_canonical=tensors["kp_canonical"],
                   audio=tensors["audio"][s.audio])
        # a clip without FLAME stacks with the others as zeros that flame_valid = 0 masks out of L_flame
        has_flame = "flame" in tensors
        out["flame"] = tensors["flame"][rows] if has_flame else \
            torch.zeros(out["struct"].shape[0], schema.dims["Q"])
        out["flame_valid"] = torch.tensor(float(has_flame))
    if keep_text and "text_emb" in tensors:
        out["text_emb"] = tensors["text_emb"]
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}
