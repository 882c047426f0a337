"""Step 05: FLAME parameters per video frame of a clip, ``flame [N, 56]`` = expr 50 | jaw 3 | global 3.

Step API (called by ``data_tools.prepare`` and ``data_tools.extract_flame``)::

    step = build_flame_step(flame_dir=None, emoca=None, flame_fps=25.0, random_models=None, device="auto")
    res = step(source_file, start_s, num_frames, fps=25, frames=None)
    res.flame    float32 [num_frames, 56], or None: the clip has NO FLAME (write no ``flame`` tensor
                 and ``has_flame: false``; L_flame skips the clip -- never zeros)
    res.source   where it came from: "precomputed:<file>" | "emoca" | "emoca-random-tiny" | "none"
    res.reason   why there is none (None when there is FLAME)

Order: a precomputed file for the clip's source video in ``flame_dir`` (``<video stem>.npz`` etc.
or EMOCA's per-frame folder, covering the video from its start; ``flame_import``) -> EMOCA run on
the clip's face crops ``frames`` (uint8 RGB [N, H, W, 3]) when its weights are given (or a tiny
random EMOCA with ``random_models="tiny"``, since FLAME has no offline source) -> none.
EMOCA's own crops are FAN-aligned at 1.25x the face box; ours are the pipeline's square face crops
resized to 224x224 (a small domain shift; documented, not corrected).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.emoca import INPUT_SIZE, EmocaConfig, EmocaEncoder
from .flame_import import FlameFormatError, find_flame_file, flame_for_clip, read_flame
from .netutil import RANDOM_PRESETS, random_init, resolve_device

log = logging.getLogger(__name__)
NONE = "none"


@dataclass
class FlameResult:
    flame: Optional[np.ndarray]
    source: str
    reason: Optional[str] = None


class EmocaRunner:
    """EMOCA batched on its device: crops [N, H, W, 3] uint8 -> flame [N, 56] (fp16 autocast on CUDA)."""

    def __init__(self, model: EmocaEncoder, name: str = "emoca", batch_size: int = 32):
        self.model = model.eval()
        self.name, self.batch_size = name, batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = []
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")
        for start in range(0, len(frames), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                  antialias=True)
            with autocast:
                exp, pose = self.model(x)
            half = pose.shape[1] // 2
            # posecode = global | jaw  ->  flame = expr | jaw | global
            out.append(torch.cat([exp, pose[:, half:], pose[:, :half]], dim=1).float().cpu())
        return torch.cat(out).numpy()


class FlameStep:
    def __init__(self, flame_dir: Optional[str] = None, emoca: Optional[EmocaRunner] = None, flame_fps: float = 25.0):
        self.flame_dir = Path(flame_dir) if flame_dir else None
        self.emoca = emoca
        self.flame_fps = flame_fps

    def __call__(self, source_file: str, start_s: float, num_frames: int, fps: int,
                 frames: Optional[np.ndarray] = None) -> FlameResult:
        reasons = []
        if self.flame_dir is not None:
            path = find_flame_file(self.flame_dir, Path(source_file).stem)
            if path is None:
                reasons.append(f"no FLAME file for {Path(source_file).stem!r} in {self.flame_dir}")
            else:
                try:
                    rows = flame_for_clip(read_flame(path, self.flame_fps), start_s, num_frames, fps)
                except FlameFormatError as e:
                    rows = None
                    reasons.append(str(e))
                else:
                    if rows is None:
                        reasons.append(f"{path} does not cover {start_s:.2f}s + {num_frames} frames")
                if rows is not None:
                    return FlameResult(rows, f"precomputed:{path}")
        if self.emoca is not None:
            if frames is None or len(frames) != num_frames:
                reasons.append(f"EMOCA needs the clip's {num_frames} face crops")
            else:
                return FlameResult(self.emoca(frames).astype(np.float32), self.emoca.name)
        if not reasons:
            reasons.append("no --flame-dir and no EMOCA weights")
        return FlameResult(None, NONE, "; ".join(reasons))


def build_flame_step(flame_dir: Optional[str] = None, emoca: Optional[str] = None, flame_fps: float = 25.0,
                     random_models: Optional[str] = None, device: str = "auto", batch_size: int = 32) -> FlameStep:
    runner = None
    if emoca:
        runner = EmocaRunner(EmocaEncoder.from_pretrained(emoca).to(resolve_device(device)), batch_size=batch_size)
        log.info("flame: EMOCA coarse + expression encoders from %s", emoca)
    elif random_models is not None:
        if random_models not in RANDOM_PRESETS:
            raise ValueError(f"random_models={random_models!r} is not one of {RANDOM_PRESETS}")
        log.warning("flame: RANDOM tiny EMOCA (no weights) -- smoke runs only; clips get flame_source "
                    "emoca-random-%s", random_models)
        with random_init():
            model = EmocaEncoder(EmocaConfig.tiny())
        runner = EmocaRunner(model.to(resolve_device(device)), name=f"emoca-random-{random_models}",
                             batch_size=batch_size)
    if flame_dir and not Path(flame_dir).is_dir():
        raise FileNotFoundError(f"--flame-dir {flame_dir}: not a directory")
    return FlameStep(flame_dir, runner, flame_fps)
